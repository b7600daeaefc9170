"""Every transformers detail we rely on that its documented API does not promise, in one place.

The rest of the project talks to transformers through public names (``AutoModelForCausalLM``,
``DynamicCache``, ``AttentionInterface``, ``AttentionMaskInterface``, ``set_attn_implementation``).
Three facts are not promised and changed within 5.x (see ``docs/dependencies.md``):

- the forward keyword that carries a cache: ``past_key_values`` up to 5.23, ``cache`` from 5.24 (the
  old name warns and is announced for removal in 5.40);
- the output field holding the cache: ``past_key_values`` up to 5.23, ``cache`` from 5.24;
- how an attention layer calls the cache object it is handed: ``update(k, v, layer_idx, cache_kwargs)``
  (5.0–5.3), ``update(k, v, layer_idx)`` (5.4–5.23), ``update(k, v, layer_idx, kwargs=...)`` (5.24+);
  :class:`CacheStandIn` accepts all three.

Two more details live here too: the per-layer keys/values of a ``DynamicCache`` (:func:`cache_layer_states`)
and the config field naming the attention implementation (:func:`attention_implementation`,
:func:`attention_implementation_set`).

The suffix-reuse fast path hands decoder layers a :class:`CacheStandIn`; on its first use in a process
it runs :func:`verify_once` with a tiny forward compared against the plain one, and stops with one
line (:class:`TransformersIncompatible`) naming the installed version, the tested range and
``--backend pyvene`` when the installed transformers behaves otherwise.
"""

from __future__ import annotations

import dataclasses
import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import transformers

#: transformers releases the exactness tests have passed on (lowest and newest); pyproject allows
#: ``>=LOWEST,<6`` and the canary (``./run_tests.sh --newest``) tries the newest release in that range.
LOWEST_TESTED = "5.23.0"
NEWEST_TESTED = "5.25.0"
TESTED_RANGE = f"{LOWEST_TESTED} to {NEWEST_TESTED}"


class TransformersIncompatible(RuntimeError):
    """The installed transformers does not behave as the tested versions do (one-line message)."""


def installed_version() -> str:
    return transformers.__version__


_KEYWORD: dict[type, str] = {}


def cache_keyword(module: torch.nn.Module) -> str:
    """The forward keyword that carries a cache into ``module`` (``cache`` from 5.24, else ``past_key_values``)."""
    kind = type(module)
    found = _KEYWORD.get(kind)
    if found is None:
        params = inspect.signature(module.forward).parameters
        found = "cache" if "cache" in params else "past_key_values"
        _KEYWORD[kind] = found
    return found


def with_cache(module: torch.nn.Module, inputs: dict[str, Any], cache: Any) -> dict[str, Any]:
    """``inputs`` plus ``cache`` under the keyword ``module``'s forward takes."""
    return {**inputs, cache_keyword(module): cache}


def output_cache(out: Any) -> Any:
    """The cache a forward returned: a transformers ``ModelOutput`` (``cache`` or ``past_key_values``
    field, whichever this version has, read without the deprecated alias), or our own outputs' ``cache``."""
    if dataclasses.is_dataclass(out):
        names = {f.name for f in dataclasses.fields(out)}
        for name in ("cache", "past_key_values"):
            if name in names:
                return getattr(out, name)
        return None
    return getattr(out, "cache", None)


def cache_layer_states(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) a ``DynamicCache`` holds for ``layer``: (B, kv_heads, T, d_head) each."""
    held = cache.layers[layer]
    return held.keys, held.values


def attention_implementation(model: transformers.PreTrainedModel) -> str | None:
    """The attention implementation ``model`` dispatches to (``"sdpa"``, ``"eager"``, a registered name)."""
    return model.config._attn_implementation


@contextmanager
def attention_implementation_set(model: transformers.PreTrainedModel, name: str) -> Iterator[str | None]:
    """Select the registered attention implementation ``name`` for the duration; yields the previous one."""
    previous = attention_implementation(model)
    if previous == name:
        yield previous
        return
    model.config._attn_implementation = name
    try:
        yield previous
    finally:
        model.config._attn_implementation = previous


class CacheStandIn:
    """Base of objects handed to decoder layers as their cache: accepts every 5.x calling convention of
    ``update`` and forwards to :meth:`write` ``(keys, values) -> (all keys, all values)``."""

    is_compileable = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.write(key_states, value_states)

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


_VERIFIED: dict[str, bool] = {}


def verify_once(what: str, check: Callable[[], str | None]) -> None:
    """Run ``check`` the first time ``what`` is used in this process. ``check`` returns None when the
    installed transformers behaves as expected, else the difference; an exception counts as failure.
    Raises :class:`TransformersIncompatible` with one line on failure (and on every later call)."""
    if _VERIFIED.get(what):
        return
    try:
        problem = check()
    except (TransformersIncompatible, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # the point of the check: any way the private detail breaks
        problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    if problem is not None:
        raise TransformersIncompatible(
            f"{what} does not work with the installed transformers {installed_version()} ({problem}); "
            f"tested on transformers {TESTED_RANGE}: install the locked environment (./run_tests.sh sets it up) "
            f"or run with --backend pyvene"
        )
    _VERIFIED[what] = True
