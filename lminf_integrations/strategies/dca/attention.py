"""Dual Chunk Attention as an attention function for transformers' attention-function interface.

With chunks of ``s`` tokens, a local window ``w`` and training length ``c``, a query at position ``i`` (chunk
``a = i // s``, offset ``o = i % s``) sees every key ``j <= i`` (key at its offset ``j % s``):

* keys of its own chunk from offset ``o`` (intra-chunk): ordinary distances;
* keys of chunk ``a - 1`` (successive chunk): from ``s + o`` while ``o < w``, which is again the ordinary distance;
  from ``c - 1`` beyond;
* keys of older chunks (inter-chunk): from ``c - 1``.

So each query has an *ordinary* part — causal attention over keys ``[(a - 1) s, i]`` when ``o < w``, else
``[a s, i]`` — and a *far* part: every older key, the query moved to position ``c - 1`` and each key to its
offset. Queries are taken in runs sharing that split; each run is at most three calls of PyTorch's fused CPU flash
kernel (the keys every query of the run sees, the run's own causal square, the far keys), merged exactly by
log-sum-exp into one softmax. No dense mask is built.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ...ops.partial import Part, combine, flash
from ...ops.rope import shift_positions

ATTENTION_NAME = "lminf_dca"


@dataclass(frozen=True)
class DCALayerSettings:
    """What the attention needs (attached to each attention module by ``patch_model``): chunk length ``s``, local
    window ``w``, the far query position ``c - 1``, and the model's RoPE frequencies."""

    chunk: int
    local: int
    far: int
    inv_freq: torch.Tensor
    layer_idx: int


def runs(first: int, end: int, chunk: int, local: int) -> Iterator[tuple[int, int, int]]:
    """Queries ``[first, end)`` as runs ``(start, stop, ordinary_start)``: every query of a run sees keys
    ``[ordinary_start, own position]`` ordinarily and keys before ``ordinary_start`` from the far position."""
    position = first
    while position < end:
        index, offset = divmod(position, chunk)
        if offset < local and index > 0:
            stop, ordinary_start = index * chunk + local, (index - 1) * chunk
        else:
            stop, ordinary_start = (index + 1) * chunk, index * chunk
        stop = min(stop, end)
        yield position, stop, ordinary_start
        position = stop


# The cache's ``update`` and the attention call happen back to back in one thread for one layer: a DCA cache leaves
# the keys it returned (already at their chunk offsets) here, so the attention knows not to move them again.
_handoff = threading.local()


def hand_over(keys: torch.Tensor) -> None:
    """Say that ``keys``, about to reach the attention function, are already at their chunk offsets."""
    _handoff.keys = keys


def discard_hand_over() -> None:
    """Drop a pending hand-off (every forward of a patched model starts with none: a forward pre-hook)."""
    _handoff.keys = None


def _at_offsets_already(key: torch.Tensor, settings: DCALayerSettings) -> bool:
    handed: torch.Tensor | None = getattr(_handoff, "keys", None)
    _handoff.keys = None
    if handed is None:
        return False
    if handed is not key:
        raise RuntimeError(
            f"layer {settings.layer_idx}: the DCA cache handed keys to the attention function that it did not get; "
            "something between the cache update and the attention call changed them (an architecture whose "
            "attention code this patch does not support?)"
        )
    return True


def dca_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention-interface entry point: ``query (B, H, Lq, D)`` at the last ``Lq`` of the key positions ``[0, Lk)``
    → ``(B, Lq, H, D)``. Keys come as the model rotated them (no cache, or transformers' own) or, from a
    :class:`~.cache.DCACache`, already at their chunk offsets."""
    settings: DCALayerSettings = module.lminf_settings  # type: ignore[assignment]
    at_offsets = _at_offsets_already(key, settings)  # first: an error below must not leave the hand-off pending
    if attention_mask is not None:
        raise ValueError("Dual Chunk Attention does not support padded batches; pass one sequence, or equal lengths")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    keys = key if at_offsets else at_offsets_of(key, settings)
    if query.shape[-2] == 1:
        return _one_query(query, keys, value, settings, scale), None
    return _prefill(query, keys, value, settings, scale), None


def _frames(start: int, stop: int, ordinary_start: int, settings: DCALayerSettings) -> list[tuple[int, int, int]]:
    """For queries ``[start, stop)`` (one run): ``(shift, first key, end key)`` per position frame, in key order —
    the queries are moved by ``shift`` positions to see keys ``[first, end)`` (at their offsets) at the right
    distances: from the far position, from the previous chunk's frame, from their own chunk's."""
    own = start // settings.chunk * settings.chunk
    frames = []
    if ordinary_start > 0:
        frames.append((settings.far - start, 0, ordinary_start))  # the shift for the run's first query
    if ordinary_start < own:
        frames.append((-ordinary_start, ordinary_start, own))
    frames.append((-own, own, stop))
    return frames


def _prefill(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, settings: DCALayerSettings, scale: float
) -> torch.Tensor:
    n_keys, n_queries = keys.shape[-2], query.shape[-2]
    first = n_keys - n_queries
    out = torch.empty(query.shape[0], n_queries, query.shape[1], query.shape[3], dtype=query.dtype, device=query.device)
    for start, stop, ordinary_start in runs(first, n_keys, settings.chunk, settings.local):
        run = query[:, :, start - first : stop - first]
        positions = torch.arange(start, stop, device=query.device)
        parts: list[Part] = []
        for shift, key_start, key_end in _frames(start, stop, ordinary_start, settings):
            # The far frame moves every query to the same position; the others move the run as a block.
            delta = (
                settings.far - positions if key_start == 0 and ordinary_start > 0 else torch.full_like(positions, shift)
            )
            moved = shift_positions(run, delta, settings.inv_freq)
            if key_end == stop:  # the run's own chunk: its own keys as a causal square (top-left aligned)
                parts.insert(0, flash(moved, keys[:, :, start:stop], values[:, :, start:stop], 0.0, True, scale=scale))
                key_end = start
            if key_end > key_start:
                seen = slice(key_start, key_end)
                parts.append(flash(moved, keys[:, :, seen], values[:, :, seen], 0.0, False, scale=scale))
        out[:, start - first : stop - first] = combine(parts, [], query.dtype)
    return out


def _one_query(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, settings: DCALayerSettings, scale: float
) -> torch.Tensor:
    """One query (decoding): its logits in each frame side by side in key order, one softmax, one product with every
    value — the work of ordinary attention over the same keys, plus moving one query to two or three positions."""
    n = keys.shape[-2]
    batch, heads, _, dim = query.shape
    groups = heads // keys.shape[1]
    ((start, stop, ordinary_start),) = runs(n - 1, n, settings.chunk, settings.local)
    logits = []
    for shift, key_start, key_end in _frames(start, stop, ordinary_start, settings):
        delta = torch.full((1,), shift, device=query.device)  # no copy from host memory (it would wait on the GPU)
        moved = shift_positions(query, delta, settings.inv_freq).reshape(batch, keys.shape[1], groups, dim)
        logits.append(torch.matmul(moved, keys[:, :, key_start:key_end].transpose(-1, -2)).float())
    weights = (torch.cat(logits, dim=-1) * scale).softmax(-1).to(values.dtype)
    out = torch.matmul(weights, values).reshape(batch, heads, 1, dim)
    return out.transpose(1, 2)


def at_offsets_of(keys: torch.Tensor, settings: DCALayerSettings, first: int = 0) -> torch.Tensor:
    """Keys rotated at positions ``first, first + 1, ...`` moved to their offsets within their chunks."""
    positions = torch.arange(first, first + keys.shape[-2], device=keys.device)
    return shift_positions(keys, -(positions // settings.chunk) * settings.chunk, settings.inv_freq)
