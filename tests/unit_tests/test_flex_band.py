"""The local band as CUDA computes it (``ops.flex_band``: one FlexAttention call over a sliding-window block mask),
checked on the CPU, uncompiled: against exact float64 attention, then the whole LM-Infinite stack through the path a
CUDA device takes (the band through FlexAttention, every other part through ``plain_attention``, no CPU decoding
kernel) against the naive reference. The compiled CUDA kernels themselves are checked by ``python -m bench gpu``."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lminf_integrations.ops import flex_band, partial
from lminf_integrations.ops.partial import plain_attention
from tests import tolerances
from tests.unit_tests import test_attention
from tests.unit_tests.test_plain_attention import _exact, _lse_bound


def _band_mask(n_queries: int, n_keys: int, first_index: int, window: int) -> torch.Tensor:
    """Additive mask ``(Lq, Lk)``: row r (the query at key index first_index + r) sees the window up to its key."""
    rows = torch.arange(first_index, first_index + n_queries)[:, None]
    cols = torch.arange(n_keys)[None, :]
    seen = (cols <= rows) & (rows - cols < window)
    return torch.zeros(n_queries, n_keys).masked_fill_(~seen, -math.inf)


@pytest.mark.parametrize(
    "n_queries,n_keys,first_index,window",
    [
        (12, 12, 0, 5),  # a sequence's start: the window fills up
        (7, 30, 23, 8),  # a later chunk: keys before its windows are left out
        (200, 260, 60, 64),  # more rows and keys than one block of the mask
        (130, 130, 0, 300),  # a window wider than the sequence: plain causal attention
    ],
)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_band_is_exact_windowed_attention_with_its_log_sum_exp(
    n_queries: int, n_keys: int, first_index: int, window: int, heads: int, kv_heads: int
) -> None:
    generator = torch.Generator().manual_seed(n_queries + n_keys + window)
    q = torch.randn(1, heads, n_queries, 16, generator=generator)
    k = torch.randn(1, kv_heads, n_keys, 16, generator=generator)
    v = torch.randn(1, kv_heads, n_keys, 16, generator=generator)
    scale = 16**-0.5
    out, lse = flex_band.band(q, k, v, window, first_index, scale)
    assert out.shape == q.shape and lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    mask = _band_mask(n_queries, n_keys, first_index, window).expand(1, heads, n_queries, n_keys)
    expected, expected_lse, bound = _exact(q, k, v, mask, scale)
    tolerances.assert_close(out.double(), expected, bound)
    tolerances.assert_close(lse.double(), expected_lse, _lse_bound(q, k, expected_lse, scale))


def test_band_refuses_queries_past_the_keys() -> None:
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="queries up to key index 6, but 6 keys"):
        flex_band.band(q, k, k, 3, 3, 1.0)


def test_only_cuda_takes_the_flex_band_by_default() -> None:
    assert flex_band.applies(torch.device("cuda")) and not flex_band.applies(torch.device("cpu"))


@pytest.fixture
def cuda_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What runs on a CUDA device, on the CPU: the band through FlexAttention, every other partial attention
    through plain_attention, decoding without the CPU-only C++ kernel. Checks that the band did go through it."""
    calls = []

    def counted(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return plain_attention(*args)

    bands = []
    band = flex_band.band

    def counted_band(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        bands.append(1)
        return band(*args)

    monkeypatch.setattr(flex_band, "FLEX_ON_CPU", True)
    monkeypatch.setattr(flex_band, "band", counted_band)
    monkeypatch.setattr(partial, "PLAIN_ON_CPU", True)
    monkeypatch.setattr(partial, "plain_attention", counted)
    monkeypatch.setenv("LMINF_DECODE_KERNEL", "0")
    yield
    assert bands and calls


@pytest.mark.usefixtures("cuda_path")
@pytest.mark.parametrize("arch", test_attention.ARCHITECTURES)
@pytest.mark.parametrize("cache,top_k,distance_limit", [("window", 0, None), ("full", 2, 5)])
def test_lm_infinite_through_the_cuda_path_equals_the_reference(
    arch: str, cache: str, top_k: int, distance_limit: int | None
) -> None:
    test_attention.test_long_input_equals_naive_reference(arch, cache, top_k, distance_limit)
