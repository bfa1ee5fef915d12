"""The converted-model cache (``model_cache.py``): built once, keyed by the source's checksum, written atomically,
rebuilt when damaged; with the tiny random Llama standing in for a converted GGUF model."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations import model_cache

Pair = tuple[PreTrainedModel, PreTrainedTokenizerBase]


class Builder:
    """Counts how often the (slow) conversion runs."""

    def __init__(self, pair: Pair) -> None:
        self.pair, self.calls = pair, 0

    def __call__(self) -> Pair:
        self.calls += 1
        return self.pair


def _load(folder: Path) -> Pair:
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF stand-in " * 1000)
    return path


@pytest.fixture
def builder(tiny_llama_with_real_tokenizer: Pair) -> Builder:
    return Builder(tiny_llama_with_real_tokenizer)


def _umask_now() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _same_weights(a: PreTrainedModel, b: PreTrainedModel) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_built_once_then_read(source: Path, builder: Builder, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    first = model_cache.load_through_cache(source, builder, _load, root)
    second = model_cache.load_through_cache(source, builder, _load, root)
    assert builder.calls == 1
    assert first is not None and second is not None
    assert _same_weights(second[0], builder.pair[0])
    text = "Hello, world: caching converted models."
    assert second[1](text)["input_ids"] == builder.pair[1](text)["input_ids"]
    assert second[1].chat_template == builder.pair[1].chat_template
    (folder,) = (root / "models").iterdir()
    assert model_cache.check_folder(folder, model_cache.file_sha256(source, root)) is None
    assert [p.name for p in (root / "models").iterdir()] == [folder.name]  # no staging folder left behind
    # readable as any file the user makes (safetensors writes through a private 0600 file)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}
    assert set(modes.values()) == {oct(0o666 & ~_umask_now())}, modes


def test_a_changed_source_gets_its_own_folder(source: Path, builder: Builder, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    model_cache.load_through_cache(source, builder, _load, root)
    source.write_bytes(b"another GGUF " * 1000)
    model_cache.load_through_cache(source, builder, _load, root)
    assert builder.calls == 2
    assert len(list((root / "models").iterdir())) == 2


@pytest.mark.parametrize(
    "damage", ["truncate weights", "remove manifest", "remove tokenizer", "corrupt in place", "corrupt config in place"]
)
def test_a_damaged_folder_is_rebuilt(
    source: Path, builder: Builder, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "cache"
    model_cache.load_through_cache(source, builder, _load, root)
    (folder,) = (root / "models").iterdir()
    weights = folder / "model.safetensors"
    if damage == "truncate weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "remove manifest":
        (folder / model_cache.MANIFEST).unlink()
    elif damage == "remove tokenizer":
        (folder / "tokenizer.json").unlink()
    elif damage == "corrupt config in place":
        config = folder / "config.json"
        config.write_bytes(b"\xff" * config.stat().st_size)
    else:  # same size, so only loading can tell: the safetensors header is garbage
        data = bytearray(weights.read_bytes())
        data[8:40] = b"\xff" * 32
        weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="lminf_integrations.model_cache"):
        loaded = model_cache.load_through_cache(source, builder, _load, root)
    assert builder.calls == 2
    assert loaded is not None and _same_weights(loaded[0], builder.pair[0])
    assert "rebuilding" in caplog.text


def test_a_load_that_fails_for_its_settings_keeps_the_entry(
    source: Path, builder: Builder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A load refused for what it was asked (a placement, a memory budget), not for the folder's files, raises that
    error and leaves the entry alone: rebuilding a sound entry costs a whole conversion (minutes for a large GGUF
    file) and then fails the same way."""
    root = tmp_path / "cache"
    model_cache.load_through_cache(source, builder, _load, root)
    (folder,) = (root / "models").iterdir()
    built = (folder / model_cache.MANIFEST).stat().st_ino

    def placed(folder: Path) -> Pair:
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="auto", max_memory={"cpu": "lots"})
        return model, AutoTokenizer.from_pretrained(folder)

    with caplog.at_level(logging.WARNING, logger="lminf_integrations.model_cache"), pytest.raises(ValueError):
        model_cache.load_through_cache(source, builder, placed, root)
    assert builder.calls == 1
    assert "rebuilding" not in caplog.text and "the entry is kept" in caplog.text
    assert (folder / model_cache.MANIFEST).stat().st_ino == built  # the same entry, not a new one
    assert model_cache.load_through_cache(source, builder, _load, root) is not None and builder.calls == 1


def test_telling_a_sound_entry_reads_no_weights(tmp_path: Path) -> None:
    """The check that tells a damaged entry from a load refused for its own reasons reads headers only. A load
    that failed for lack of memory is such a load: a check that mapped the weights would fail the same way, call a
    sound entry damaged and remove it (a cache other processes share). Here: a 4 GiB weights file (sparse) checked
    in a process whose address space cannot hold it."""
    folder = tmp_path / "entry"
    folder.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**30], "data_offsets": [0, 2**32]}}).encode()
    header += b" " * (-len(header) % 8)
    weights = folder / "model.safetensors"
    with weights.open("wb") as handle:
        handle.write(len(header).to_bytes(8, "little") + header)
        handle.truncate(8 + len(header) + 2**32)
    (folder / "config.json").write_text("{}")
    probe = (
        "import resource, sys; from pathlib import Path\n"
        "from lminf_integrations import model_cache\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2**31, 2**31))\n"
        "print(model_cache.unreadable_file(Path(sys.argv[1])))"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "None"
    # and a header that does not match the file's size is damage
    with weights.open("r+b") as handle:
        handle.truncate(8 + len(header) + 2**31)
    assert model_cache.unreadable_file(folder) is not None


def test_the_checksum_is_remembered_until_the_file_changes(source: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    real = model_cache.file_sha256(source, root)
    (memo,) = (root / "checksums").iterdir()
    remembered = json.loads(memo.read_text())
    memo.write_text(json.dumps({**remembered, "sha256": "remembered"}))
    assert model_cache.file_sha256(source, root) == "remembered"  # not read again
    os.utime(source, ns=(remembered["mtime_ns"] + 10**9, remembered["mtime_ns"] + 10**9))
    assert model_cache.file_sha256(source, root) == real


def test_an_unwritable_cache_loads_directly_without_converting(source: Path, builder: Builder, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    (root / "models").write_text("a file where the cache wants a folder")  # unwritable even for root
    assert model_cache.load_through_cache(source, builder, _load, root) is None
    assert builder.calls == 0  # the slow conversion is not wasted: the caller loads the source itself


@pytest.mark.parametrize("value,expected", [("off", None), ("", None), ("/somewhere", Path("/somewhere"))])
def test_cache_root_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: Path | None
) -> None:
    monkeypatch.setenv("LMINF_CACHE_DIR", value)
    assert model_cache.cache_root() == expected
    monkeypatch.delenv("LMINF_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert model_cache.cache_root() == Path("/xdg/lminf_integrations")


def test_a_disk_that_fills_up_while_writing_loads_directly(
    source: Path, builder: Builder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """safetensors reports a full disk as its own error, not an OSError: the run must still answer, loading the
    source directly, and leave no partial folder. (The full disk is simulated: the free-space check before the
    write passed, and another writer took the space.)"""
    from safetensors import SafetensorError

    def disk_full(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(type(builder.pair[0]), "save_pretrained", disk_full)
    root = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="lminf_integrations"):
        assert model_cache.load_through_cache(source, builder, _load, root) is None
    assert "No space left on device" in caplog.text and "directly" in caplog.text
    assert not [p for p in (root / "models").iterdir()]  # the staging folder is gone


def test_no_home_directory_turns_the_cache_off_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A container run with a user id missing from /etc/passwd and no HOME: Path.home() raises. The model must
    still load (directly), with a word on how to get a cache."""

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("LMINF_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with caplog.at_level(logging.WARNING, logger="lminf_integrations"):
        assert model_cache.cache_root() is None
    assert "LMINF_CACHE_DIR" in caplog.text


def test_a_killed_builds_staging_folder_is_removed_by_the_next_build(
    source: Path, builder: Builder, tmp_path: Path
) -> None:
    """A run killed (SIGKILL, a power cut) while writing leaves its hidden staging folder, the size of the converted
    model: the next build removes such folders when they are far older than a build takes, and leaves a young one
    (another process writing now)."""
    import time

    root = tmp_path / "cache"
    models = root / "models"
    folder = model_cache.cached_folder(source, builder, root)  # to learn the entry's name
    assert folder is not None
    model_cache.discard(folder)
    old, young = models / f".{folder.name}.killed", models / f".{folder.name}.writing"
    for staging in (old, young):
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"partial")
    past = time.time() - 2 * model_cache.STALE_STAGING_SECONDS
    os.utime(old, (past, past))
    assert model_cache.cached_folder(source, builder, root) == folder
    assert sorted(p.name for p in models.iterdir()) == sorted([folder.name, young.name])
