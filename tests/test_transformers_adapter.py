"""The transformers adapter: every 5.x way of calling a cache is accepted, the self-check fails with one
line naming the version, the tested range and the way around, and our main paths (greedy decoding, both
backends' sweeps with suffix reuse, attention ops during decoding) raise no deprecation warning of
transformers, neither a Python warning nor a line of its logger."""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict

import pytest
import torch
import transformers

from conftest import FAMILIES
from experiments.backends.attention_control import BlockAttention, attention_control
from experiments.engine.intervention_engine import Cell, InterventionEngine, group_cells
from experiments.engine.model_units import ResidualStream
from experiments.token_positions import TokenPosition
from experiments.backends.transformers_adapter import (
    LOWEST_TESTED,
    NEWEST_TESTED,
    CacheStandIn,
    TransformersIncompatible,
    cache_keyword,
    output_cache,
    verify_once,
    with_cache,
)

pytestmark = pytest.mark.exactness  # part of the newest-releases canary


class Recorder(CacheStandIn):
    def __init__(self):
        self.calls = 0

    def write(self, key_states, value_states):
        self.calls += 1
        return key_states, value_states


@pytest.mark.parametrize("call", [
    lambda c, k, v: c.update(k, v, 0, {"cache_position": None}),  # 5.0-5.3
    lambda c, k, v: c.update(k, v, 0),  # 5.4-5.23
    lambda c, k, v: c.update(k, v, 0, kwargs={"position_ids": None}),  # 5.24+
    lambda c, k, v: c.update(key_states=k, value_states=v, layer_idx=0),
])
def test_cache_stand_in_accepts_every_calling_convention(call):
    cache, k, v = Recorder(), torch.ones(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)
    keys, values = call(cache, k, v)
    assert cache.calls == 1 and keys is k and values is v


def test_verify_once_fails_with_one_line_naming_version_range_and_pyvene():
    def broken():
        raise TypeError("update() got an unexpected keyword argument 'kwargs'\nmore lines")

    with pytest.raises(TransformersIncompatible) as info:
        verify_once("a test path", broken)
    message = str(info.value)
    assert "\n" not in message
    assert transformers.__version__ in message and LOWEST_TESTED in message and NEWEST_TESTED in message
    assert "--backend pyvene" in message and "unexpected keyword argument 'kwargs'" in message
    with pytest.raises(TransformersIncompatible, match="moved the state"):
        verify_once("another test path", lambda: "an identity patch moved the state by 3")
    calls = []
    verify_once("a passing path", lambda: calls.append(1))
    verify_once("a passing path", lambda: calls.append(1))
    assert calls == [1], "a passing check runs once per process"


def test_cache_keyword_matches_the_installed_forward(pipelines):
    model = pipelines["llama"].model
    expected = "cache" if tuple(map(int, transformers.__version__.split(".")[:2])) >= (5, 24) else "past_key_values"
    assert cache_keyword(model) == expected
    ids = torch.tensor([[1, 5, 6, 7]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = model(input_ids=ids, use_cache=True)
        cache = output_cache(out)
        assert cache is not None and cache.get_seq_length() == 4
        out = model(**with_cache(model, {"input_ids": ids[:, :1], "use_cache": True}, cache))
        assert output_cache(out).get_seq_length() == 5


class _LogCatcher(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("family", FAMILIES)
def test_main_paths_raise_no_deprecation_warning(family, pipelines):
    pipeline = pipelines[family]
    bases = [{"raw_input": s} for s in ("12+34=", "5+6=")]
    sources = [{"raw_input": s} for s in ("98+76=", "7+1=")]
    position = TokenPosition(lambda s: [-1], pipeline, id="last")
    cells = [Cell(f"L{layer}", [ResidualStream(layer, position, "block_input")]) for layer in range(pipeline.num_layers)]
    catcher = _LogCatcher()
    logger = logging.getLogger("transformers")
    logger.addHandler(catcher)
    saved = pipeline.max_new_tokens
    pipeline.max_new_tokens = 3
    rows = defaultdict(list)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            pipeline.generate(bases)
            for backend in ("hooks", "pyvene"):
                engine = InterventionEngine(pipeline, backend)
                _, out = engine.run_part(bases, sources, [0, 1], group_cells(cells, 64))
                rows[backend] = [(r["cell_id"], r["output_token_ids"]) for r in out]
            with attention_control(pipeline.model, [BlockAttention([[1]], coordinates="cache")]):
                pipeline.generate(bases)
    finally:
        pipeline.max_new_tokens = saved
        logger.removeHandler(catcher)
    assert rows["hooks"] == rows["pyvene"]
    deprecated = [line for line in catcher.lines if "deprecat" in line.lower()]
    assert not deprecated, deprecated
