"""Encoded-document states: reuse in memory (an LRU bounded by bytes) and on disk (safetensors + JSON header).

A state is a strategy's cache after a token prefix. Answering another question about the same document
starts from it instead of re-reading the document; generation works on a copy, so a state never changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .files import file_mode
from .models import dtype_name
from .settings import BY_NAME
from .strategies.base import DocumentCache

logger = logging.getLogger(__name__)
# 2: the settings' cache mode is named ``cache_mode`` (1: ``cache``); the header names the strategy.
# 3: the model is known by its weights (``weights_sha256``); its name or path is kept but not compared.
# 4: a window cache saves the slots it filled (a document shorter than the window: its own size); format 3 files
#    (every slot) are read as they are.
# 5: the header has its own checksum (``header_sha256``): an edited position or count is refused as damage.
FORMAT = "lminf-state/5"
READS = frozenset({"lminf-state/3", "lminf-state/4", FORMAT})
#: Header fields every format that is read has (besides the identity, compared field by field).
REQUIRED = ("n_tokens", "tokens_sha256", "data_sha256", "layers")
#: Header fields kept to describe a state but not compared on loading: a model's folder may move or be copied while
#: its weights stay the same (``weights_sha256`` tells).
NOT_COMPARED = frozenset({"model"})
#: Values sampled per parameter for ``weights_sha256``.
WEIGHT_SAMPLES = 64


@dataclass
class DocumentState:
    """A prefix encoded into a strategy's cache (all tokens of ``token_ids`` are in ``cache``)."""

    token_ids: list[int]
    cache: DocumentCache
    # The text whose tokens these are, when it is known (``Engine.encode_document``): a prompt given as text that
    # starts with it is tokenized after it only, so tokens never merge across the boundary.
    text: str | None = None

    def copy(self) -> DocumentState:
        return DocumentState(list(self.token_ids), self.cache.clone(), self.text)


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0
    tokens_reused: int = 0
    evictions: int = 0
    too_large: int = 0  # states not stored: each alone over max_bytes


class StateStore:
    """Least-recently-used document states, bounded by their total bytes.

    ``lookup(ids)`` returns the stored state with the longest token prefix of ``ids`` (or None).
    """

    def __init__(self, max_bytes: int = 2 * 2**30) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.stats = StoreStats()
        self._states: OrderedDict[tuple[int, ...], DocumentState] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(state.cache.nbytes() for state in self._states.values())

    def __len__(self) -> int:
        return len(self._states)

    def lookup(self, ids: Sequence[int]) -> DocumentState | None:
        with self._lock:
            best: tuple[int, ...] | None = None
            for key in self._states:
                if len(key) <= len(ids) and (best is None or len(key) > len(best)) and tuple(ids[: len(key)]) == key:
                    best = key
            if best is None:
                self.stats.misses += 1
                logger.info("document state: miss (%d stored)", len(self._states))
                return None
            self._states.move_to_end(best)
            self.stats.hits += 1
            self.stats.tokens_reused += len(best)
            logger.info("document state: hit, %d of %d tokens already encoded", len(best), len(ids))
            return self._states[best]

    def put(self, state: DocumentState) -> None:
        size = state.cache.nbytes()
        if size > self.max_bytes:
            self.stats.too_large += 1
            # A store that can hold no state never hits: say so once, at warning level; then only count.
            log = logger.warning if self.stats.too_large == 1 else logger.info
            log(
                "document state of %.1f MiB not stored: over StateStore's max_bytes (%.1f MiB)",
                size / 2**20,
                self.max_bytes / 2**20,
            )
            return
        with self._lock:
            self._states[tuple(state.token_ids)] = state
            self._states.move_to_end(tuple(state.token_ids))
            while self.nbytes > self.max_bytes:
                self._states.popitem(last=False)
                self.stats.evictions += 1


# ---- persistence ------------------------------------------------------------------------------------------------
# ``Engine.save_state`` / ``Engine.load_state`` call these with the engine's identity and a cache for its model.
def state_identity(
    model_name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, strategy: dict[str, Any]
) -> dict[str, Any]:
    """What must match for a saved state to be valid: the model's weights (:func:`weights_sha256`), its tokenizer's
    vocabulary, the strategy and its settings (``Strategy.identity()``); ``model_name`` is recorded, not compared."""
    vocab = sorted(tokenizer.get_vocab().items())
    return {
        "model": model_name,
        "weights_sha256": weights_sha256(model),
        "model_type": model.config.model_type,
        "num_hidden_layers": model.config.num_hidden_layers,
        "dtype": str(model.dtype),
        "tokenizer_sha256": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
        **strategy,
    }


def weights_sha256(model: PreTrainedModel) -> str:
    """A fingerprint of ``model``'s weights: SHA-256 over each parameter's name, shape and :data:`WEIGHT_SAMPLES`
    evenly spaced values. Another training of the same architecture (a fine-tune saved over the same folder) changes
    it; reading a few values per tensor costs milliseconds at any model size, where hashing every weight would read
    gigabytes. Weights accelerate keeps offloaded (on ``meta``) count by name and shape only."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        digest.update(f"{name}{tuple(parameter.shape)}".encode())
        flat = parameter.detach().reshape(-1)
        if flat.device.type == "meta" or flat.numel() == 0:
            continue
        count = min(WEIGHT_SAMPLES, flat.numel())
        index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
        digest.update(flat[index].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _header_digest(header: dict[str, Any]) -> str:
    """A checksum of every header field but itself (keys sorted: the JSON's own order does not count)."""
    fields = {key: value for key, value in header.items() if key != "header_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _format_number(name: Any) -> int | None:
    """3 for ``"lminf-state/3"``; None for anything else."""
    prefix = "lminf-state/"
    text = name[len(prefix) :] if isinstance(name, str) and name.startswith(prefix) else ""
    return int(text) if text.isdigit() else None


def _read_header(path: Path, text: str) -> dict[str, Any]:
    """The lminf header of the state file ``path``, checked: a format this version reads, every field there,
    and (format 5 on) its checksum; ``ValueError`` saying which, naming the file."""
    try:
        header = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is corrupt: its header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is corrupt: its header is not a JSON object")
    found, newest = header.get("format"), _format_number(FORMAT)
    if found not in READS:
        number = _format_number(found)
        if number is not None and newest is not None and number > newest:
            raise ValueError(
                f"{path} has state format {found!r}, written by a newer version of lminf_integrations; this version "
                f"reads up to {FORMAT!r}: upgrade the package to read it"
            )
        raise ValueError(
            f"{path} has state format {found!r}; this version reads {sorted(READS)} only: encode the document again "
            "(and save it again)"
        )
    if (_format_number(found) or 0) >= 5 and header.get("header_sha256") != _header_digest(header):
        raise ValueError(f"{path} is corrupt: its header does not match its checksum")
    missing = [key for key in REQUIRED if key not in header]
    if missing:
        raise ValueError(f"{path} is corrupt: its header lacks {', '.join(map(repr, missing))}")
    return header


def write_state(path: str | os.PathLike[str], state: DocumentState, identity: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` (safetensors). The header holds ``identity`` (see :func:`state_identity`), the
    cache's positions and checksums. Written under another name first, so ``path`` is never half-written."""
    cache_tensors, layers = state.cache.state_tensors()
    tensors = {"token_ids": torch.tensor(state.token_ids, dtype=torch.int64)}
    # Written from the CPU whatever device each layer's cache is on; read_state puts them back per layer.
    tensors.update((name, tensor.to("cpu").contiguous()) for name, tensor in cache_tensors.items())
    header = {
        "format": FORMAT,
        **identity,
        "n_tokens": len(state.token_ids),
        "tokens_sha256": hashlib.sha256(json.dumps(state.token_ids).encode()).hexdigest(),
        "data_sha256": _digest(tensors),
        "layers": layers,
    }
    header["header_sha256"] = _header_digest(header)
    path = check_writable(path)
    temporary = path.with_name(path.name + ".partial")
    # safetensors writes through a private temporary file (mode 0600); give the state the mode any file the user
    # writes gets, or the mode of the file it replaces.
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else file_mode()
    try:
        save_file(tensors, str(temporary), metadata={"lminf": json.dumps(header)})
        os.chmod(temporary, mode)
        temporary.replace(path)
    except SafetensorError as error:  # safetensors' I/O errors (a full disk) are not OSErrors
        raise OSError(f"cannot write {path}: {error}") from error
    finally:
        temporary.unlink(missing_ok=True)  # gone once renamed; else a failed write's remains
    return path


def check_writable(path: str | os.PathLike[str]) -> Path:
    """``path`` as a :class:`~pathlib.Path` if a state file can be written there (a file, new or replaced, in a
    folder that exists); else ``ValueError`` saying why, before any work is spent on the state."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name for the state (say {path / 'document.lminf'})")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: {path.parent} is a file, not a folder")
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: no folder {path.parent}")
    # Permissions alone do not tell (root passes every check; a read-only file system refuses root too): make the
    # file the state is written through, and remove it.
    probe = path.with_name(path.name + ".partial")
    try:
        probe.open("wb").close()
        probe.unlink()
    except OSError as error:
        raise ValueError(f"cannot write {path}: {error.strerror or error}") from error
    return path


def read_state(
    path: str | os.PathLike[str],
    identity: dict[str, Any],
    cache: DocumentCache,
    devices: Sequence[torch.device] | None = None,
) -> DocumentState:
    """Read a state written by :func:`write_state` into ``cache`` (empty, for the model the state was encoded
    with). Refuses files of another format, another ``identity`` (model, tokenizer or settings) and damaged files.
    ``devices``: each decoder layer's device; a layer's tensors go there (the file does not fix a device, so a state
    saved on one device loads on another)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such state file: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable state file (truncated or corrupt?): {error}") from error
    if "lminf" not in metadata:
        raise ValueError(f"{path} is a safetensors file but not an lminf document state")
    header = _read_header(path, metadata["lminf"])
    refusal = _mismatch(header, identity)
    if refusal:
        raise ValueError(f"{path} {refusal}")
    if _digest(tensors) != header["data_sha256"]:
        raise ValueError(f"{path} is corrupt: its data does not match the checksum in its header")
    token_ids = tensors.pop("token_ids").tolist()
    if hashlib.sha256(json.dumps(token_ids).encode()).hexdigest() != header["tokens_sha256"]:
        raise ValueError(f"{path} is corrupt: its tokens do not match their checksum")
    if devices is not None:
        tensors = {name: _to_layer_device(name, tensor, devices) for name, tensor in tensors.items()}
    cache.load_state_tensors(tensors, header["layers"])
    return DocumentState(token_ids, cache)


def _mismatch(header: dict[str, Any], identity: dict[str, Any]) -> str | None:
    """Why a file with ``header`` cannot be read with ``identity`` (None: it can): each difference once, settings by
    their names with both values, and what to do (the file's settings, where only settings differ)."""
    model_differs, settings, details = False, {}, []
    # Another strategy's settings differ in kind, not value: said by the strategy's name alone.
    other_strategy = header.get("strategy") != identity.get("strategy")
    for key, now in identity.items():
        if other_strategy and key not in header:
            continue
        then = header.get(key)
        if key in NOT_COMPARED or then == now:
            continue
        if key == "dtype":  # a setting (dtype="auto" differs between CPUs); the weights' values differ with it
            then, now = _dtype_setting(then), _dtype_setting(now)
            details.append(f"dtype: file {then!r}, now {now!r}")
            settings["dtype"] = then
            continue
        if key in ("weights_sha256", "model_type", "num_hidden_layers", "tokenizer_sha256"):
            if key == "weights_sha256" and header.get("dtype") != identity.get("dtype"):
                continue  # said by the dtype; once it matches, a change of the weights themselves is still told
            model_differs = True
            if key == "tokenizer_sha256":
                details.append("another tokenizer (its vocabulary differs)")
            elif not any(d.startswith("the model") for d in details):
                same = header.get("model") == identity.get("model")
                details.append(
                    f"the model {header.get('model')!r}, whose weights have changed since"
                    if same
                    else f"the model {header.get('model')!r}, not {identity.get('model')!r}"
                )
            continue
        if isinstance(then, dict) and isinstance(now, dict):  # a strategy's settings: the ones that differ
            names = sorted(then.keys() | now.keys())
            differences = [(name, then.get(name), now.get(name)) for name in names if then.get(name) != now.get(name)]
        else:
            differences = [(key, then, now)]
        for name, file_value, value in differences:
            details.append(f"{name}: file {file_value!r}, now {value!r}")
            if name in BY_NAME:
                settings[name] = file_value
    if not details:
        return None
    if model_differs:
        advice = "encode the document again with this model"
    else:
        python = ", ".join(f"{name}={value!r}" for name, value in settings.items())
        command_line = " ".join(f"{BY_NAME[name].flags[0]} {_on_command_line(v)}" for name, v in settings.items())
        advice = f"to read it, use its settings ({python}; {command_line} for lminf), or encode the document again"
    return f"was encoded with other settings or another model ({'; '.join(details)}): {advice}"


def _on_command_line(value: object) -> str:
    return "none" if value is None else json.dumps(value) if isinstance(value, dict | list) else str(value)


def _dtype_setting(recorded: object) -> object:
    """``dtype=``'s name for a dtype recorded as ``str(torch.bfloat16)`` (``"bf16"``)."""
    found = getattr(torch, str(recorded).removeprefix("torch."), None)
    return dtype_name(found) if isinstance(found, torch.dtype) else recorded


_LAYER = re.compile(r"(?:^|\.)layer\.([0-9]+)\.")


def _to_layer_device(name: str, tensor: torch.Tensor, devices: Sequence[torch.device]) -> torch.Tensor:
    """A state tensor named ``...layer.{i}.…`` moved to layer ``i``'s device (others stay on the CPU)."""
    found = _LAYER.search(name)
    return tensor.to(devices[int(found.group(1))]) if found else tensor
