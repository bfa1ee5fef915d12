"""Compiled decoding steps (opt-in: ``Engine(compile_decode=True)``).

transformers' ``generate`` compiles the model's forward for decoding steps when the cache says its shapes are fixed
(``Cache.is_compileable``); a steady window cache does. This module holds the settings for that compile.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from transformers import CompileConfig

# Inductor settings for CPU decoding: frozen weights are prepacked for the CPU GEMM kernels; autotuning picks AMX /
# AVX-512 micro-kernels for the matrix-vector products of a step; q/k/v and gate/up projections become one GEMM
# each; a C++ wrapper calls the kernels without Python in between (~7% faster steps, ~20 s more compiling). They
# are global inductor settings, applied around the call that compiles: passed as
# ``torch.compile(options={"freezing": True})`` they do not freeze. Measured on CPUs only, so a GPU's compile keeps
# inductor's defaults (autotuning every GEMM of a large model would also take minutes there).
INDUCTOR_SETTINGS: dict[str, Any] = {
    "freezing": True,
    "max_autotune": True,
    "cpp.enable_concat_linear": True,
    "cpp_wrapper": True,
}
# Autotuning's timing tables and its statistics of the choices ("Autotune Choices Stats"), written to stderr on a
# first compile: nothing a user can act on. Each is set only where this torch has it (a setting it does not know
# would make the patch fail).
_QUIET_SETTINGS: dict[str, Any] = {
    "autotune_num_choices_displayed": 0,
    "max_autotune_report_choices_stats": False,
}
# Warnings torch raises from inside the compiler on a first compile (autotuning's benchmark buffers use a deprecated
# storage call): torch's own business, not the user's.
_COMPILER_WARNINGS = ("TypedStorage is deprecated",)

# One graph per model and settings (fixed shapes). fullgraph=True: a step that dynamo cannot trace whole fails at
# its compile instead of running split around the break. Split steps were not shown to be exact (a forced break
# gave other tokens on the AVX2 code path), so a break is an error naming the fix (compiled_step_errors); the
# supported architectures compile without any (tested).
DECODE_COMPILE_CONFIG = CompileConfig(fullgraph=True, dynamic=False, mode="default")
# transformers compiles decoding steps only on accelerators unless the compile config says otherwise.
DECODE_COMPILE_CONFIG._compile_all_devices = True  # type: ignore[assignment]
# On a GPU, "reduce-overhead" (CUDA graphs, transformers' own mode for accelerators): a step of a large model is
# hundreds of small kernels whose launches would otherwise cost more than their work.
GPU_DECODE_COMPILE_CONFIG = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead")

_CPU = torch.device("cpu")


@contextlib.contextmanager
def inductor_settings(enabled: bool = True, device: torch.device = _CPU) -> Iterator[None]:
    """Apply :data:`INDUCTOR_SETTINGS` for the duration, when ``enabled`` and decoding on a CPU (else a no-op)."""
    if not enabled or device.type != "cpu":
        yield
        return
    import torch._inductor.config as inductor_config

    quiet = {name: value for name, value in _QUIET_SETTINGS.items() if hasattr(inductor_config, name)}
    with inductor_config.patch({**INDUCTOR_SETTINGS, **quiet}), warnings.catch_warnings():
        for message in _COMPILER_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


def generate_kwargs(enabled: bool, device: torch.device = _CPU) -> dict[str, Any]:
    """``generate`` arguments that turn compiled decoding steps on or off for a model decoding on ``device`` (off
    also on GPUs, where transformers would otherwise compile by default once the cache is steady)."""
    config = DECODE_COMPILE_CONFIG if device.type == "cpu" else GPU_DECODE_COMPILE_CONFIG
    return {"compile_config": config, "disable_compile": not enabled}


@contextlib.contextmanager
def compiled_step_errors(enabled: bool, model_name: str) -> Iterator[None]:
    """Turn a failure to compile the decoding step (a graph break, with ``fullgraph=True``) into an error that says
    what happened and how to go on."""
    if not enabled:
        yield
        return
    from torch._dynamo.exc import TorchDynamoException

    try:
        yield
    except TorchDynamoException as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RuntimeError(
            f"compiled decoding cannot compile {model_name}'s decoding step as one graph ({first_line}); "
            "use compile_decode=False (eager decoding gives the same answers)"
        ) from error
