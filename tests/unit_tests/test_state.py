"""Document states: reuse in memory, automatic prefix reuse, persistence, corruption and mismatch refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations import LMInfiniteConfig
from lminf_integrations.engine import Engine, GenerationSettings
from lminf_integrations.state import StateStore, load_state, save_state

GREEDY = GenerationSettings(max_new_tokens=12)
CONFIGS = [
    LMInfiniteConfig(n_global=4, n_local=256, chunk_size=128),
    LMInfiniteConfig(n_global=4, n_local=256, chunk_size=128, cache="full", top_k=8, top_k_from_layer=1),
]


@pytest.fixture
def tiny(tiny_llama_with_real_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> tuple:
    model, tokenizer = tiny_llama_with_real_tokenizer
    return model.float(), tokenizer


def _engine(tiny: tuple, config: LMInfiniteConfig, **kwargs: object) -> Engine:
    return Engine(model=tiny[0], tokenizer=tiny[1], config=config, **kwargs)  # type: ignore[arg-type]


DOCUMENT = "Alice met Bob at the station. " * 60 + "The key is under the mat. " * 20  # ~900 tokens


@pytest.mark.parametrize("config", CONFIGS, ids=["window", "full-topk"])
def test_answers_from_a_state_equal_fresh_runs_and_leave_it_unchanged(tiny: tuple, config: LMInfiniteConfig) -> None:
    engine = _engine(tiny, config, reuse_prefixes=False)
    state = engine.encode_document(DOCUMENT)
    before = {name: t.clone() for name, t in state.cache.lambda_layers[0].tensors().items()}
    doc_ids = list(state.token_ids)
    for question in (" Where is the key?", " Who met Bob?"):
        ids = doc_ids + engine.tokenize(question)
        fresh = engine.generate(ids, GREEDY)
        reused = "".join(engine.stream(ids, GREEDY, state=state))
        assert reused == fresh and fresh
    assert state.token_ids == doc_ids
    after = state.cache.lambda_layers[0].tensors()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_automatic_prefix_reuse_hits_and_matches(tiny: tuple) -> None:
    engine = _engine(tiny, CONFIGS[0])
    plain = _engine(tiny, CONFIGS[0], reuse_prefixes=False)
    doc_ids = engine.tokenize(DOCUMENT)
    first = doc_ids + engine.tokenize(" Where is the key?")
    second = doc_ids + engine.tokenize(" Who met Bob at the station?")
    assert engine.generate(first, GREEDY) == plain.generate(first, GREEDY)
    assert engine.state_store is not None and engine.state_store.stats.misses == 1
    progress: list[tuple[int, int]] = []
    answer = engine.generate(second, GREEDY, on_progress=lambda d, t: progress.append((d, t)))
    assert answer == plain.generate(second, GREEDY)
    assert engine.state_store.stats.hits == 1
    assert progress[0][0] >= len(doc_ids) - 128  # started from the stored chunk boundary, not from 0


def test_state_store_respects_its_byte_bound(tiny: tuple) -> None:
    engine = _engine(tiny, CONFIGS[0], reuse_prefixes=False)
    one = engine.encode(engine.tokenize(DOCUMENT)[:300])
    store = StateStore(max_bytes=int(2.5 * one.cache.nbytes()))
    for n in (300, 310, 320, 330):
        store.put(engine.encode(engine.tokenize(DOCUMENT)[:n]))
        assert store.nbytes <= store.max_bytes
    assert len(store) == 2 and store.stats.evictions == 2
    assert store.lookup(engine.tokenize(DOCUMENT)[:325]) is not None  # the 320-token state: most recent fit
    assert store.lookup(engine.tokenize(DOCUMENT)[:305]) is None  # its state was evicted


@pytest.mark.parametrize("config", CONFIGS, ids=["window", "full-topk"])
def test_saved_state_reloads_and_answers_the_same(tiny: tuple, config: LMInfiniteConfig, tmp_path: Path) -> None:
    engine = _engine(tiny, config, reuse_prefixes=False)
    state = engine.encode_document(DOCUMENT)
    path = save_state(state, tmp_path / "doc.lminf", engine)
    loaded = load_state(path, engine)
    assert loaded.token_ids == state.token_ids
    ids = state.token_ids + engine.tokenize(" Where is the key?")
    assert "".join(engine.stream(ids, GREEDY, state=loaded)) == engine.generate(ids, GREEDY)


def test_mismatched_settings_and_damaged_files_are_refused(tiny: tuple, tmp_path: Path) -> None:
    engine = _engine(tiny, CONFIGS[0], reuse_prefixes=False)
    path = save_state(engine.encode_document(DOCUMENT), tmp_path / "doc.lminf", engine)
    other = _engine(tiny, LMInfiniteConfig(n_global=4, n_local=128, chunk_size=128), reuse_prefixes=False)
    with pytest.raises(ValueError, match="n_local"):
        load_state(path, other)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # flip bits inside the tensor data
    corrupt = tmp_path / "corrupt.lminf"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        load_state(corrupt, engine)
    truncated = tmp_path / "truncated.lminf"
    truncated.write_bytes(path.read_bytes()[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_state(truncated, engine)
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path / "missing.lminf", engine)
