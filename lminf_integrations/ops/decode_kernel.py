"""A CPU kernel for the attention of a decoding step, built on first use (``csrc/decode_attention.cpp``).

A steady decoding step attends one query per sequence to the whole window buffer. PyTorch's CPU flash kernel does
this with a one-row GEMM per block of keys and reads every key/value head once per query head; the kernel here
reads each key and value row once for all query heads of its group and splits the keys across threads, in float32
like the flash kernel (exact up to rounding; merged by each chunk's maximum and sum). It takes less time than the
flash kernel, and compiled decoding runs faster with it (``python -m bench decode``; README, "How it works").

It is compiled once per machine with ``torch.utils.cpp_extension`` (a C++ compiler and ``ninja``; seconds) into
torch's extension cache. Where that fails, or with ``LMINF_DECODE_KERNEL=0``, decoding uses the flash kernel, with
one warning saying why.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

from ..cpu import cpu_info
from ..files import age_seconds

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
HEAD_SIZES = (16, 32, 64, 80, 96, 128, 256)  # the ones the kernel is instantiated for
# -march=native: the build is for this machine (its name includes the CPU's flags, so a cache shared with another
# machine never loads it there). -ffast-math lets sums be vectorized and expf use the vector math library; the
# kernel keeps every value finite for it (masked keys get a very negative logit, not -inf). -fopenmp:
# at::parallel_for is OpenMP code inlined from ATen's headers; the library then uses the libgomp torch loaded.
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-mprefer-vector-width=512", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


def cflags() -> list[str]:
    """The compiler flags for this machine: no AVX-512 where PyTorch itself runs without it (an AVX2-only CPU, or
    ``ATEN_CPU_CAPABILITY=avx2`` on a newer one, so that the AVX2 build can be tested anywhere)."""
    return _CFLAGS if cpu_info().avx512 else [*_CFLAGS, "-mno-avx512f"]

_lock = threading.Lock()
_state: dict[str, Callable[..., torch.Tensor] | None] = {}


def enabled() -> bool:
    """Whether the kernel may be used: off with ``LMINF_DECODE_KERNEL=0`` (read on every call)."""
    return os.environ.get("LMINF_DECODE_KERNEL", "1") != "0"


def decode_attention_op() -> Callable[..., torch.Tensor] | None:
    """``torch.ops.lminf.decode_attention``, building it on the first call; ``None`` where it cannot be built."""
    if "op" in _state:
        return _state["op"]
    with _lock:
        if "op" not in _state:
            _state["op"] = _build()
    return _state["op"]


def built_op() -> Callable[..., torch.Tensor] | None:
    """The op if an earlier call built it, without building (safe while ``torch.compile`` traces)."""
    return _state.get("op")


def applies(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors: CPU, bfloat16 or float32, a supported head size."""
    return (
        query.device.type == "cpu"
        and query.dtype in (torch.bfloat16, torch.float32)
        and query.shape[-1] in HEAD_SIZES
        and key.dtype == query.dtype
    )


def _build_name() -> str:
    cpu = " ".join(sorted(cpu_info().flags)) or platform.processor()
    text = "\n".join([SOURCE.read_text(), " ".join(cflags()), torch.__version__, platform.machine(), cpu])
    return "lminf_decode_attention_" + hashlib.sha256(text.encode()).hexdigest()[:16]


# A build takes seconds to a minute; a lock file this old was left by a build that was killed.
STALE_LOCK_SECONDS = 600


def build_directory() -> Path:
    """The folder torch builds the kernel in (under ``TORCH_EXTENSIONS_DIR`` or torch's default root)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(_build_name(), verbose=False))


def clear_stale_lock() -> None:
    """Remove the build folder's lock file if a killed build left it: torch waits, silently and for ever, while it
    exists. A young lock is another process building now, and is left to it."""
    lock = build_directory() / "lock"
    age = age_seconds(lock)
    if age is not None and age > STALE_LOCK_SECONDS:
        logger.warning("removing %s, left %.0f minutes ago by a kernel build that did not finish", lock, age / 60)
        lock.unlink(missing_ok=True)


def build_tools_on_path() -> contextlib.AbstractContextManager[object]:
    """The build's tools on PATH, for a ``with`` block: torch runs ``ninja`` from PATH, and the one this package
    depends on sits beside the interpreter (``.venv/bin``), which is not on PATH when a virtualenv's program is run
    without activating it."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH") or os.defpath])
    return mock.patch.dict(os.environ, {"PATH": path})  # restored after the block, as it was


def _build() -> Callable[..., torch.Tensor] | None:
    if platform.machine() not in ("x86_64", "AMD64"):  # the compiler flags are x86's
        logger.warning(
            "decode-attention kernel: not built on %s; decoding uses PyTorch's flash kernel", platform.machine()
        )
        return None
    # What torch builds with (a command: "ccache g++" runs ccache). Missing, it is said in one line here, not in
    # torch's banner about an incompatible compiler and a ninja failure.
    compiler = os.environ.get("CXX", "c++")
    if shutil.which((compiler.split() or [""])[0]) is None:
        logger.warning(
            "decode-attention kernel: no C++ compiler (%r, set CXX to choose one); decoding uses PyTorch's flash "
            "kernel. LMINF_DECODE_KERNEL=0 skips the kernel.", compiler,
        )  # fmt: skip
        return None
    try:
        from torch.utils.cpp_extension import load

        logger.info("Building the decode-attention kernel (once per machine, for its CPU flags)")
        clear_stale_lock()
        with build_tools_on_path():
            load(
                _build_name(),
                sources=[str(SOURCE)],
                extra_cflags=cflags(),
                extra_ldflags=_LDFLAGS,
                is_python_module=False,
                verbose=False,
            )
    except Exception as error:  # no compiler, no ninja, unsupported flags: decoding still works, a little slower
        logger.warning(
            "decode-attention kernel could not be built (%s); decoding uses PyTorch's flash kernel. "
            "It needs a C++ compiler and `pip install ninja`; LMINF_DECODE_KERNEL=0 skips it.",
            str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__,
        )
        return None

    @torch.library.register_fake("lminf::decode_attention")
    def _shape(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        return query.new_empty((query.shape[0], 1, query.shape[1], query.shape[3]))

    return torch.ops.lminf.decode_attention  # type: ignore[no-any-return]
