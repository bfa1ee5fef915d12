"""The decoding-attention kernel (``csrc/decode_attention.cpp``) against a float64 dense reference, and in the
patched model against PyTorch's flash kernel.

The kernel's rounding depends on the instruction set it was built for (-march=native: 16-wide float sums with
AVX-512, two 8-wide halves with AVX2, different fused multiply-adds), so it is checked against bounds derived from
float32's precision and the lengths of its sums (``tests/tolerances.py``), never against one CPU's result.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import ninja
import pytest
import torch

from lminf_integrations.ops import decode_kernel
from tests.tolerances import assert_close, attention_bound


@pytest.fixture(scope="module")
def op():  # type: ignore[no-untyped-def]
    built = decode_kernel.decode_attention_op()
    assert built is not None, "the decode-attention kernel did not build (C++ compiler and ninja needed)"
    return built


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Dense attention in float64, query heads paired with key/value heads as in grouped-query attention."""
    group = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    logits = q.double() @ k64.transpose(-1, -2) * scale
    if mask is not None:
        logits = logits + mask.double()
    return (logits.softmax(-1) @ v64).transpose(1, 2)  # (B, 1, H, D)


def _inputs(batch: int, heads: int, kv_heads: int, n_keys: int, dim: int, dtype: torch.dtype, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, dim, generator=g).to(dtype)
    # Keys and values as a slice of a larger buffer: strided along positions and heads, like a cache view.
    k = (3 * torch.randn(batch, kv_heads, n_keys + 5, dim, generator=g)).to(dtype)[:, :, 2 : 2 + n_keys]
    v = torch.randn(batch, kv_heads, n_keys + 5, dim, generator=g).to(dtype)[:, :, 2 : 2 + n_keys]
    return q, k, v


def _bound(q, k, v, mask, scale):  # type: ignore[no-untyped-def]
    """The kernel computes in float32 whatever it stores (bf16 inputs convert exactly)."""
    return attention_bound(q, k, v, mask, scale, compute_dtype=torch.float32, output_dtype=q.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [16, 64, 128])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3)])
@pytest.mark.parametrize("n_keys", [1, 255, 256, 1000])
def test_kernel_equals_dense_reference(op, dtype, dim, heads, kv_heads, n_keys) -> None:  # type: ignore[no-untyped-def]
    q, k, v = _inputs(2, heads, kv_heads, n_keys, dim, dtype)
    scale = dim**-0.5
    got = op(q, k, v, None, scale)
    assert got.shape == (2, 1, heads, dim) and got.dtype == dtype and got.is_contiguous()
    assert_close(got, _reference(q, k, v, None, scale), _bound(q, k, v, None, scale))


def test_bound_is_tight_enough_to_see_a_wrong_key_head() -> None:
    """The bound must fail a kernel that pairs a query head with the wrong key/value head."""
    q, k, v = _inputs(2, 6, 3, 1000, 64, torch.float32)
    swapped = _reference(q, k.flip(1), v.flip(1), None, 0.125)
    with pytest.raises(AssertionError):
        assert_close(swapped, _reference(q, k, v, None, 0.125), _bound(q, k, v, None, 0.125))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_applies_masks_per_sequence_and_skips_fully_masked_chunks(op, dtype) -> None:  # type: ignore[no-untyped-def]
    q, k, v = _inputs(2, 6, 2, 700, 64, dtype, seed=1)
    hidden = torch.zeros(2, 700, dtype=torch.bool)
    hidden[0, :300] = True  # the whole first chunk of 256 keys and part of the second
    hidden[1, torch.randperm(700, generator=torch.Generator().manual_seed(2))[:500]] = True
    mask = torch.zeros(2, 1, 1, 700, dtype=dtype).masked_fill(hidden.view(2, 1, 1, 700), float("-inf"))
    expected = _reference(q, k, v, mask, 0.125)
    assert_close(op(q, k, v, mask, 0.125), expected, _bound(q, k, v, mask, 0.125))
    # A mask shared by the batch broadcasts.
    shared = mask[:1]
    assert_close(op(q, k, v, shared, 0.125), _reference(q, k, v, shared, 0.125), _bound(q, k, v, shared, 0.125))
    # Masked keys carry no weight: changing their values changes nothing.
    v_changed = v.clone()
    v_changed[0, :, :300] = 1e3
    assert torch.equal(op(q, k, v_changed, mask, 0.125), op(q, k, v, mask, 0.125))


def test_kernel_refuses_what_it_cannot_do(op) -> None:  # type: ignore[no-untyped-def]
    q, k, v = _inputs(1, 4, 2, 10, 64, torch.float32)
    with pytest.raises(RuntimeError, match="one query per sequence"):
        op(torch.cat([q, q], dim=2), k, v, None, 0.1)
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(q, k.bfloat16(), v.bfloat16(), None, 0.1)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        op(q[:, :3], k, v, None, 0.1)
    with pytest.raises(RuntimeError, match="mask must be"):
        op(q, k, v, torch.zeros(1, 1, 1, 9), 0.1)
    q48, k48, v48 = _inputs(1, 4, 2, 10, 48, torch.float32)
    assert not decode_kernel.applies(q48, k48)
    with pytest.raises(RuntimeError, match="unsupported head size"):
        op(q48, k48, v48, None, 0.1)


def test_kernel_is_skipped_when_disabled_or_not_applicable(monkeypatch: pytest.MonkeyPatch) -> None:
    from lminf_integrations.strategies.lm_infinite import attention

    q, k, _ = _inputs(1, 4, 2, 10, 64, torch.float32)
    assert attention._decode_op(q, k) is not None
    assert attention._decode_op(q.double(), k.double()) is None
    monkeypatch.setenv("LMINF_DECODE_KERNEL", "0")
    assert attention._decode_op(q, k) is None


def test_kernel_is_built_without_avx512_where_torch_runs_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """An AVX2-only CPU (or ``ATEN_CPU_CAPABILITY=avx2``) gets a build without AVX-512, under its own name."""
    from lminf_integrations import cpu

    native = decode_kernel.cflags()
    avx2 = cpu.CpuInfo("test CPU", frozenset({"avx2", "fma", "avx512f", "avx512_bf16"}), "AVX2")
    monkeypatch.setattr(decode_kernel, "cpu_info", lambda: avx2)
    assert "-mno-avx512f" in decode_kernel.cflags()
    assert not avx2.bf16_units and avx2.cpu_class == "AVX2"
    if cpu.cpu_info().avx512:
        assert "-mno-avx512f" not in native


def test_a_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """torch waits, silently and for ever, while its build folder's lock file exists: a build killed midway (Ctrl-C
    twice, SIGKILL, a power cut) left every later run hanging. A lock far older than any build is removed, with a
    warning; a young one (another process building now) is waited for as before."""
    import logging
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = decode_kernel.build_directory()
    assert folder.parent == tmp_path and folder.name == decode_kernel._build_name()  # torch's own folder
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"
    lock.touch()
    decode_kernel.clear_stale_lock()
    assert lock.exists()  # a build running now
    old = time.time() - 2 * decode_kernel.STALE_LOCK_SECONDS
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING, logger="lminf_integrations"):
        decode_kernel.clear_stale_lock()
    assert not lock.exists() and str(lock) in caplog.text


def test_the_build_finds_the_virtualenvs_ninja_without_an_activated_virtualenv(monkeypatch: pytest.MonkeyPatch) -> None:
    """``.venv/bin/lminf`` (as ``make demo`` runs it) has no ``.venv/bin`` on PATH: the ninja the package depends on
    sits there, and torch looks for it on PATH only."""
    import shutil

    monkeypatch.setenv("PATH", "/nonexistent")
    assert shutil.which("ninja") is None
    with decode_kernel.build_tools_on_path():
        found = shutil.which("ninja")
    assert found is not None and Path(found).parent in {Path(sys.executable).parent, Path(ninja.BIN_DIR)}
    assert os.environ["PATH"] == "/nonexistent"


def test_without_a_cpp_compiler_the_build_is_skipped_in_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No C++ compiler (none installed, or ``CXX`` naming none): one warning that says so, and decoding goes on with
    PyTorch's kernel; not torch's banner about an incompatible compiler, nor a ninja failure."""
    import logging

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with caplog.at_level(logging.WARNING):
        assert decode_kernel._build() is None
    ours = [r for r in caplog.records if r.name.startswith("lminf_integrations")]
    assert len(ours) == 1 and "no C++ compiler" in ours[0].getMessage() and "/nonexistent/c++" in ours[0].getMessage()
    assert not [r for r in caplog.records if r.name.startswith("torch")], caplog.text
