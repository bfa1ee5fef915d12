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
    """Attention-interface entry point: ``query (B, H, Lq, D)`` at the last ``Lq`` of the key positions
    ``[0, Lk)`` (as the model rotated them) → ``(B, Lq, H, D)``."""
    settings: DCALayerSettings = module.lminf_settings  # type: ignore[assignment]
    if attention_mask is not None:
        raise ValueError("Dual Chunk Attention does not support padded batches; pass one sequence, or equal lengths")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    n_keys, n_queries = key.shape[-2], query.shape[-2]
    first = n_keys - n_queries
    far_keys: torch.Tensor | None = None
    out = torch.empty(query.shape[0], n_queries, query.shape[1], query.shape[3], dtype=query.dtype, device=query.device)
    for start, stop, ordinary_start in runs(first, n_keys, settings.chunk, settings.local):
        run = query[:, :, start - first : stop - first]
        # The run's own keys: a causal square (the kernel's causal mask is top-left aligned); earlier ordinary
        # keys are seen by every query of the run.
        parts: list[Part] = [flash(run, key[:, :, start:stop], value[:, :, start:stop], 0.0, True, scale=scale)]
        if ordinary_start < start:
            seen = slice(ordinary_start, start)
            parts.append(flash(run, key[:, :, seen], value[:, :, seen], 0.0, False, scale=scale))
        if ordinary_start > 0:
            if far_keys is None or far_keys.shape[-2] < ordinary_start:
                far_keys = _at_offsets(key[:, :, :ordinary_start], settings)
            positions = torch.arange(start, stop, device=query.device)
            far_run = shift_positions(run, settings.far - positions, settings.inv_freq)
            far = slice(0, ordinary_start)
            parts.append(flash(far_run, far_keys[:, :, far], value[:, :, far], 0.0, False, scale=scale))
        out[:, start - first : stop - first] = combine(parts, [], query.dtype)
    return out, None


def _at_offsets(keys: torch.Tensor, settings: DCALayerSettings) -> torch.Tensor:
    """Keys rotated at their positions ``0..n-1`` moved to their offsets within their chunks."""
    positions = torch.arange(keys.shape[-2], device=keys.device)
    return shift_positions(keys, -(positions // settings.chunk) * settings.chunk, settings.inv_freq)
