"""Encoded-document states: reuse in memory (an LRU bounded by bytes) and on disk (safetensors + JSON header).

A state is the LM-Infinite cache after a token prefix. Answering another question about the same document
starts from it instead of re-reading the document; generation works on a copy, so a state never changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .cache import LambdaCache

if TYPE_CHECKING:
    from .engine import DocumentState, Engine

logger = logging.getLogger(__name__)
FORMAT = "lminf-state/1"


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0
    tokens_reused: int = 0
    evictions: int = 0


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
            return
        with self._lock:
            self._states[tuple(state.token_ids)] = state
            self._states.move_to_end(tuple(state.token_ids))
            while self.nbytes > self.max_bytes:
                self._states.popitem(last=False)
                self.stats.evictions += 1


# ---- persistence ------------------------------------------------------------------------------------------------
def _identity(engine: Engine) -> dict[str, Any]:
    """What must match for a saved state to be valid with this engine."""
    tokenizer = engine.tokenizer
    vocab = sorted(tokenizer.get_vocab().items())
    return {
        "model": engine.model_name,
        "model_type": engine.model.config.model_type,
        "num_hidden_layers": engine.model.config.num_hidden_layers,
        "dtype": str(engine.model.dtype),
        "tokenizer_sha256": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
        "config": engine.config.to_dict(),
    }


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_state(state: DocumentState, path: str | Path, engine: Engine) -> Path:
    """Write ``state`` to ``path`` (safetensors; the header names the model, tokenizer, settings, checksums)."""
    tensors: dict[str, torch.Tensor] = {"token_ids": torch.tensor(state.token_ids, dtype=torch.int64)}
    layers = []
    for index, layer in enumerate(state.cache.lambda_layers):
        layers.append({"seen": layer.seen, "top_k_from_position": layer.top_k_from_position})
        for name, tensor in layer.tensors().items():
            tensors[f"layer.{index}.{name}"] = tensor.contiguous()
    header = {
        "format": FORMAT,
        **_identity(engine),
        "n_tokens": len(state.token_ids),
        "tokens_sha256": hashlib.sha256(json.dumps(state.token_ids).encode()).hexdigest(),
        "data_sha256": _digest(tensors),
        "layers": layers,
    }
    path = Path(path)
    temporary = path.with_name(path.name + ".partial")
    save_file(tensors, str(temporary), metadata={"lminf": json.dumps(header)})
    temporary.replace(path)  # never leave a half-written file under the real name
    return path


def load_state(path: str | Path, engine: Engine) -> DocumentState:
    """Read a state saved by :func:`save_state`; refuses other models/settings and damaged files."""
    from safetensors import safe_open

    from .engine import DocumentState

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
    header = json.loads(metadata["lminf"])
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} has state format {header.get('format')!r}; this version reads {FORMAT!r}")
    expected = _identity(engine)
    mismatched = [key for key, value in expected.items() if header.get(key) != value]
    if mismatched:
        details = "; ".join(f"{key}: file {header.get(key)!r} vs now {expected[key]!r}" for key in mismatched)
        raise ValueError(f"{path} was encoded with a different model or settings ({details})")
    if _digest(tensors) != header["data_sha256"]:
        raise ValueError(f"{path} is corrupt: its data does not match the checksum in its header")
    token_ids = tensors.pop("token_ids").tolist()
    if hashlib.sha256(json.dumps(token_ids).encode()).hexdigest() != header["tokens_sha256"]:
        raise ValueError(f"{path} is corrupt: its tokens do not match their checksum")
    engine._patched()
    cache = new_cache_for(engine)
    for index, layer in enumerate(cache.lambda_layers):
        prefix = f"layer.{index}."
        own = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
        info = header["layers"][index]
        layer.restore(own, info["seen"], info["top_k_from_position"])
    return DocumentState(token_ids, cache)


def new_cache_for(engine: Engine) -> LambdaCache:
    from .patch import new_cache

    return new_cache(engine.model)
