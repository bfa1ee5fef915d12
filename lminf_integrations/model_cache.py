"""A local cache of converted models: a GGUF file dequantized once into an ordinary transformers model folder.

transformers reads a GGUF file by parsing every metadata field in Python (three times: tokenizer, config, weights)
and dequantizing every tensor, on every load. The folder kept here (float32 safetensors holding exactly the
dequantized values, the tokenizer files, the configs) loads like any local model folder instead.

* Keyed by the GGUF file's SHA-256: a changed file gets a new folder. The checksum itself is remembered per file
  path, size and modification time, so a large file is not read again on every load.
* Written into a temporary folder and renamed into place: a folder under its final name is complete. Two
  processes that build at once each write their own; the first rename wins and the other uses it.
* Checked against its manifest (every file and its size) before use; a damaged folder, or one that fails to
  load with a file that cannot be parsed, is rebuilt from the GGUF file. A load that fails with every file sound
  (a placement the machine cannot give) keeps the entry.

Where it lives: ``$LMINF_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/lminf_integrations``, else
``~/.cache/lminf_integrations``. ``LMINF_CACHE_DIR=off`` turns the cache off (every load reads the GGUF file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from safetensors import SafetensorError

from .files import age_seconds, file_mode, folder_mode

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

MANIFEST = "lminf-cache.json"
FORMAT = "lminf-model-cache/1"
OFF_VALUES = ("off", "0", "none", "")
Builder = Callable[[], "tuple[PreTrainedModel, PreTrainedTokenizerBase]"]
Loaded = TypeVar("Loaded")


def cache_root() -> Path | None:
    """The cache folder, or ``None`` when ``LMINF_CACHE_DIR`` turns the cache off."""
    configured = os.environ.get("LMINF_CACHE_DIR")
    if configured is not None:
        return None if configured.strip().lower() in OFF_VALUES else Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no HOME, and a user id without a passwd entry (a container's arbitrary user)
            logger.warning("no home directory for the model cache; set LMINF_CACHE_DIR to keep one")
            return None
    return Path(base) / "lminf_integrations"


def load_through_cache(source: Path, build: Builder, load: Callable[[Path], Loaded], root: Path) -> Loaded | None:
    """``load(folder)`` on the converted folder for ``source``, built with ``build()`` when missing or damaged.

    A folder that passes its manifest check but fails to load is rebuilt once if one of its files cannot be read
    (bytes changed in place); a load that fails with every file readable failed for what ``load`` asked (a
    placement, a memory budget), and its error is raised with the entry kept. ``None`` when the cache cannot be
    written: the caller then loads ``source`` directly.
    """
    for attempt in (1, 2):
        folder = cached_folder(source, build, root)
        if folder is None:
            return None
        try:
            return load(folder)
        except Exception as error:
            problem = unreadable_file(folder)
            if problem is None:
                logger.warning(
                    "model cache %s: every file reads, so the failure is the load's own (%s); the entry is kept "
                    "(remove the folder to force a rebuild)", folder, error,
                )  # fmt: skip
            if attempt == 2 or problem is None:
                raise
            logger.warning("model cache %s failed to load (%s; %s); rebuilding it", folder, error, problem)
            discard(folder)
    return None


def unreadable_file(folder: Path) -> str | None:
    """Which of ``folder``'s JSON or safetensors files is damaged, or ``None``: JSON that does not parse, a
    safetensors header that does not parse or does not match its file's size. Reads headers only, never maps the
    weights: a load that failed for lack of memory must not make the check fail too and a sound entry look damaged.
    A file that cannot be read at all (no memory, no handles) counts as sound: an entry other processes may share
    is removed only when shown damaged."""
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_bytes())
            elif path.suffix == ".safetensors":
                _check_safetensors_header(path)
        except OSError:
            continue
        except (ValueError, KeyError, TypeError, IndexError) as error:  # JSON errors are ValueErrors
            return f"{path.name} is unreadable: {error}"
    return None


def _check_safetensors_header(path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` starts with a safetensors header whose tensors end where the file does."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 0 < length <= size - 8:
            raise ValueError(f"a header of {length} bytes in a file of {size}")
        header = json.loads(handle.read(length))
    end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    if 8 + length + end != size:
        raise ValueError(f"the header's tensors end at byte {8 + length + end}, the file at {size}")


def file_sha256(path: Path, root: Path) -> str:
    """SHA-256 of ``path``'s bytes, remembered under ``root`` for the same path, size and modification time."""
    stat = path.stat()
    resolved = str(path.resolve())
    memo = root / "checksums" / (hashlib.sha256(resolved.encode()).hexdigest()[:32] + ".json")
    stamp = {"path": resolved, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        remembered = json.loads(memo.read_text())
        if {key: remembered.get(key) for key in stamp} == stamp and isinstance(remembered.get("sha256"), str):
            return str(remembered["sha256"])
    except (OSError, ValueError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    checksum = digest.hexdigest()
    _write_atomically(memo, json.dumps({**stamp, "sha256": checksum}))
    return checksum


def cached_folder(source: Path, build: Builder, root: Path) -> Path | None:
    """The converted folder for ``source`` under ``root``, building it with ``build()`` if it is missing or damaged.

    ``None`` when it cannot be written (no space, read-only folder): the caller then loads ``source`` directly.
    """
    checksum = file_sha256(source, root)
    folder = root / "models" / f"{_safe_stem(source)}-{checksum[:16]}"
    problem = check_folder(folder, checksum)
    if problem is None:
        return folder
    if folder.exists():
        logger.warning("model cache %s is damaged (%s); rebuilding it from %s", folder, problem, source)
        discard(folder)
    logger.info("converting %s once into %s (later loads read that)", source.name, folder)
    return _build(folder, source, checksum, build)


def check_folder(folder: Path, checksum: str) -> str | None:
    """Why ``folder`` is not a complete cache entry for ``checksum``, or ``None`` if it is."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError) as error:
        return f"unreadable manifest ({error})"
    if manifest.get("format") != FORMAT or manifest.get("source_sha256") != checksum:
        return "manifest of another format or source"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "manifest lists no files"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def discard(folder: Path) -> None:
    """Remove a cache entry (its manifest first, so that a half-removed folder never looks complete)."""
    (folder / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


# A build takes a minute or so; a staging folder this old was left by a run killed while writing (SIGKILL, a power
# cut), and holds a partial copy of the converted model.
STALE_STAGING_SECONDS = 3600


def _remove_stale_staging(folder: Path) -> None:
    for staging in folder.parent.glob(f".{folder.name}.*"):
        age = age_seconds(staging)
        if age is not None and age > STALE_STAGING_SECONDS:
            logger.info("removing %s, left by a run killed while writing the model cache", staging)
            shutil.rmtree(staging, ignore_errors=True)


def _build(folder: Path, source: Path, checksum: str, build: Builder) -> Path | None:
    try:  # a folder we cannot write is found out before the slow conversion, not after
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(folder)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        staging.chmod(folder_mode())  # mkdtemp's 0700 would hide a shared cache from other users
    except OSError as error:
        logger.warning("cannot write the model cache in %s (%s); loading %s directly", folder.parent, error, source)
        return None
    try:
        model, tokenizer = build()
        needed = sum(t.numel() * 4 for t in model.state_dict().values())  # float32; tied weights counted twice
        free = shutil.disk_usage(staging).free
        if free < needed + (256 << 20):
            logger.warning(
                "not caching %s: the converted model needs about %.1f GiB, %s has %.1f GiB free",
                source.name, needed / 2**30, folder.parent, free / 2**30,
            )
            return None
        # float32 holds the dequantized values exactly; a load in another dtype casts from them.
        model.float().save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for written in staging.rglob("*"):  # safetensors writes the weights through a private (0600) file
            if written.is_file():
                written.chmod(file_mode())
        files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
        manifest: dict[str, Any] = {"format": FORMAT, "source": source.name, "source_sha256": checksum, "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            staging.rename(folder)
        except OSError:
            if check_folder(folder, checksum) is not None:  # not another process's complete copy: ours goes in
                discard(folder)
                staging.rename(folder)
    except (OSError, SafetensorError) as error:  # safetensors' own error for a full disk is no OSError
        logger.warning("could not write the model cache %s (%s); loading %s directly", folder, error, source.name)
        return None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _safe_stem(source: Path) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in source.stem)[:80]


def _write_atomically(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".partial") as handle:
            handle.write(text)
        Path(handle.name).replace(path)
    except OSError as error:  # a read-only cache only costs the checksum again next time
        logger.debug("could not remember a checksum in %s: %s", path, error)
