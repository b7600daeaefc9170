"""Shared recipe pieces of the model organisms' training scripts (``tasks/*/organism/train_organism.py``).

``seed_training`` gives every run the same start (threads, seeds of random, numpy and torch). The optimiser is
AdamW with weight decay on matrices only (biases, norms and other vectors get none) and a learning-rate
schedule of linear warmup followed by cosine decay to ``min_lr_ratio`` of the peak.
"""

from __future__ import annotations

import math
import random
from typing import Iterable

import numpy as np
import torch


def seed_training(seed: int, num_threads: int) -> None:
    """Same start for every run: torch's thread count and the seeds of ``random``, numpy and torch."""
    torch.set_num_threads(num_threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate factor at ``step``: (step + 1) / warmup during warmup, then cosine from 1 to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_with_warmup_cosine(
    params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, warmup_steps: int, total_steps: int,
    min_lr_ratio: float, betas: tuple[float, float] = (0.9, 0.98),
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (decay on parameters with ≥ 2 dimensions only) and its ``warmup_cosine`` LambdaLR scheduler."""
    params = list(params)
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=lr, betas=betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_lr_ratio))
    return optimizer, scheduler
