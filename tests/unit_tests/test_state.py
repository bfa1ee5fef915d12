"""Document states: reuse in memory, automatic prefix reuse, persistence, corruption and mismatch refusal."""

from __future__ import annotations

import ast
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations import LMInfiniteConfig, new_cache
from lminf_integrations import state as state_module
from lminf_integrations.engine import Engine, GenerationSettings
from lminf_integrations.state import DocumentState, StateStore

GREEDY = GenerationSettings(max_new_tokens=12)
CONFIGS = [
    LMInfiniteConfig(n_global=4, n_local=256, chunk_size=128),
    LMInfiniteConfig(n_global=4, n_local=256, chunk_size=128, cache_mode="full", top_k=8, top_k_from_layer=1),
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
    before = {name: t.clone() for name, t in state.cache.state_tensors()[0].items()}
    doc_ids = list(state.token_ids)
    for question in (" Where is the key?", " Who met Bob?"):
        ids = doc_ids + engine.tokenize(question)
        fresh = engine.generate(ids, GREEDY)
        reused = "".join(engine.stream(ids, GREEDY, state=state))
        assert reused == fresh and fresh
    assert state.token_ids == doc_ids
    after, _ = state.cache.state_tensors()
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


def test_a_state_larger_than_the_store_is_counted_and_said_once(
    tiny: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    """A store too small for any state never hits; the user is told why once, not left to guess from the misses."""
    engine = _engine(tiny, CONFIGS[0], reuse_prefixes=False)
    one = engine.encode(engine.tokenize(DOCUMENT)[:300])
    store = StateStore(max_bytes=one.cache.nbytes() - 1)
    with caplog.at_level(logging.INFO, logger="lminf_integrations.state"):
        store.put(one)
        store.put(engine.encode(engine.tokenize(DOCUMENT)[:310]))
    assert len(store) == 0 and store.stats.too_large == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "max_bytes" in warnings[0].getMessage()


@pytest.mark.parametrize("config", CONFIGS, ids=["window", "full-topk"])
def test_saved_state_reloads_and_answers_the_same(tiny: tuple, config: LMInfiniteConfig, tmp_path: Path) -> None:
    engine = _engine(tiny, config, reuse_prefixes=False)
    state = engine.encode_document(DOCUMENT)
    path = engine.save_state(state, tmp_path / "doc.lminf")
    loaded = engine.load_state(path)
    assert loaded.token_ids == state.token_ids
    ids = state.token_ids + engine.tokenize(" Where is the key?")
    assert "".join(engine.stream(ids, GREEDY, state=loaded)) == engine.generate(ids, GREEDY)


def test_a_document_shorter_than_the_window_saves_only_what_it_filled(tiny: tuple, tmp_path: Path) -> None:
    """A window cache holds n_global + n_local slots from its first token; a state saves the slots written, and
    the loaded one continues past the point where the window fills, as the unsaved one does."""
    config = CONFIGS[0]
    engine = _engine(tiny, config, reuse_prefixes=False)
    ids = engine.tokenize(DOCUMENT)[:200]
    path = engine.save_state(engine.encode(ids), tmp_path / "short.lminf")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_slice("layer.0.keys").get_shape()[-2] == config.n_global + 200
        assert handle.get_slice("layer.0.values").get_shape()[-2] == config.n_global + 200
    loaded = engine.load_state(path)
    question = ids + engine.tokenize(" Where is the key?")
    long_answer = GenerationSettings(max_new_tokens=config.n_local - len(question) + 20)  # past the full window
    assert "".join(engine.stream(question, long_answer, state=loaded)) == engine.generate(question, long_answer)


def test_a_write_that_fails_midway_is_an_os_error_and_leaves_nothing(
    tiny: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fills up during the write: safetensors' own error becomes an ``OSError`` naming the state's path
    (the command line's one-line errors catch those), and no partial file stays behind."""
    engine = _engine(tiny, CONFIGS[0], reuse_prefixes=False)
    state = engine.encode(engine.tokenize(DOCUMENT)[:50])

    def disk_full(tensors: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"half a state")
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(state_module, "save_file", disk_full)
    with pytest.raises(OSError, match="cannot write .*doc.lminf.*No space left"):
        engine.save_state(state, tmp_path / "doc.lminf")
    assert list(tmp_path.iterdir()) == []


def test_state_files_are_made_with_the_users_file_mode(tiny: tuple, tmp_path: Path) -> None:
    """As any file the user writes: readable by others when the umask allows it (safetensors' temporary file's
    0600 is not kept); a file saved over keeps its mode."""
    engine = _engine(tiny, CONFIGS[0], reuse_prefixes=False)
    state = engine.encode(engine.tokenize(DOCUMENT)[:50])
    old = os.umask(0o022)
    try:
        path = engine.save_state(state, tmp_path / "doc.lminf")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    path.chmod(0o600)  # a file the user made private stays private when saved over
    assert stat.S_IMODE(engine.save_state(state, path).stat().st_mode) == 0o600


def test_mismatched_settings_and_damaged_files_are_refused(tiny: tuple, tmp_path: Path) -> None:
    engine = _engine(tiny, CONFIGS[0], reuse_prefixes=False)
    path = engine.save_state(engine.encode_document(DOCUMENT), tmp_path / "doc.lminf")
    other = _engine(tiny, LMInfiniteConfig(n_global=4, n_local=128, chunk_size=128), reuse_prefixes=False)
    with pytest.raises(ValueError, match="n_local") as refused:
        other.load_state(path)
    # The setting that differs, both values, and how to read the file; not every setting of the strategy.
    message = str(refused.value)
    assert "n_local: file 256, now 128" in message and "n_local=256" in message and "n_global" not in message
    assert "--n-local 256" in message  # the command line's spelling too
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # flip bits inside the tensor data
    corrupt = tmp_path / "corrupt.lminf"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        engine.load_state(corrupt)
    truncated = tmp_path / "truncated.lminf"
    truncated.write_bytes(path.read_bytes()[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        engine.load_state(truncated)
    with pytest.raises(FileNotFoundError):
        engine.load_state(tmp_path / "missing.lminf")



def test_a_state_of_another_strategy_is_refused_naming_the_strategy_only(tiny: tuple, tmp_path: Path) -> None:
    xl3m = Engine(model=tiny[0], tokenizer=tiny[1], strategy="xl3m", reuse_prefixes=False)
    path = xl3m.save_state(xl3m.encode_document(DOCUMENT), tmp_path / "doc.lminf")
    with pytest.raises(ValueError, match="strategy: file 'xl3m', now 'lm-infinite'") as refused:
        _engine(tiny, CONFIGS[0]).load_state(path)
    assert "strategy='xl3m'" in str(refused.value)
    assert "segment_tokens" not in str(refused.value) and "config" not in str(refused.value)


@torch.no_grad()
def test_a_state_belongs_to_the_models_weights_not_its_name(tiny: tuple, tmp_path: Path) -> None:
    """A model saved again over the same folder (a fine-tune) reads the document differently: its states are
    refused. The same weights under another name (a folder moved or copied) read it the same: accepted."""
    import copy

    model, tokenizer = tiny
    model = copy.deepcopy(model)
    model.config.name_or_path = "/models/tiny-v1"
    engine = Engine(model=model, tokenizer=tokenizer, config=CONFIGS[0], reuse_prefixes=False)
    path = engine.save_state(engine.encode_document(DOCUMENT), tmp_path / "doc.lminf")
    moved = copy.deepcopy(model)
    moved.config.name_or_path = "/somewhere/else"
    assert Engine(model=moved, tokenizer=tokenizer, config=CONFIGS[0]).load_state(path).token_ids
    tuned = copy.deepcopy(model)
    for parameter in tuned.parameters():
        parameter.add_(torch.randn_like(parameter) * 1e-3)
    with pytest.raises(ValueError, match="weights") as refused:
        Engine(model=tuned, tokenizer=tokenizer, config=CONFIGS[0]).load_state(path)
    # Named by the model the file was encoded with, not by two fingerprints.
    assert "'/models/tiny-v1'" in str(refused.value) and "sha256" not in str(refused.value)
    # dtype="auto" picks bf16 on one CPU and fp32 on another: said as the setting to pass.
    halved = copy.deepcopy(model).to(torch.bfloat16)
    with pytest.raises(ValueError, match="dtype: file 'fp32', now 'bf16'.*settings \\(dtype='fp32'; --dtype fp32"):
        Engine(model=halved, tokenizer=tokenizer, config=CONFIGS[0]).load_state(path)


def test_files_of_the_previous_format_are_refused_by_their_format(tiny: tuple, tmp_path: Path) -> None:
    """Format 1 named the cache setting ``cache``: such a file is refused for its format, not as other settings."""
    engine = _engine(tiny, CONFIGS[0], reuse_prefixes=False)
    path = engine.save_state(engine.encode_document(DOCUMENT), tmp_path / "doc.lminf")
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads((handle.metadata() or {})["lminf"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    header["format"] = "lminf-state/1"
    old = tmp_path / "old.lminf"
    save_file(tensors, str(old), metadata={"lminf": json.dumps(header)})
    with pytest.raises(ValueError, match="state format 'lminf-state/1'.*encode the document again"):
        engine.load_state(old)


def _header_and_tensors(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        return json.loads((handle.metadata() or {})["lminf"]), {name: handle.get_tensor(name) for name in handle.keys()}


def _with_header(path: Path, tensors: dict[str, torch.Tensor], header: dict | str) -> Path:
    save_file(tensors, str(path), metadata={"lminf": header if isinstance(header, str) else json.dumps(header)})
    return path


@pytest.mark.parametrize(
    "damage",
    ["seen", "top_k_from_position", "n_tokens", "no data_sha256", "no layers", "strategy removed", "not json"],
)
def test_a_damaged_header_is_refused_as_corrupt(tiny: tuple, tmp_path: Path, damage: str) -> None:
    """The header is checked as the data is: an edited position, count or checksum, a missing field or JSON that
    does not parse is refused, naming the file, never loaded (a shifted ``seen`` would misplace every key) or
    raised as a bare ``KeyError``."""
    engine = _engine(tiny, CONFIGS[1], reuse_prefixes=False)
    header, tensors = _header_and_tensors(engine.save_state(engine.encode_document(DOCUMENT), tmp_path / "d.lminf"))
    edited: dict | str = header
    if damage in ("seen", "top_k_from_position"):
        for layer in header["layers"]:
            layer[damage] = (layer[damage] or 0) + 100
    elif damage == "n_tokens":
        header["n_tokens"] = 5
    elif damage.startswith("no "):
        del header[damage[3:]]
    elif damage == "strategy removed":
        del header["strategy"]
    else:
        edited = json.dumps(header)[:-10] + "{,"
    path = _with_header(tmp_path / "damaged.lminf", tensors, edited)
    with pytest.raises(ValueError, match=r"damaged\.lminf is corrupt: its header"):
        engine.load_state(path)


def test_a_file_of_a_newer_format_says_to_upgrade(tiny: tuple, tmp_path: Path) -> None:
    engine = _engine(tiny, CONFIGS[0], reuse_prefixes=False)
    header, tensors = _header_and_tensors(engine.save_state(engine.encode_document(DOCUMENT), tmp_path / "d.lminf"))
    header["format"] = "lminf-state/99"
    with pytest.raises(ValueError, match="written by a newer version of lminf_integrations.*upgrade") as refused:
        engine.load_state(_with_header(tmp_path / "new.lminf", tensors, header))
    assert "encode the document again" not in str(refused.value)


def test_files_of_format_4_are_read(tiny: tuple, tmp_path: Path) -> None:
    """Format 4 had no header checksum: such a file loads and answers the same."""
    engine = _engine(tiny, CONFIGS[0], reuse_prefixes=False)
    ids = engine.tokenize(DOCUMENT)[:300]
    header, tensors = _header_and_tensors(engine.save_state(engine.encode(ids), tmp_path / "d.lminf"))
    header.pop("header_sha256", None)
    header["format"] = "lminf-state/4"
    old = _with_header(tmp_path / "format4.lminf", tensors, header)
    question = ids + engine.tokenize(" Where is the key?")
    assert "".join(engine.stream(question, GREEDY, state=engine.load_state(old))) == engine.generate(question, GREEDY)


def test_files_of_format_3_are_read(tiny: tuple, tmp_path: Path) -> None:
    """Format 3 saved a window cache's every slot, written or not: such a file loads and answers the same."""
    config = CONFIGS[0]
    engine = _engine(tiny, config, reuse_prefixes=False)
    ids = engine.tokenize(DOCUMENT)[:200]
    path = engine.save_state(engine.encode(ids), tmp_path / "doc.lminf")
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads((handle.metadata() or {})["lminf"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    for name in [n for n in tensors if n.endswith((".keys", ".values"))]:
        short = tensors[name]
        tensors[name] = torch.zeros(*short.shape[:-2], config.n_global + config.n_local, short.shape[-1])
        tensors[name][:, :, : short.shape[-2]] = short
    header["format"], header["data_sha256"] = "lminf-state/3", state_module._digest(tensors)
    header.pop("header_sha256", None)
    old = tmp_path / "format3.lminf"
    save_file(tensors, str(old), metadata={"lminf": json.dumps(header)})
    question = ids + engine.tokenize(" Where is the key?")
    assert "".join(engine.stream(question, GREEDY, state=engine.load_state(old))) == engine.generate(question, GREEDY)


def test_an_empty_state_saves_and_loads(tiny: tuple, tmp_path: Path) -> None:
    """A state of no tokens (its cache never written) round-trips, and generation continues from it."""
    engine = _engine(tiny, CONFIGS[0], reuse_prefixes=False)
    loaded = engine.load_state(engine.save_state(engine.encode([]), tmp_path / "empty.lminf"))
    assert loaded.token_ids == [] and loaded.cache.get_seq_length() == 0
    ids = engine.tokenize("The key is under")
    assert "".join(engine.stream(ids, GREEDY, state=loaded)) == engine.generate(ids, GREEDY)


@pytest.mark.parametrize("config", CONFIGS, ids=["window", "full-topk"])
def test_cache_state_tensors_round_trip(tiny: tuple, config: LMInfiniteConfig) -> None:
    """What persistence uses: a cache's tensors and positions, loaded into an empty cache, give the same cache."""
    engine = _engine(tiny, config, reuse_prefixes=False)
    state = engine.encode(engine.tokenize(DOCUMENT)[:300])
    tensors, layers = state.cache.state_tensors()
    assert len(layers) == len(state.cache.layers) and layers[0]["seen"] == 300
    twin = new_cache(engine.model)
    twin.load_state_tensors({name: t.clone() for name, t in tensors.items()}, layers)
    again, again_layers = twin.state_tensors()
    assert again_layers == layers and again.keys() == tensors.keys()
    assert all(torch.equal(again[name], tensors[name]) for name in tensors)
    ids = state.token_ids + engine.tokenize(" Where is the key?")
    copy = DocumentState(list(state.token_ids), twin)
    assert "".join(engine.stream(ids, GREEDY, state=copy)) == "".join(engine.stream(ids, GREEDY, state=state))
    with pytest.raises(ValueError, match="empty cache"):
        twin.load_state_tensors(tensors, layers)
    with pytest.raises(ValueError, match="layers"):
        new_cache(engine.model).load_state_tensors(tensors, layers[:-1])


def test_state_module_does_not_import_the_engine() -> None:
    """engine imports state (its StateStore); state takes what it needs as arguments, never the engine: not on
    import, not for type checking, not inside a function."""
    code = "import sys, lminf_integrations.state; assert 'lminf_integrations.engine' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
    tree = ast.parse(Path(state_module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not imported & {"engine", "lminf_integrations.engine"}


def test_document_state_is_still_importable_from_the_engine() -> None:
    from lminf_integrations import engine, state

    assert engine.DocumentState is state.DocumentState
