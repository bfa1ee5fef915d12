"""Dual Chunk Attention on tiny random Llama, Mistral, Qwen2 and Qwen3 models (grouped-query attention): equal to
the unpatched model within one chunk, and to an independent dense reference of the three position maps for whole
prompts, chunked prefill and token-by-token decoding through transformers' cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations import (
    DCAConfig,
    LambdaCache,
    LMInfiniteConfig,
    is_patched,
    new_cache,
    patch_model,
    unpatch_model,
)
from lminf_integrations.engine import Engine
from lminf_integrations.hf_compat import cache_kwargs
from lminf_integrations.strategies.dca import DCA
from lminf_integrations.strategies.dca.attention import runs
from lminf_integrations.strategies.dca.cache import DCACache
from tests.unit_tests import dca_reference
from tests.unit_tests.test_attention import ARCHITECTURES, _close, _ids, _tiny

TRAINING_LENGTH = 64  # the tiny models'


def _reference(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    previous = model.config._attn_implementation
    model.set_attn_implementation(dca_reference.DCA_REFERENCE_NAME)
    try:
        return model(ids).logits
    finally:
        model.set_attn_implementation(previous)


def _prefill_then_decode(
    model: PreTrainedModel, ids: torch.Tensor, chunk: int, prompt: int, cache: DynamicCache | None = None
) -> torch.Tensor:
    """Logits of ``ids``: the prompt in chunks, then one token at a time, through ``cache`` (transformers' own by
    default)."""
    cache = cache if cache is not None else DynamicCache()
    pieces = [
        model(ids[:, start : min(start + chunk, prompt)], **cache_kwargs(cache)).logits
        for start in range(0, prompt, chunk)
    ]
    for position in range(prompt, ids.shape[1]):
        pieces.append(model(ids[:, position : position + 1], **cache_kwargs(cache)).logits)
    return torch.cat(pieces, dim=1)


def test_defaults_scale_with_the_training_length() -> None:
    assert DCAConfig().resolve(8192) == (6144, 2048)
    assert DCAConfig(chunk_size=100).resolve(8192) == (100, 8092)
    assert DCAConfig(chunk_size=100, local_window=10).resolve(8192) == (100, 10)
    with pytest.raises(ValueError, match="exceeds the model's training length 64"):
        DCAConfig(chunk_size=60, local_window=8).resolve(64)
    with pytest.raises(ValueError, match=r"dca_chunk_size \(DCAConfig.chunk_size\) must be None or an int >= 1"):
        DCAConfig(chunk_size=0)


def test_runs_split_queries_where_their_keys_change() -> None:
    # chunks of 10, local window 4: offsets 0-3 of chunk 1 see chunk 0 ordinarily; 4-9 see only their own chunk.
    assert list(runs(0, 25, 10, 4)) == [(0, 10, 0), (10, 14, 0), (14, 20, 10), (20, 24, 10), (24, 25, 20)]
    assert list(runs(12, 13, 10, 4)) == [(12, 13, 0)]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.no_grad()
def test_equals_unpatched_within_one_chunk(arch: str) -> None:
    model = _tiny(arch)
    ids = _ids(40)
    vanilla = model(ids).logits
    patch_model(model, DCAConfig())  # chunks of 48 tokens
    _close(model(ids).logits, vanilla)
    _close(_prefill_then_decode(model, ids, chunk=7, prompt=33), vanilla)
    unpatch_model(model)
    assert not is_patched(model) and (model(ids).logits - vanilla).abs().max() == 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("chunk_size,local_window", [(None, None), (12, 4), (10, 0), (16, 16)])
@torch.no_grad()
def test_long_input_equals_the_dense_reference(arch: str, chunk_size: int | None, local_window: int | None) -> None:
    model = _tiny(arch)
    patch_model(model, DCAConfig(chunk_size=chunk_size, local_window=local_window))
    ids = _ids(110, seed=2)  # past the 64-token training length, several chunks
    expected = _reference(model, ids)
    _close(model(ids).logits, expected, "whole prompt")
    _close(_prefill_then_decode(model, ids, chunk=9, prompt=100), expected, "chunked prefill, then decoding")
    # The strategy's own cache keeps the keys at their chunk offsets: the same logits.
    dca_cache = DCA(DCAConfig(chunk_size=chunk_size, local_window=local_window)).new_cache(model)
    _close(_prefill_then_decode(model, ids, chunk=9, prompt=100, cache=dca_cache), expected, "DCA cache")
    assert dca_cache.get_seq_length() == ids.shape[1]


@torch.no_grad()
def test_new_cache_gives_the_cache_of_the_attention_the_model_runs() -> None:
    # README's recipe, patch_model(model, config) then generate(..., cache=new_cache(model)), works for
    # either config: DCA gets its own cache (keys at their chunk offsets), Λ-attention its bounded one.
    model = _tiny("qwen2")
    ids = _ids(90, seed=4)
    patch_model(model, DCAConfig(chunk_size=12, local_window=4))
    cache = new_cache(model)
    assert isinstance(cache, DCACache)
    _close(_prefill_then_decode(model, ids, chunk=11, prompt=70, cache=cache), _reference(model, ids))
    patch_model(model, LMInfiniteConfig(n_global=4, n_local=32))
    assert isinstance(new_cache(model), LambdaCache)
    unpatch_model(model)
    with pytest.raises(ValueError, match="not patched"):
        new_cache(model)


@torch.no_grad()
def test_switching_between_attentions_restores_the_model() -> None:
    model = _tiny("llama")
    ids = _ids(80, seed=3)
    vanilla = model(ids).logits
    patch_model(model, LMInfiniteConfig(n_global=4, n_local=32))
    lambda_logits = model(ids).logits
    patch_model(model, DCAConfig(chunk_size=12, local_window=4))
    _close(model(ids).logits, _reference(model, ids))
    patch_model(model, LMInfiniteConfig(n_global=4, n_local=32))
    assert (model(ids).logits - lambda_logits).abs().max() == 0
    unpatch_model(model)
    assert (model(ids).logits - vanilla).abs().max() == 0


@torch.no_grad()
def test_the_engine_with_strategy_dca_encodes_and_answers_as_the_reference(
    default_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """Engine(strategy="dca"): chunked prefill into its cache, the state saved and loaded, then the next token's
    logits; all equal to the dense reference over the whole sequence."""
    model = _tiny("qwen2")
    engine = Engine(
        model=model,
        tokenizer=default_tokenizer,
        strategy="dca",
        dca=DCAConfig(chunk_size=12, local_window=4),
        config=LMInfiniteConfig(chunk_size=7),  # the engine's prefill chunk, not DCA's
        reuse_prefixes=False,
    )
    ids = _ids(90, seed=4)
    state = engine.encode(ids[0, :-1].tolist())
    expected = _reference(model, ids)[:, -1]
    _close(model(ids[:, -1:], **cache_kwargs(state.cache.clone())).logits[:, -1], expected, "after encode")
    loaded = engine.load_state(engine.save_state(state, tmp_path / "dca.lminf"))
    _close(model(ids[:, -1:], **cache_kwargs(loaded.cache)).logits[:, -1], expected, "after save and load")
    other = Engine(model=model, tokenizer=default_tokenizer, strategy="dca", dca=DCAConfig(chunk_size=10))
    with pytest.raises(ValueError, match="dca_chunk_size: file 12, now 10.*use its settings"):
        other.load_state(tmp_path / "dca.lminf")
    assert engine.options.strategy == "dca" and engine.strategy.settings() == {
        "dca_chunk_size": 12,
        "dca_local_window": 4,
    }
