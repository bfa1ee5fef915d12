"""What this CPU offers, as PyTorch will use it: the class that decides the default dtype and the kernel's build.

Three classes of x86 CPU matter here, and their speeds differ by ~3x each step (README, "Start-up and speed by CPU
class"): AMX (bf16 tile multiplies), AVX-512 with BF16 dot products, and AVX2 only (no bf16 arithmetic at all).
An Intel CPU with AVX-512 BF16 but no AMX is a fourth: it has the instructions, but float32 runs faster there.
``ATEN_CPU_CAPABILITY=avx2`` makes PyTorch use its AVX2 kernels on any newer CPU; the class follows it, so a
machine with AVX-512 can run exactly the code an AVX2-only machine runs (see ``make test-avx2``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class CpuInfo:
    name: str
    flags: frozenset[str]
    capability: str  # ATen's vector capability: "AVX512", "AVX2", "DEFAULT" (ATEN_CPU_CAPABILITY lowers it)
    vendor: str = ""  # /proc/cpuinfo's vendor_id: "GenuineIntel", "AuthenticAMD"

    @property
    def avx512(self) -> bool:
        return self.capability == "AVX512" and "avx512f" in self.flags

    @property
    def bf16_units(self) -> bool:
        """bf16 matrix instructions (AMX or AVX-512 BF16) that PyTorch will use."""
        return self.avx512 and bool({"amx_bf16", "avx512_bf16"} & self.flags)

    @property
    def bf16_faster(self) -> bool:
        """Whether bf16 runs faster than float32 here: with AMX, or AVX-512 BF16 on a CPU other than Intel's.

        On an Intel CPU with AVX-512 BF16 but no AMX (a Cooper Lake, or a newer Xeon whose AMX a virtual machine
        hides) MKL's float32 matmul out-ran oneDNN's bf16 one, and float32 prefilled faster (README, "Start-up
        and speed by CPU class"); on AMD's AVX-512 BF16, bf16 won both phases."""
        return self.bf16_units and ("amx_bf16" in self.flags or self.vendor != "GenuineIntel")

    @property
    def cpu_class(self) -> str:
        if self.avx512 and "amx_bf16" in self.flags:
            return "AMX"
        if self.bf16_units:
            return "AVX-512 BF16" if self.bf16_faster else "Intel AVX-512 BF16"
        if self.avx512:
            return "AVX-512"
        if self.capability == "AVX2" or ("avx2" in self.flags and self.capability not in ("DEFAULT", "")):
            return "AVX2"
        return "baseline"

    @property
    def limited(self) -> bool:
        """Whether PyTorch runs below what the CPU offers (``ATEN_CPU_CAPABILITY`` set lower than its AVX-512)."""
        return self.capability != "AVX512" and "avx512f" in self.flags

    def describe(self) -> str:
        note = f", limited to {self.capability} by ATEN_CPU_CAPABILITY" if self.limited else ""
        return f"{self.name} ({self.cpu_class}{note})"


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU (read once per process)."""
    import torch

    name, flags, vendor = platform.processor() or platform.machine(), frozenset[str](), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "vendor_id":
                vendor = value.strip()
            elif key.strip() == "flags":
                flags = frozenset(value.split())
                break
    except OSError:
        pass
    return CpuInfo(name, flags, torch.backends.cpu.get_cpu_capability(), vendor)


_onednn_lock = threading.Lock()
_onednn_off_count = 0
_onednn_was_enabled = True


def decodes_faster_without_onednn(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether eager decoding steps should run with oneDNN off: bf16 on a CPU (``LMINF_DECODE_ONEDNN=1`` keeps it).

    A decoding step multiplies one row by every weight matrix. oneDNN's bf16 matmul takes 2-2.6x longer for that
    than PyTorch's own bf16 kernels (README, "Start-up and speed by CPU class"), while for prefill's many rows it
    is the fast path; float32 matmuls go through MKL either way.
    """
    import torch

    return device.type == "cpu" and dtype == torch.bfloat16 and os.environ.get("LMINF_DECODE_ONEDNN", "0") != "1"


@contextlib.contextmanager
def onednn_off() -> Iterator[None]:
    """oneDNN off for the duration, process-wide (PyTorch's flag is global), counted so that overlapping users in
    several threads restore it only when the last one leaves. Other threads' matmuls meanwhile run on PyTorch's
    own kernels: the same results up to rounding, at their speed."""
    global _onednn_off_count, _onednn_was_enabled
    import torch

    with _onednn_lock:
        if _onednn_off_count == 0:
            _onednn_was_enabled = bool(getattr(torch.backends.mkldnn, "enabled"))  # noqa: B009 (a property)
            setattr(torch.backends.mkldnn, "enabled", False)  # noqa: B010
        _onednn_off_count += 1
    try:
        yield
    finally:
        with _onednn_lock:
            _onednn_off_count -= 1
            if _onednn_off_count == 0:
                setattr(torch.backends.mkldnn, "enabled", _onednn_was_enabled)  # noqa: B010
