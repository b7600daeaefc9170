"""The published configurations of five real models, and random-weight models built from them (nothing is downloaded).

Each ``config.json`` below is the model's published one (architecture fields; ``torch_dtype`` and
``transformers_version`` left out: the tests run float32 on CPU). ``build`` changes only what a CPU
smoke test cannot afford or must align with the tests' character-level tokenizer:

- ``num_hidden_layers`` -> 2 (every per-layer shape is the real one; layer 0 and layer 1 differ where the
  architecture alternates, e.g. Gemma 2's sliding / full attention);
- ``bos/eos/pad_token_id`` -> the tokenizer's (0/1/2 of ``conftest.make_tokenizer``);
- ``vocab_size`` -> ``CUT_VOCAB`` unless the real one is asked for: the vocabulary only sizes the
  embedding and the unembedding, and the independent hook reference projects every position onto it
  (Gemma 2's 256000 x 2304 head at every position of every reference step would take minutes on two
  cores). GPT-2's real vocabulary is cheap and is kept everywhere; every shape also runs once with its
  real vocabulary (``tests/test_real_shapes.py::test_real_vocabulary_paths_agree``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: vocabulary of the cut models (all but GPT-2) in the reference tests
CUT_VOCAB = 4096

LLAMA_3_2_1B: dict[str, Any] = {  # meta-llama/Llama-3.2-1B
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "use_cache": True,
    "vocab_size": 128256,
}

QWEN2_5_0_5B: dict[str, Any] = {  # Qwen/Qwen2.5-0.5B (q/k/v projections carry a bias: built into Qwen2Attention)
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "use_cache": True,
    "use_mrope": False,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

GEMMA_2_2B: dict[str, Any] = {  # google/gemma-2-2b (heads x head_dim = 2048 != hidden 2304; tied embeddings by default)
    "architectures": ["Gemma2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304,
    "initializer_range": 0.02,
    "intermediate_size": 9216,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 8,
    "num_hidden_layers": 26,
    "num_key_value_heads": 4,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "use_cache": True,
    "vocab_size": 256000,
}

OLMO_2_0425_1B: dict[str, Any] = {  # allenai/OLMo-2-0425-1B (no GQA; Q/K RMSNorm over all heads; untied head)
    "architectures": ["Olmo2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "eos_token_id": 100257,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 4096,
    "model_type": "olmo2",
    "num_attention_heads": 16,
    "num_hidden_layers": 16,
    "num_key_value_heads": 16,
    "pad_token_id": 100277,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 500000,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": 100352,
}

GPT2_SMALL: dict[str, Any] = {  # openai-community/gpt2 (Conv1D layout; n_inner null = 4 x 768)
    "activation_function": "gelu_new",
    "architectures": ["GPT2LMHeadModel"],
    "attn_pdrop": 0.1,
    "bos_token_id": 50256,
    "embd_pdrop": 0.1,
    "eos_token_id": 50256,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2",
    "n_ctx": 1024,
    "n_embd": 768,
    "n_head": 12,
    "n_inner": None,
    "n_layer": 12,
    "n_positions": 1024,
    "resid_pdrop": 0.1,
    "vocab_size": 50257,
}


@dataclass(frozen=True)
class Shape:
    """A published configuration and the numbers the tests check the built model against."""

    name: str
    config: dict[str, Any]
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    keep_real_vocab: bool = False  # in the reference tests too

    @property
    def layers_key(self) -> str:
        return "n_layer" if self.config["model_type"] == "gpt2" else "num_hidden_layers"


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("llama-3.2-1b", LLAMA_3_2_1B, hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64),
        Shape("qwen2.5-0.5b", QWEN2_5_0_5B, hidden=896, intermediate=4864, heads=14, kv_heads=2, head_dim=64),
        Shape("gemma-2-2b", GEMMA_2_2B, hidden=2304, intermediate=9216, heads=8, kv_heads=4, head_dim=256),
        Shape("olmo-2-0425-1b", OLMO_2_0425_1B, hidden=2048, intermediate=8192, heads=16, kv_heads=16, head_dim=128),
        Shape("gpt2-small", GPT2_SMALL, hidden=768, intermediate=3072, heads=12, kv_heads=12, head_dim=64,
              keep_real_vocab=True),
    )
}


def build_config(shape: Shape, tokenizer, real_vocab: bool = False, layers: int = 2):
    """The published config with ``layers`` layers, the tokenizer's special ids and the cut (or real) vocabulary."""
    from transformers import AutoConfig

    values = dict(shape.config)
    values.pop("architectures")
    model_type = values.pop("model_type")
    values[shape.layers_key] = layers
    if not (real_vocab or shape.keep_real_vocab):
        values["vocab_size"] = CUT_VOCAB
    values.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    return AutoConfig.for_model(model_type, **values)


def build_model(shape: Shape, tokenizer, real_vocab: bool = False, seed: int = 1234):
    """A seeded random-weight model of ``shape``, in eval mode.

    Built without torch's per-module default init (kaiming on every Linear, then overwritten anyway) and
    initialised once by the model's own ``init_weights`` (normal(0, initializer_range) weights, norms,
    rotary buffers): the same tensors-by-distribution and the same deterministic tensors as
    ``from_config``, several times faster at a real vocabulary (Gemma 2, one thread: about 4 s instead of 25 s).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = build_config(shape, tokenizer, real_vocab)
    torch.manual_seed(seed)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    if config.tie_word_embeddings:  # the head's (V, d) matrix is replaced by the embedding's when tied: not drawn
        model.get_output_embeddings()._is_hf_initialized = True
    model.init_weights()  # (marks every module initialised, as from_config leaves them)
    return model.eval()
