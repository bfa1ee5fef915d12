"""The attention XL3M answers with (``ops.cached_causal``): the model's own causal attention, computed by two fused
CPU calls when a chunk continues a cache; equal to transformers' SDPA on four architectures, and SDPA itself for
any mask that is not plain causal."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, PreTrainedModel

from lminf_integrations.config import XL3MConfig
from lminf_integrations.hf_compat import cache_kwargs
from lminf_integrations.ops import cached_causal, partial
from lminf_integrations.strategies.vanilla import FullCache, Vanilla
from lminf_integrations.strategies.xl3m.strategy import XL3M
from tests.tolerances import network_bound
from tests.unit_tests.test_attention import ARCHITECTURES, LAYERS, REDUCTION, _common, _ids, _tiny


def _logits(model: PreTrainedModel, implementation: str, ids: torch.Tensor, cached: int) -> torch.Tensor:
    """Logits of ``ids[cached:]`` read as one chunk after ``ids[:cached]`` (read first, into a cache), then the
    next token alone, with ``implementation``."""
    model.set_attn_implementation(implementation)
    cache = FullCache()
    pieces = []
    with torch.inference_mode():
        if cached:
            pieces.append(model(ids[:, :cached], use_cache=True, **cache_kwargs(cache)).logits)
        pieces.append(model(ids[:, cached:-1], use_cache=True, **cache_kwargs(cache)).logits)
        pieces.append(model(ids[:, -1:], use_cache=True, **cache_kwargs(cache)).logits)
    model.set_attn_implementation("sdpa")
    return torch.cat(pieces, dim=1)


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the fused kernel ran (to know the fast path was taken, not only that results agree)."""
    calls = [0]
    original = partial.flash

    def counting(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls[0] += 1
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cached_causal, "flash", counting)
    return calls


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("cached", [0, 17])
def test_equals_sdpa_for_a_chunk_after_a_cache(arch: str, cached: int, fused_calls: list[int]) -> None:
    model = _tiny(arch)
    ids = _ids(40)
    expected = _logits(model, "sdpa", ids, cached)
    got = _logits(model, cached_causal.CACHED_CAUSAL, ids, cached)
    assert fused_calls[0] > 0
    bound = network_bound(expected, torch.float32, REDUCTION, LAYERS)
    assert (got - expected).abs().max() <= bound


def test_any_other_mask_goes_to_sdpa_unchanged(fused_calls: list[int]) -> None:
    """A padded batch and a sliding window shorter than the keys: not plain causal, so exactly SDPA's results."""
    model = _tiny("llama")
    ids = torch.cat([_ids(12, seed=1), _ids(12, seed=2)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    outputs = []
    for implementation in ("sdpa", cached_causal.CACHED_CAUSAL):
        model.set_attn_implementation(implementation)
        with torch.inference_mode():
            outputs.append(model(ids, attention_mask=mask).logits)
    assert torch.equal(outputs[0], outputs[1]) and fused_calls[0] == 0

    torch.manual_seed(0)
    windowed = MistralForCausalLM(MistralConfig(**_common(), sliding_window=6)).eval()
    ids = _ids(30)
    expected = _logits(windowed, "sdpa", ids, 10)
    got = _logits(windowed, cached_causal.CACHED_CAUSAL, ids, 10)
    assert torch.equal(got, expected)


def test_xl3m_uses_it_and_vanilla_gives_the_models_own_back() -> None:
    model = _tiny("qwen2")
    before = model.config._attn_implementation
    XL3M(XL3MConfig(segment_tokens=16)).prepare(model)
    assert model.config._attn_implementation == cached_causal.CACHED_CAUSAL
    Vanilla().prepare(model)
    assert model.config._attn_implementation == before
