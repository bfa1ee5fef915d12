"""The attention path for devices without PyTorch's CPU flash kernel (``ops.partial.plain_attention``), checked on
the CPU: against exact float64 attention and the CPU kernel, then the whole LM-Infinite and Dual Chunk Attention
stacks through it against their dense references (the path a GPU takes until issue 19 measures a faster kernel)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from lminf_integrations.ops import partial
from lminf_integrations.ops.partial import combine, plain_attention
from tests import tolerances
from tests.unit_tests import test_attention, test_dca


def _exact(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 attention with an explicit additive mask ``(B, H, Lq, Lk)``: output, log-sum-exp, and the per-element
    bound (``tests.tolerances.attention_bound``, one query row at a time) of a float32 computation."""
    group = q.shape[1] // k.shape[1]
    k64, v64 = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    logits = q.double() @ k64.transpose(-1, -2) * scale + mask.double()
    lse = torch.logsumexp(logits, -1)
    out = torch.nan_to_num(logits.softmax(-1)) @ v64
    bounds = []
    for row in range(q.shape[2]):  # attention_bound takes one query per sequence
        bounds.append(
            tolerances.attention_bound(q[:, :, row : row + 1], k, v, mask[:, :, row : row + 1], scale, torch.float32,
                                       torch.float32)  # fmt: skip
        )
    return out, lse, torch.cat(bounds, dim=1).transpose(1, 2)


def _lse_bound(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """|Δ logsumexp| <= the largest logit error + the exp-sum's relative error + rounding the result."""
    group = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(group, 1)
    magnitudes = q.double().abs() @ k64.abs().transpose(-1, -2)
    logit_error = tolerances.sum_bound(torch.float32, q.shape[-1]) * scale * magnitudes
    u = tolerances.unit_roundoff(torch.float32)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (
        logit_error.amax(-1)
        + tolerances.sum_bound(torch.float32, k.shape[-2])
        + tolerances.EXP_ULPS * u
        + u * finite.abs()
    )


@dataclass
class Case:
    """Random grouped-query inputs (6 query heads, 2 key heads) and the exact float64 output and log-sum-exp, with
    the bounds a float32 computation stays within (:func:`_exact`, :func:`_lse_bound`)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    expected: torch.Tensor
    bound: torch.Tensor
    expected_lse: torch.Tensor
    lse_bound: torch.Tensor


def grouped_case(n_queries: int, n_keys: int, causal: bool) -> Case:
    """A :class:`Case`; ``causal``: query i sees keys 0..i (top-left aligned)."""
    generator = torch.Generator().manual_seed(n_queries * 100 + n_keys)
    q = torch.randn(2, 6, n_queries, 16, generator=generator)
    k, v = torch.randn(2, 2, n_keys, 16, generator=generator), torch.randn(2, 2, n_keys, 16, generator=generator)
    scale = 16**-0.5
    mask = torch.zeros(2, 6, n_queries, n_keys)
    if causal:
        mask.masked_fill_(torch.ones(n_queries, n_keys, dtype=torch.bool).triu(1), -math.inf)
    expected, expected_lse, bound = _exact(q, k, v, mask, scale)
    return Case(q, k, v, scale, expected, bound, expected_lse, _lse_bound(q, k, expected_lse, scale))


@pytest.mark.parametrize("n_queries,n_keys", [(5, 5), (7, 19), (40, 40)])
@pytest.mark.parametrize("causal", [False, True])
def test_plain_attention_is_exact_attention_with_its_log_sum_exp(n_queries: int, n_keys: int, causal: bool) -> None:
    case = grouped_case(n_queries, n_keys, causal)
    q, k, v, scale = case.q, case.k, case.v, case.scale
    out, lse = plain_attention(q, k, v, causal, None, scale)
    tolerances.assert_close(out.double(), case.expected, case.bound)
    tolerances.assert_close(lse.double(), case.expected_lse, case.lse_bound)
    # The same contract as PyTorch's CPU kernel (which the CPU uses): outputs agree to both computations' rounding.
    kernel_out, kernel_lse = partial._cpu_flash(q, k, v, 0.0, causal, scale=scale)[:2]
    tolerances.assert_close(out.double(), kernel_out.double(), 2 * case.bound)
    tolerances.assert_close(lse.double(), kernel_lse.double(), 2 * case.lse_bound)
    assert out.transpose(1, 2).is_contiguous()  # (B, Lq, H, D) memory, as the CPU kernel writes


def test_masked_rows_and_small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rows that see no key weigh nothing when parts are merged; blocking the rows changes nothing.
    generator = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 4, 9, 8, generator=generator) for _ in range(3))
    mask = torch.zeros(1, 1, 9, 9)
    mask[..., 2, :] = -math.inf  # row 2 sees nothing here
    out, lse = plain_attention(q, k, v, False, mask, 0.3)
    assert torch.isneginf(lse[..., 2]).all() and (out[:, :, 2] == 0).all()
    monkeypatch.setattr(partial, "_BLOCK_ELEMENTS", 1)  # one row at a time: other matrix shapes, other rounding
    blocked_out, blocked_lse = plain_attention(q, k, v, False, mask, 0.3)
    seen = [row for row in range(9) if row != 2]
    expected, expected_lse, bound = _exact(q[:, :, seen], k, v, mask[:, :, seen].expand(1, 4, 8, 9), 0.3)
    tolerances.assert_close(blocked_out[:, :, seen].double(), expected, bound)
    lse_bound = _lse_bound(q[:, :, seen], k, expected_lse, 0.3)
    tolerances.assert_close(blocked_lse[..., seen].double(), expected_lse, lse_bound)
    assert torch.isneginf(blocked_lse[..., 2]).all() and (blocked_out[:, :, 2] == 0).all()
    # Merged with a part that does see keys, row 2 takes that part's output alone.
    other = plain_attention(q, k, v, False, None, 0.3)
    merged = combine([other, (out, lse)], [], torch.float32)
    assert torch.equal(merged[:, 2], other[0][:, :, 2])  # weight exp(0) = 1 for it, exactly 0 for the empty row


def test_a_row_that_sees_no_key_weighs_nothing_through_the_fused_kernel_too() -> None:
    """PyTorch's CPU kernel gives a row that sees no key a log-sum-exp of 0 (and a zero output): merged as it is,
    that row's other part would be scaled by 1/(1 + e^-lse). ``flash`` keeps plain_attention's contract on every
    device: -inf there, so the row takes its other part's output alone."""
    generator = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=generator) for _ in range(3))
    seen = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    seen[0, :, 3] = False  # row 3 of the first sequence sees nothing
    mask = torch.zeros(seen.shape).masked_fill_(~seen, -math.inf)
    out, lse = partial.flash(q, k, v, attn_mask=mask, scale=0.3)
    assert torch.isneginf(lse[0, :, 3]).all() and (out[0, :, 3] == 0).all()
    assert torch.isfinite(lse[1]).all() and torch.isfinite(lse[0, :, :3]).all()
    other = partial.flash(q, k, v, is_causal=True, scale=0.3)
    merged = combine([other, (out, lse)], [], torch.float32)
    assert torch.equal(merged[0, 3], other[0][0, :, 3])


@pytest.fixture
def plain_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every partial attention through plain_attention, and decoding without the CPU-only C++ kernel: what runs on a
    device other than the CPU. Checks afterwards that the test did go through it."""
    calls = []

    def counted(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return plain_attention(*args)

    monkeypatch.setattr(partial, "PLAIN_ON_CPU", True)
    monkeypatch.setattr(partial, "plain_attention", counted)
    monkeypatch.setenv("LMINF_DECODE_KERNEL", "0")
    yield
    assert calls


@pytest.mark.usefixtures("plain_path")
@pytest.mark.parametrize("arch", test_attention.ARCHITECTURES)
@pytest.mark.parametrize("cache,top_k,distance_limit", [("window", 0, None), ("full", 2, 5)])
def test_lm_infinite_through_the_plain_path_equals_the_reference(
    arch: str, cache: str, top_k: int, distance_limit: int | None
) -> None:
    test_attention.test_long_input_equals_naive_reference(arch, cache, top_k, distance_limit)


@pytest.mark.usefixtures("plain_path")
@pytest.mark.parametrize("arch", test_attention.ARCHITECTURES)
def test_dca_through_the_plain_path_equals_the_reference(arch: str) -> None:
    test_dca.test_long_input_equals_the_dense_reference(arch, 12, 4)
