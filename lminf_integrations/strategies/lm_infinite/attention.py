"""The Λ-shaped attention function, registered with transformers' attention-function interface.

Every query sees three kinds of keys, each computed as its own partial attention and merged exactly by
log-sum-exp (one softmax over all of them):

* **local band** – keys within ``n_local`` positions, ordinary logits, through PyTorch's fused CPU flash kernel.
  In a prefill chunk, the keys every query sees take one unmasked call; the rest of the band is cut into blocks of
  ``BLOCK`` queries whose keys are one fixed-length slice each, so all blocks go in *one* batched call with a small
  mask on the edges (no n×n mask, no Python loop over blocks or heads). On CUDA the band is one FlexAttention
  call over a sliding-window block mask (:mod:`...ops.flex`);
* **global** – the first ``n_global`` tokens once they fall out of the window, seen at distance
  ``distance_limit``: queries are rotated to position ``distance_limit`` and keys to position 0; a handful of keys,
  so their float32 logits go straight into the merge;
* **top-k middle** (optional) – for generation-time queries, the ``top_k`` middle keys with the highest logits,
  also at distance ``distance_limit``.

Grouped-query attention is left to the kernel, which pairs each query head with its key/value head, so keys and
values are never repeated; the partial attentions are combined in one pass that writes the ``(B, L, H, D)`` output
the model reshapes without a copy.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...config import LMInfiniteConfig
from ...ops import decode_kernel, flex
from ...ops.partial import Part, additive_mask, combine, flash
from ...ops.rope import rotate, rotation, shift_positions

ATTENTION_NAME = "lminf"
BLOCK = 256  # query rows per band block: fastest on 2-core AVX-512 and AMX CPUs (python -m bench band)
_NEG_INF = float("-inf")


@dataclass
class LayerSettings:
    """What a patched attention module needs to know; attached to each module by ``patch_model``."""

    config: LMInfiniteConfig
    inv_freq: torch.Tensor
    layer_idx: int


@dataclass
class PreparedKeys:
    """Keys a :class:`~lminf_integrations.cache.LambdaCache` layer hands to the attention function.

    ``local_keys`` hold positions ``[local_start, last query]`` (rotated as usual); for a single query they may be
    in any order (a ring buffer), otherwise in position order. ``sink_keys`` are the global tokens rotated to
    position 0; ``middle_keys`` (top-k layers only) are positions ``[0, middle_end)`` rotated to position 0.
    """

    local_keys: torch.Tensor
    local_values: torch.Tensor
    local_start: int
    sink_keys: torch.Tensor | None = None
    sink_values: torch.Tensor | None = None
    middle_keys: torch.Tensor | None = None
    middle_values: torch.Tensor | None = None
    top_k_from_position: int | None = None
    # The keys already include every global key placed at the distance limit: one attention call, with ``mask``
    # (additive, broadcast over heads) hiding the slots the query must not see, if given.
    single_softmax: bool = False
    mask: torch.Tensor | None = None


# The cache's ``update`` and the attention call happen back to back in one thread for one layer: the cache leaves
# its prepared keys here, and the attention function takes them, and must have received those very keys. No
# hand-off means no LambdaCache (no cache, or transformers' DynamicCache): the keys are then the whole history.
_handoff = threading.local()


def hand_over(prepared: PreparedKeys) -> None:
    """Leave ``prepared`` for the attention call that follows the cache update (same thread, same layer)."""
    _handoff.prepared = prepared


def discard_hand_over() -> None:
    """Drop a pending hand-off: every forward of a patched model starts with none (``patch_model`` registers this
    as a forward pre-hook), so one left by a forward that failed between update and attention cannot reach the
    next forward's attention, which would then take it for its own."""
    _handoff.prepared = None


def _take_prepared(key: torch.Tensor, settings: LayerSettings) -> PreparedKeys | None:
    """The pending hand-off (``None``: no LambdaCache), which must be for ``key``."""
    prepared: PreparedKeys | None = getattr(_handoff, "prepared", None)
    if prepared is None:
        return None
    _handoff.prepared = None
    if prepared.local_keys is not key:
        # Never taken by compiled steps (dynamo decides ``is`` while tracing and traces the branch taken only).
        raise RuntimeError(
            f"layer {settings.layer_idx}: the LM-Infinite cache handed keys to the attention function that it did "
            "not get; something between the cache update and the attention call changed them (an architecture "
            "whose attention code this patch does not support?). Deriving the keys as if there were no cache "
            "would give wrong results"
        )
    return prepared


def _from_full_history(key: torch.Tensor, value: torch.Tensor, settings: LayerSettings) -> PreparedKeys:
    """Keys of positions ``[0, last query]`` (no cache, or transformers' DynamicCache): derive everything."""
    cfg = settings.config
    n = key.shape[-2]
    n_sink = min(cfg.n_global, n)
    positions = torch.arange(n_sink, device=key.device)
    sink_keys = shift_positions(key[:, :, :n_sink], -positions, settings.inv_freq)
    middle_keys = middle_values = None
    if cfg.top_k > 0 and settings.layer_idx >= cfg.top_k_from_layer:
        all_positions = torch.arange(n, device=key.device)
        middle_keys, middle_values = shift_positions(key, -all_positions, settings.inv_freq), value
    return PreparedKeys(key, value, 0, sink_keys, value[:, :, :n_sink], middle_keys, middle_values)


def lambda_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention-interface entry point: ``query (B, H, Lq, D)`` → ``(B, Lq, H, D)``."""
    settings: LayerSettings = module.lminf_settings  # type: ignore[assignment]
    prepared = _take_prepared(key, settings)  # first: an error below must not leave the hand-off pending
    if attention_mask is not None:
        raise ValueError(
            "LM-Infinite attention does not support padded batches; pass one sequence, or sequences of equal length"
        )
    if prepared is None:
        prepared = _from_full_history(key, value, settings)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend(query, prepared, settings, scale)
    return out, None


def attend(query: torch.Tensor, prepared: PreparedKeys, settings: LayerSettings, scale: float) -> torch.Tensor:
    """All branches for queries at positions ``[last - Lq + 1, last]``; returns ``(B, Lq, H, D)``, contiguous."""
    cfg = settings.config
    n_queries = query.shape[-2]
    if prepared.single_softmax:
        # One query, every key (global ones already at the distance limit) in one call: our decoding kernel where
        # it is built, else the flash kernel, whose own grouped-query support splits the work over query heads.
        op = _decode_op(query, prepared.local_keys)
        if op is not None:
            return op(query, prepared.local_keys, prepared.local_values, prepared.mask, scale)
        if flex.applies(query.device):  # off the CPU: PyTorch's fused attention (no log-sum-exp is needed here)
            return _fused_one_softmax(query, prepared.local_keys, prepared.local_values, prepared.mask, scale)
        out, _ = flash(
            query, prepared.local_keys, prepared.local_values, 0.0, False, attn_mask=prepared.mask, scale=scale
        )
        return out.transpose(1, 2)  # the kernel writes (B, Lq, H, D) memory: this view is contiguous
    last = prepared.local_start + prepared.local_keys.shape[-2] - 1
    first = last - n_queries + 1

    parts = _local_band(query, prepared, cfg.n_local, first, scale)
    scores: list[tuple[torch.Tensor, torch.Tensor]] = []
    distance = cfg.effective_distance_limit
    needs_far = prepared.sink_keys is not None and prepared.sink_keys.shape[-2] > 0 and last >= cfg.n_local
    needs_top_k = (
        prepared.middle_keys is not None
        and cfg.top_k > 0
        and settings.layer_idx >= cfg.top_k_from_layer
        and last - cfg.n_local >= cfg.n_global
        and (prepared.top_k_from_position is None or last >= prepared.top_k_from_position)
    )
    if needs_far or needs_top_k:
        # Queries moved to position `distance` and keys at position 0 give relative distance `distance`.
        cos, sin = _far_rotation(first, n_queries, distance, settings.inv_freq, query.device)
        far_query = rotate(query, cos, sin)  # float32: the global logits are taken in float32
        if needs_far:
            scores.append(_global_scores(far_query, prepared, cfg, first, scale))
        if needs_top_k:
            parts.append(_top_k_part(far_query, prepared, cfg, first, scale))
    return combine(parts, scores, query.dtype)


def _fused_one_softmax(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """One softmax over all of ``keys`` through ``scaled_dot_product_attention`` (CUDA picks its fused kernel);
    returns ``(B, Lq, H, D)``, contiguous."""
    grouped = query.shape[1] != keys.shape[1]
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=grouped)
    return out.transpose(1, 2).contiguous()


def _decode_op(query: torch.Tensor, keys: torch.Tensor) -> Any:
    """The decoding kernel if it applies; built on first use, but never while ``torch.compile`` traces (the cache
    builds it before allowing compiled steps)."""
    if not decode_kernel.enabled() or not decode_kernel.applies(query, keys):
        return None
    if torch.compiler.is_compiling():
        return decode_kernel.built_op()
    return decode_kernel.decode_attention_op()


@functools.lru_cache(maxsize=4)
def _far_rotation(
    first: int, n_queries: int, distance: int, inv_freq: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 tables on ``device`` moving the queries at ``[first, first + n_queries)`` to position ``distance``:
    the same for every layer of a forward on that device, so computed once per chunk. On the layer's device, not
    ``inv_freq``'s: in a model split over GPUs the rotary embedding sits with the last layers."""
    positions = torch.arange(first, first + n_queries, device=device)
    return rotation(distance - positions, inv_freq, torch.float32)


def _local_band(query: torch.Tensor, prepared: PreparedKeys, window: int, first: int, scale: float) -> list[Part]:
    """Ordinary attention to keys within ``window`` positions, as partial attentions to merge."""
    keys, values, start = prepared.local_keys, prepared.local_values, prepared.local_start
    n_queries = query.shape[-2]
    last = start + keys.shape[-2] - 1
    if start > max(0, first - window + 1):
        raise RuntimeError(f"cache kept keys from position {start}, but a query at {first} needs the full window")
    if n_queries > 1 and flex.applies(query.device):
        return [flex.band(query, keys, values, window, first - start, scale)]  # one call; the CPU's cut below
    if n_queries == 1:
        # One query sees every key of its window, in any order: no mask at all.
        keep = min(keys.shape[-2], window)
        if keep < keys.shape[-2]:
            keys, values = keys[:, :, -keep:], values[:, :, -keep:]
        return [flash(query, keys, values, 0.0, False, scale=scale)]
    if last - window + 1 <= start:  # even the last query sees every key: no band yet
        return _causal_no_band(query, keys, values, n_queries, scale)
    first_index = first - start
    if first_index >= window - 1 and window - n_queries >= BLOCK:
        return _core_and_inner_band(query, keys, values, window, first_index, scale)
    return _banded_blocks(query, keys, values, window, first_index, last - start, scale)


def _core_and_inner_band(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, window: int, first_index: int, scale: float
) -> list[Part]:
    """The band for ``n`` queries whose windows are all full, ``n`` well below the window (a prefill chunk).

    The ``window - n`` keys just before the first query's own key are seen by every query: one unmasked kernel call
    over all queries takes them (the *core*), as fast per key as plain attention. The remaining ``2n - 1`` keys (the
    ``n - 1`` before the core and the chunk's own ``n``), put side by side, form a band of width ``n``: query ``r``
    sees entries ``[r, r + n - 1]``, which :func:`_banded_blocks` computes. The kernel's cost per key grows with
    the number of blocks, so a blockwise band over the whole window was slower (``python -m bench band``; README).
    """
    n = query.shape[-2]
    span_start = first_index - window + 1  # the first query's oldest visible key
    core_start = span_start + n - 1  # the last query's oldest visible key
    core = flash(
        query, keys[:, :, core_start:first_index], values[:, :, core_start:first_index], 0.0, False, scale=scale
    )
    own = slice(first_index, first_index + n)
    inner_k = torch.cat([keys[:, :, span_start:core_start], keys[:, :, own]], dim=-2)
    inner_v = torch.cat([values[:, :, span_start:core_start], values[:, :, own]], dim=-2)
    return [core, *_banded_blocks(query, inner_k, inner_v, n, n - 1, 2 * n - 2, scale)]


def _causal_no_band(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n_queries: int, scale: float
) -> list[Part]:
    """Every query sees all earlier keys (the window is not yet full): plain causal attention."""
    # The fused kernel's causal mask is top-left aligned, so it takes the square part; earlier keys are unmasked.
    square = flash(query, keys[:, :, -n_queries:], values[:, :, -n_queries:], 0.0, True, scale=scale)
    if keys.shape[-2] == n_queries:
        return [square]
    return [square, flash(query, keys[:, :, :-n_queries], values[:, :, :-n_queries], 0.0, False, scale=scale)]


def _banded_blocks(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    window: int,
    first_index: int,
    last_index: int,
    scale: float,
) -> list[Part]:
    """The band |i - j| < window, as batched fused-kernel calls over query blocks.

    Indices are into ``keys``. The block starting at query index ``a`` needs keys ``[a - window + 1, a + BLOCK)``:
    ``window + BLOCK - 1`` of them, a fixed length, so the blocks' keys are strided views of one padded tensor,
    and the blocks' queries a view of ``query``. Of those keys, the ``window - BLOCK + 1`` keys ``[a + BLOCK -
    window, a]`` are seen by every query of the block: they go through the kernel without a mask (masked scores
    cost ~40% more per key), and only the two edge triangles take a masked call.

    Queries keep their heads: the kernel pairs each query head with its key/value head itself, which ran faster
    here than folding a group's heads into rows, and it writes its output as (block, row, head, dim) memory, which
    is already the layout the model wants back.
    """
    batch, n_heads, n_queries, head_dim = query.shape
    n_kv = keys.shape[1]
    block = min(BLOCK, n_queries)
    n_blocks = -(-n_queries // block)
    span = window + block - 1
    left_pad = max(0, window - 1 - first_index)
    needed = first_index - window + 1 + left_pad + (n_blocks - 1) * block + span  # padded length used
    right_pad = max(0, needed - left_pad - keys.shape[-2])
    padded_k, padded_v = _pad_rows(keys, left_pad, right_pad), _pad_rows(values, left_pad, right_pad)
    offset = first_index - window + 1 + left_pad

    def blocks_of(x: torch.Tensor, column: int, length: int) -> torch.Tensor:
        """Columns ``[column, column + length)`` of every block's span: a view when the batch is 1."""
        windows = x[:, :, offset + column :].unfold(2, length, block)[:, :, :n_blocks]  # (B, kv, nb, D, length)
        return windows.permute(0, 2, 1, 4, 3).reshape(batch * n_blocks, n_kv, length, head_dim)

    q = _pad_rows(query, 0, n_blocks * block - n_queries).view(batch, n_heads, n_blocks, block, head_dim)
    q = q.transpose(1, 2).reshape(batch * n_blocks, n_heads, block, head_dim)

    mask_key = (block, span, window, n_blocks, offset - left_pad, last_index, query.dtype, query.device)
    if left_pad == 0 and window > block:  # every block's window is full: interior + edges
        interior = flash(
            q,
            blocks_of(padded_k, block - 1, window - block + 1),
            blocks_of(padded_v, block - 1, window - block + 1),
            0.0,
            False,
            scale=scale,
        )
        edge_k = torch.cat([blocks_of(padded_k, 0, block - 1), blocks_of(padded_k, window, block - 1)], dim=2)
        edge_v = torch.cat([blocks_of(padded_v, 0, block - 1), blocks_of(padded_v, window, block - 1)], dim=2)
        mask = _batched(_edge_mask(*mask_key), batch)
        edges = flash(q, edge_k, edge_v, 0.0, False, attn_mask=mask, scale=scale)
        return [_unblock(interior, batch, n_queries), _unblock(edges, batch, n_queries)]
    # The start of a sequence (window not yet full): one call over the whole span.
    mask = _batched(_band_mask(*mask_key), batch)
    whole_k, whole_v = blocks_of(padded_k, 0, span), blocks_of(padded_v, 0, span)
    return [_unblock(flash(q, whole_k, whole_v, 0.0, False, attn_mask=mask, scale=scale), batch, n_queries)]


def _unblock(result: tuple[torch.Tensor, ...], batch: int, n_queries: int) -> Part:
    """A per-block kernel result ``(B·nb, H, block, ·)`` as ``(B, H, Lq, ·)`` views (the kernel writes (block,
    row, head) memory, so rows of consecutive blocks are already consecutive)."""
    out, lse = result[0], result[1]
    heads, head_dim = out.shape[1], out.shape[-1]
    out = out.transpose(1, 2).reshape(batch, -1, heads, head_dim)[:, :n_queries].transpose(1, 2)
    lse = lse.transpose(1, 2).reshape(batch, -1, heads)[:, :n_queries].transpose(1, 2)
    return out, lse


def _pad_rows(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, 0, before, after)) if before or after else x


def _batched(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-block masks (first dim n_blocks) repeated for each sequence of the batch (blocks are batch-major)."""
    return mask.repeat(batch, 1, 1, 1) if mask.shape[0] > 1 and batch > 1 else mask


@functools.lru_cache(maxsize=2)
def _band_mask(
    block: int,
    span: int,
    window: int,
    n_blocks: int,
    first_key_index: int,
    last_index: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Additive mask ``(n_blocks or 1, 1, block, span)`` of the band; built once per forward, shared by layers.

    Row ``r`` is query ``a + r`` of a block, column ``c`` key ``a - window + 1 + c``: visible iff ``r <= c <=
    r + window - 1`` and the key index is real, not padding.
    """
    row = torch.arange(block, device=device)[:, None]
    col = torch.arange(span, device=device)[None, :]
    band = (col >= row) & (col <= row + window - 1)
    key_index = first_key_index + torch.arange(n_blocks, device=device)[:, None, None] * block + col
    visible = band & (key_index >= 0) & (key_index <= last_index)  # (nb, block, span)
    if bool((visible == band).all()):
        visible = band[None]  # no block touches padding: one mask for all
    return additive_mask(visible, dtype)[:, None]


@functools.lru_cache(maxsize=2)
def _edge_mask(block: int, span: int, window: int, *rest: Any) -> torch.Tensor:
    """The band mask's edge columns: ``[0, block - 1)`` (keys leaving the window) and ``[window, span)`` (causal)."""
    band = _band_mask(block, span, window, *rest)
    return torch.cat([band[..., : block - 1], band[..., window:]], dim=-1)


def _global_scores(
    far_query: torch.Tensor, prepared: PreparedKeys, cfg: LMInfiniteConfig, first: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(B, H, n_global, Lq)`` of the global tokens that are out of a query's window, seen at distance
    ``distance_limit``, with their values ``(B, H, n_global, D)``; float32.

    A handful of keys: explicit logits merged straight into the output cost less than a kernel call (whose fixed
    cost per block of rows dominates with so few keys) plus merging its normalised output.
    """
    assert prepared.sink_keys is not None and prepared.sink_values is not None
    rep = far_query.shape[1] // prepared.sink_keys.shape[1]
    keys = prepared.sink_keys.float().repeat_interleave(rep, dim=1)
    values = prepared.sink_values.float().repeat_interleave(rep, dim=1)
    logits = torch.matmul(keys, far_query.transpose(-1, -2)).mul_(scale)  # keys-major: reductions run along Lq
    n_queries = far_query.shape[-2]
    if first - (keys.shape[-2] - 1) < cfg.n_local:  # some queries still see a global key in their window
        positions = torch.arange(first, first + n_queries, device=far_query.device)
        key_positions = torch.arange(keys.shape[-2], device=far_query.device)
        visible = positions[None, :] - key_positions[:, None] >= cfg.n_local
        logits = logits.masked_fill_(~visible, _NEG_INF)
    return logits, values


def _top_k_part(
    far_query: torch.Tensor, prepared: PreparedKeys, cfg: LMInfiniteConfig, first: int, scale: float
) -> Part:
    """Each query head's ``top_k`` strongest middle keys (``n_global <= j <= i - n_local``), for generation-time
    queries only (positions ``>= top_k_from_position``)."""
    assert prepared.middle_keys is not None and prepared.middle_values is not None
    batch, heads, n_queries, head_dim = far_query.shape
    n_kv = prepared.middle_keys.shape[1]
    rep = heads // n_kv
    out, lse = _top_k_folded(_fold(far_query, n_kv), prepared, cfg, first, rep, scale)
    return out.view(batch, heads, n_queries, head_dim), lse.view(batch, heads, n_queries)


def _fold(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(B, H, L, D) → (B, kv_heads, rep·L, D): the query heads sharing a kv head become rows."""
    b, h, length, d = x.shape
    return x.reshape(b, n_kv, (h // n_kv) * length, d)


def _top_k_folded(
    far_query: torch.Tensor, prepared: PreparedKeys, cfg: LMInfiniteConfig, first: int, rep: int, scale: float
) -> Part:
    """:func:`_top_k_part` on folded queries ``(B, kv_heads, rep·Lq, D)``; returns folded output and lse."""
    assert prepared.middle_keys is not None and prepared.middle_values is not None
    n_queries = far_query.shape[-2] // rep
    start = prepared.top_k_from_position if prepared.top_k_from_position is not None else first + n_queries - 1
    skip = min(max(0, start - first), n_queries)
    if skip > 0:
        # Only generation-time queries take part: score just those rows (a whole prompt in one forward would
        # otherwise cost n × n logits), and give the others an empty part (lse = -inf).
        b, kv, _, d = far_query.shape
        rows = far_query.view(b, kv, rep, n_queries, d)[:, :, :, skip:].reshape(b, kv, rep * (n_queries - skip), d)
        out, lse = _top_k_folded(rows, prepared, cfg, first + skip, rep, scale)
        full_out = out.new_zeros(b, kv, rep, n_queries, d)
        full_lse = lse.new_full((b, kv, rep, n_queries), _NEG_INF)
        full_out[:, :, :, skip:] = out.view(b, kv, rep, n_queries - skip, d)
        full_lse[:, :, :, skip:] = lse.view(b, kv, rep, n_queries - skip)
        return full_out.view(b, kv, rep * n_queries, d), full_lse.view(b, kv, rep * n_queries)
    positions = torch.arange(first, first + n_queries, device=far_query.device).repeat(rep)
    middle_end = first + n_queries - cfg.n_local  # exclusive bound of any query's middle
    keys = prepared.middle_keys[:, :, cfg.n_global : middle_end]
    values = prepared.middle_values[:, :, cfg.n_global : middle_end]
    key_positions = torch.arange(cfg.n_global, middle_end, device=far_query.device)
    visible = (key_positions[None, :] <= positions[:, None] - cfg.n_local) & (positions[:, None] >= start)
    logits = torch.matmul(far_query.to(keys.dtype), keys.transpose(-1, -2)).float() * scale
    logits = logits.masked_fill(~visible, _NEG_INF)
    k = min(cfg.top_k, logits.shape[-1])
    top_logits, top_index = logits.topk(k, dim=-1)
    # Gather each row's chosen values: (B, kv, rows, k, D).
    chosen = torch.gather(
        values[:, :, None].expand(-1, -1, top_index.shape[2], -1, -1),
        3,
        top_index[..., None].expand(-1, -1, -1, -1, values.shape[-1]),
    )
    lse = torch.logsumexp(top_logits, dim=-1)
    weights = torch.exp(top_logits - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("bhrk,bhrkd->bhrd", weights, chosen.float())
    return out, lse
