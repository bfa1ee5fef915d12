"""Partial attentions as CUDA computes them (``ops.flex``: LM-Infinite's band in one FlexAttention call over a
sliding-window block mask, unmasked and causal calls of several queries through FlexAttention too), checked on the
CPU, uncompiled: against exact float64 attention, then the LM-Infinite and Dual Chunk Attention stacks through the
path a CUDA device takes (those through FlexAttention, every other part through ``plain_attention``, no CPU decoding
kernel) against their references. The compiled CUDA kernels themselves are checked by ``python -m bench gpu``."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lminf_integrations.ops import flex, partial
from lminf_integrations.ops.partial import plain_attention
from lminf_integrations.strategies.lm_infinite import attention as lm_attention
from tests import tolerances
from tests.unit_tests import test_attention, test_dca
from tests.unit_tests.test_plain_attention import _exact, _lse_bound, grouped_case


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
    out, lse = flex.band(q, k, v, window, first_index, scale)
    assert out.shape == q.shape and lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    mask = _band_mask(n_queries, n_keys, first_index, window).expand(1, heads, n_queries, n_keys)
    expected, expected_lse, bound = _exact(q, k, v, mask, scale)
    tolerances.assert_close(out.double(), expected, bound)
    tolerances.assert_close(lse.double(), expected_lse, _lse_bound(q, k, expected_lse, scale))


@pytest.mark.parametrize("n_queries,n_keys", [(5, 5), (7, 19), (140, 140)])
@pytest.mark.parametrize("causal", [False, True])
def test_unmasked_and_causal_calls_are_exact_with_their_log_sum_exp(n_queries: int, n_keys: int, causal: bool) -> None:
    case = grouped_case(n_queries, n_keys, causal)
    out, lse = flex.attention(case.q, case.k, case.v, causal, case.scale)
    tolerances.assert_close(out.double(), case.expected, case.bound)
    tolerances.assert_close(lse.double(), case.expected_lse, case.lse_bound)


def test_band_refuses_queries_past_the_keys() -> None:
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="queries up to key index 6, but 6 keys"):
        flex.band(q, k, k, 3, 3, 1.0)


def test_only_cuda_takes_flex_attention_by_default() -> None:
    assert flex.applies(torch.device("cuda")) and not flex.applies(torch.device("cpu"))


@pytest.fixture
def cuda_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What runs on a CUDA device, on the CPU: the band and other calls of several queries without a mask through
    FlexAttention, a decoding step over a full window through scaled_dot_product_attention, every other partial
    attention through plain_attention, no CPU-only C++ decoding kernel. Checks afterwards that they were used."""
    calls = []

    def counted(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return plain_attention(*args)

    flexed = []
    attend = flex._attend

    def counted_flex(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        flexed.append(1)
        return attend(*args)

    fused = []
    one_softmax = lm_attention._fused_one_softmax

    def counted_fused(*args: Any) -> torch.Tensor:
        fused.append(1)
        return one_softmax(*args)

    monkeypatch.setattr(flex, "FLEX_ON_CPU", True)
    monkeypatch.setattr(flex, "_attend", counted_flex)
    monkeypatch.setattr(lm_attention, "_fused_one_softmax", counted_fused)
    monkeypatch.setattr(partial, "PLAIN_ON_CPU", True)
    monkeypatch.setattr(partial, "plain_attention", counted)
    monkeypatch.setenv("LMINF_DECODE_KERNEL", "0")
    yield
    assert flexed and (calls or fused)  # decoding over a full window takes the fused call, not plain_attention


# Each stack's own reference test, run through the CUDA path: LM-Infinite with a window cache (decoding over a
# full window), with the full cache and top-k keys, and Dual Chunk Attention (12-token chunks, a 4-token window).
STACKS = {
    "lm-infinite, window": lambda arch: test_attention.test_long_input_equals_naive_reference(arch, "window", 0, None),
    "lm-infinite, full, top-k": lambda arch: test_attention.test_long_input_equals_naive_reference(arch, "full", 2, 5),
    "dca": lambda arch: test_dca.test_long_input_equals_the_dense_reference(arch, 12, 4),
}


@pytest.fixture
def default_device_elsewhere() -> Iterator[None]:
    """While a model runs, tensors made without ``device=`` go to the ``meta`` device, where they cannot meet the
    model's CPU tensors: on the CPU, the same failure a tensor left on the CPU meets in a model on a GPU."""
    from torch.nn.modules import module as nn_module
    from transformers import PreTrainedModel

    depth, entered = [0], []

    def enter(module: torch.nn.Module, args: Any) -> None:
        if isinstance(module, PreTrainedModel):
            depth[0] += 1
            if depth[0] == 1:
                torch.set_default_device("meta")
                entered.append(module)

    def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
        if isinstance(module, PreTrainedModel):
            depth[0] -= 1
            if depth[0] == 0:
                torch.set_default_device(None)

    handles = [nn_module.register_module_forward_pre_hook(enter),
               nn_module.register_module_forward_hook(leave, always_call=True)]  # fmt: skip
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        torch.set_default_device(None)
    assert entered  # the model ran with the default device elsewhere


@pytest.mark.usefixtures("cuda_path", "default_device_elsewhere")
@pytest.mark.parametrize("arch", test_attention.ARCHITECTURES)
@pytest.mark.parametrize("stack", sorted(STACKS))
def test_every_attention_through_the_cuda_path_equals_its_reference(stack: str, arch: str) -> None:
    """Exact, and every tensor the stacks and the dense references create follows the layer's inputs (on a GPU, one
    made on the default device, the CPU, would raise "Expected all tensors to be on the same device")."""
    STACKS[stack](arch)


def test_the_log_sum_exp_is_asked_for_as_the_installed_torch_wants() -> None:
    """``return_lse`` is deprecated (for removal) where torch has ``AuxRequest``: a torch that drops it must not break
    the CUDA path, so no deprecation warning may come from asking for the log-sum-exp."""
    import warnings

    q, k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out, lse = flex.band(q, k, v, 4, 0, 0.25)
    assert lse.shape == (1, 2, 8)


def test_where_flex_attention_does_not_compile_attention_falls_back_to_exact_unfused_kernels(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A GPU whose torch cannot compile FlexAttention (no Triton, an older GPU) must still get exact attention: the
    first compile error is logged once with its cause, that call is computed without FlexAttention, and later calls
    do not try again. The compile error here is a real one: inductor's CPU lowering of FlexAttention cannot return
    the log-sum-exp (``ops/flex.py``)."""
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(flex, "FLEX_ON_CPU", True)
    monkeypatch.setattr(flex, "COMPILE_FAILURE", None)
    compiled = torch.compile(flex_attention)
    calls = []

    def compiled_and_counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return compiled(*args, **kwargs)

    monkeypatch.setattr(flex, "flex_attention", compiled_and_counted)
    try:
        with caplog.at_level(logging.WARNING, logger="lminf_integrations"):
            STACKS["lm-infinite, window"]("llama")
            STACKS["dca"]("qwen2")
    finally:
        torch._dynamo.reset()
    assert flex.COMPILE_FAILURE, "this torch compiles it on a CPU: the test needs another real compile error"
    assert len(calls) == 1  # the first call failed to compile; no call tried again
    assert not flex.applies(torch.device("cuda"))
    warned = [r.getMessage() for r in caplog.records if "FlexAttention" in r.getMessage()]
    assert len(warned) == 1 and "InductorError" in warned[0], warned
