"""Compiled decoding steps (opt-in: ``Engine(compile_decode=True)``).

transformers' ``generate`` compiles the model's forward for decoding steps when the cache says its shapes are fixed
(``Cache.is_compileable``); a steady window cache does. This module holds the settings for that compile.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from transformers import CompileConfig

logger = logging.getLogger(__name__)
_reported: set[str] = set()

# Inductor settings for CPU decoding: frozen weights are prepacked for the CPU GEMM kernels; autotuning picks AMX /
# AVX-512 micro-kernels for the matrix-vector products of a step; q/k/v and gate/up projections become one GEMM
# each; a C++ wrapper calls the kernels without Python in between (~7% faster steps, ~20 s more compiling). They
# are global inductor settings, applied around the call that compiles: passed as
# ``torch.compile(options={"freezing": True})`` they do not freeze.
INDUCTOR_SETTINGS: dict[str, Any] = {
    "freezing": True,
    "max_autotune": True,
    "cpp.enable_concat_linear": True,
    "cpp_wrapper": True,
}

# One graph per model and settings (fixed shapes). fullgraph=False: a graph break (an architecture whose code
# dynamo cannot trace whole) runs that part eagerly instead of failing the answer; it is slower, so the engine
# warns once (graph_breaks_reported). The supported architectures compile without any (tested).
DECODE_COMPILE_CONFIG = CompileConfig(fullgraph=False, dynamic=False, mode="default")
# transformers compiles decoding steps only on accelerators unless the compile config says otherwise.
DECODE_COMPILE_CONFIG._compile_all_devices = True  # type: ignore[assignment]


@contextlib.contextmanager
def inductor_settings(enabled: bool = True) -> Iterator[None]:
    """Apply :data:`INDUCTOR_SETTINGS` for the duration (a no-op when not ``enabled``)."""
    if not enabled:
        yield
        return
    import torch._inductor.config as inductor_config

    with inductor_config.patch(INDUCTOR_SETTINGS):
        yield


def generate_kwargs(enabled: bool) -> dict[str, Any]:
    """``generate`` arguments that turn compiled decoding steps on or off (off also on GPUs, where transformers
    would otherwise compile by default once the cache is steady)."""
    return {"compile_config": DECODE_COMPILE_CONFIG, "disable_compile": not enabled}


@contextlib.contextmanager
def graph_breaks_reported(enabled: bool, model_name: str) -> Iterator[None]:
    """Warn once per model when compiled decoding steps broke their graph during the block (they still ran, the
    broken parts eagerly, and more slowly)."""
    if not enabled:
        yield
        return
    from torch._dynamo.utils import counters

    before = sum(counters["graph_break"].values())
    yield
    if sum(counters["graph_break"].values()) > before and model_name not in _reported:
        _reported.add(model_name)
        reasons = "; ".join(list(counters["graph_break"])[:3])
        logger.warning(
            "compiled decoding of %s breaks its graph (%s): those parts run eagerly, so steps are slower than "
            "they could be; compile_decode=False avoids the compile time",
            model_name,
            reasons,
        )
