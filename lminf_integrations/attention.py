"""The Λ-shaped attention function, registered with transformers' attention-function interface.

Every query sees three kinds of keys, each computed as its own partial attention and merged exactly by
log-sum-exp (one softmax over all of them):

* **local band** – keys within ``n_local`` positions, ordinary logits. Queries are cut into blocks of
  ``BLOCK`` rows; every block's keys are one fixed-length slice, so all blocks go to PyTorch's fused CPU flash
  kernel in *one* batched call with a small band mask (no n×n mask, no Python loop over blocks or heads);
* **global** – the first ``n_global`` tokens once they fall out of the window, seen at distance
  ``distance_limit``: queries are rotated to position ``distance_limit`` and keys to position 0;
* **top-k middle** (optional) – for generation-time queries, the ``top_k`` middle keys with the highest logits,
  also at distance ``distance_limit``.

Grouped-query attention is handled by folding the query heads of a group into the rows of one kv head, so keys
and values are never repeated.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any

import torch

from .config import LMInfiniteConfig
from .rope import shift_positions

ATTENTION_NAME = "lminf"
BLOCK = 256  # query rows per band block: fastest on 2-core AVX-512 and AMX CPUs (python -m bench band)
_NEG_INF = float("-inf")
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


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


# The cache's ``update`` and the attention call happen back to back in one thread for one layer; the cache leaves
# its prepared keys here, and the attention function only uses them if the key tensor it receives is theirs.
_handoff = threading.local()


def hand_over(prepared: PreparedKeys) -> None:
    _handoff.prepared = prepared


def _take_prepared(key: torch.Tensor) -> PreparedKeys | None:
    prepared = getattr(_handoff, "prepared", None)
    _handoff.prepared = None
    if prepared is not None and prepared.local_keys is key:
        return prepared
    return None


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
    if attention_mask is not None:
        raise ValueError(
            "LM-Infinite attention does not support padded batches; pass one sequence, or sequences of equal length"
        )
    prepared = _take_prepared(key) or _from_full_history(key, value, settings)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend(query, prepared, settings, scale)
    return out, None


def attend(query: torch.Tensor, prepared: PreparedKeys, settings: LayerSettings, scale: float) -> torch.Tensor:
    """All branches for queries at positions ``[last - Lq + 1, last]``; returns ``(B, Lq, H, D)``."""
    cfg = settings.config
    batch, n_heads, n_queries, head_dim = query.shape
    n_kv = prepared.local_keys.shape[1]
    rep = n_heads // n_kv
    if prepared.single_softmax:
        # One query: the kernel's own grouped-query support splits the work over query heads, which balances
        # better across threads than a few folded rows (decode attention 30% faster at a 4K window here).
        q = query if n_queries == 1 else _fold(query, n_kv)
        out, _ = _flash(q, prepared.local_keys, prepared.local_values, 0.0, False, attn_mask=prepared.mask, scale=scale)
        return out.view(batch, n_heads, n_queries, head_dim).transpose(1, 2)
    last = prepared.local_start + prepared.local_keys.shape[-2] - 1
    first = last - n_queries + 1

    parts = [_local_band(query, prepared, cfg.n_local, first, scale)]
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
        positions = torch.arange(first, last + 1, device=query.device)
        far_query = _fold(shift_positions(query, distance - positions, settings.inv_freq), n_kv)
        if needs_far:
            parts.append(_global_part(far_query, prepared, cfg, first, rep, scale))
        if needs_top_k:
            parts.append(_top_k_part(far_query, prepared, cfg, first, rep, scale))
    out = parts[0][0] if len(parts) == 1 else _merge(parts)[0].to(query.dtype)
    return out.view(batch, n_kv, rep, n_queries, head_dim).reshape(batch, n_heads, n_queries, head_dim).transpose(1, 2)


def _fold(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(B, H, L, D) → (B, kv_heads, rep·L, D): the query heads sharing a kv head become rows."""
    b, h, length, d = x.shape
    return x.reshape(b, n_kv, (h // n_kv) * length, d)


def _fold_output(out: torch.Tensor, lse: torch.Tensor, n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A kernel's (B, H, L, D) output and (B, H, L) log-sum-exp in the folded layout of :func:`_fold`."""
    return _fold(out, n_kv), lse.reshape(lse.shape[0], n_kv, -1)


def _local_band(
    query: torch.Tensor, prepared: PreparedKeys, window: int, first: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordinary attention to keys within ``window`` positions; returns folded output and its log-sum-exp."""
    keys, values, start = prepared.local_keys, prepared.local_values, prepared.local_start
    n_kv, n_queries = keys.shape[1], query.shape[-2]
    last = start + keys.shape[-2] - 1
    if start > max(0, first - window + 1):
        raise RuntimeError(f"cache kept keys from position {start}, but a query at {first} needs the full window")
    if n_queries == 1:
        # One query sees every key of its window, in any order: no mask at all (and no folding, as above).
        keep = min(keys.shape[-2], window)
        if keep < keys.shape[-2]:
            keys, values = keys[:, :, -keep:], values[:, :, -keep:]
        out, lse = _flash(query, keys, values, 0.0, False, scale=scale)
        return _fold_output(out, lse, n_kv)
    if last - window + 1 <= start:  # even the last query sees every key: no band yet
        return _causal_no_band(query, keys, values, n_queries, scale)
    return _banded_blocks(query, keys, values, window, first - start, last - start, scale)


def _causal_no_band(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n_queries: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query sees all earlier keys (the window is not yet full): plain causal attention."""
    n_kv = keys.shape[1]
    rep = query.shape[1] // n_kv
    # The fused kernel's causal mask is top-left aligned, so it takes the square part; earlier keys are unmasked.
    square_k = keys[:, :, -n_queries:].repeat_interleave(rep, dim=1)
    square_v = values[:, :, -n_queries:].repeat_interleave(rep, dim=1)
    out, lse = _flash(query, square_k, square_v, 0.0, True, scale=scale)
    out, lse = _fold_output(out, lse, n_kv)
    if keys.shape[-2] == n_queries:
        return out, lse
    prefix = _flash(_fold(query, n_kv), keys[:, :, :-n_queries], values[:, :, :-n_queries], 0.0, False, scale=scale)
    out, lse = _merge([(out, lse), prefix])
    return out.to(query.dtype), lse


def _banded_blocks(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    window: int,
    first_index: int,
    last_index: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The band |i - j| < window, as batched fused-kernel calls over query blocks.

    Indices are into ``keys``. The block starting at query index ``a`` needs keys ``[a - window + 1, a + BLOCK)``:
    ``window + BLOCK - 1`` of them, a fixed length, so the blocks' keys are strided views of one padded tensor.
    Of those, the ``window - BLOCK + 1`` keys ``[a + BLOCK - window, a]`` are seen by every query of the block:
    they go through the kernel without a mask (masked scores cost ~40% more per key), and only the two edge
    triangles take a masked call; the two parts are merged by log-sum-exp.
    """
    batch, n_heads, n_queries, head_dim = query.shape
    n_kv = keys.shape[1]
    rep = n_heads // n_kv
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

    q = torch.nn.functional.pad(query, (0, 0, 0, n_blocks * block - n_queries))
    q = q.view(batch, n_kv, rep, n_blocks, block, head_dim).permute(0, 3, 1, 2, 4, 5)
    q = q.reshape(batch * n_blocks, n_kv, rep * block, head_dim)

    mask_key = (block, span, window, n_blocks, offset - left_pad, last_index, rep, query.dtype, query.device)
    if left_pad == 0 and window > block:  # every block's window is full: interior + edges
        interior = _flash(
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
        edges = _flash(q, edge_k, edge_v, 0.0, False, attn_mask=mask, scale=scale)
        out, lse = _merge([interior, edges])
        out = out.to(query.dtype)
    else:  # the start of a sequence (window not yet full): one call over the whole span
        mask = _batched(_band_mask(*mask_key), batch)
        whole_k, whole_v = blocks_of(padded_k, 0, span), blocks_of(padded_v, 0, span)
        out, lse = _flash(q, whole_k, whole_v, 0.0, False, attn_mask=mask, scale=scale)
    out = out.view(batch, n_blocks, n_kv, rep, block, head_dim).permute(0, 2, 3, 1, 4, 5)
    out = out.reshape(batch, n_kv, rep, n_blocks * block, head_dim)[:, :, :, :n_queries]
    lse = lse.view(batch, n_blocks, n_kv, rep, block).permute(0, 2, 3, 1, 4)
    lse = lse.reshape(batch, n_kv, rep, n_blocks * block)[..., :n_queries]
    return out.reshape(batch, n_kv, rep * n_queries, head_dim), lse.reshape(batch, n_kv, rep * n_queries)


def _pad_rows(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, 0, before, after)) if before or after else x


def _batched(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-block masks (first dim n_blocks) repeated for each sequence of the batch (blocks are batch-major)."""
    return mask.repeat(batch, 1, 1, 1) if mask.shape[0] > 1 and batch > 1 else mask


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial attentions over disjoint key sets into one softmax, exactly; returns the float32 output and
    the joint log-sum-exp. The first part must see a key in every row (the local band always does: its own key), so
    the running log-sum-exp stays finite and later parts may have rows with nothing visible (lse = -inf)."""
    out, lse = parts[0]
    for part_out, part_lse in parts[1:]:
        joint = torch.logaddexp(lse, part_lse)
        out = torch.lerp(part_out.float(), out.float(), torch.exp(lse - joint).unsqueeze(-1))
        lse = joint
    return out.float(), lse


@functools.lru_cache(maxsize=2)
def _band_mask(
    block: int,
    span: int,
    window: int,
    n_blocks: int,
    first_key_index: int,
    last_index: int,
    rep: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Additive mask ``(n_blocks or 1, 1, rep·block, span)`` of the band; built once per forward, shared by layers.

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
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, _NEG_INF)
    return mask.repeat(1, rep, 1)[:, None]


@functools.lru_cache(maxsize=2)
def _edge_mask(block: int, span: int, window: int, *rest: Any) -> torch.Tensor:
    """The band mask's edge columns: ``[0, block - 1)`` (keys leaving the window) and ``[window, span)`` (causal)."""
    band = _band_mask(block, span, window, *rest)
    return torch.cat([band[..., : block - 1], band[..., window:]], dim=-1)


def _global_part(
    far_query: torch.Tensor, prepared: PreparedKeys, cfg: LMInfiniteConfig, first: int, rep: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global tokens that are out of a query's window, seen at distance ``distance_limit``."""
    assert prepared.sink_keys is not None and prepared.sink_values is not None
    keys, values = prepared.sink_keys, prepared.sink_values
    if first - (keys.shape[-2] - 1) >= cfg.n_local:
        # Every query is past every global key's window (all of a chunk after the first n_local + n_global
        # tokens): no mask, one fused call.
        out, lse = _flash(far_query, keys, values, 0.0, False, scale=scale)
        return out, lse
    n_queries = far_query.shape[-2] // rep
    positions = torch.arange(first, first + n_queries, device=far_query.device).repeat(rep)
    key_positions = torch.arange(keys.shape[-2], device=far_query.device)
    visible = positions[:, None] - key_positions[None, :] >= cfg.n_local
    logits = torch.matmul(far_query.float(), keys.float().transpose(-1, -2)) * scale
    return _softmax_part(logits.masked_fill(~visible, _NEG_INF), values)


def _top_k_part(
    far_query: torch.Tensor, prepared: PreparedKeys, cfg: LMInfiniteConfig, first: int, rep: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query head's ``top_k`` strongest middle keys (``n_global <= j <= i - n_local``), for generation-time
    queries only (positions ``>= top_k_from_position``)."""
    assert prepared.middle_keys is not None and prepared.middle_values is not None
    n_queries = far_query.shape[-2] // rep
    start = prepared.top_k_from_position if prepared.top_k_from_position is not None else first + n_queries - 1
    skip = min(max(0, start - first), n_queries)
    if skip > 0:
        # Only generation-time queries take part: score just those rows (a whole prompt in one forward would
        # otherwise cost n × n logits), and give the others an empty part (lse = -inf).
        b, kv, _, d = far_query.shape
        rows = far_query.view(b, kv, rep, n_queries, d)[:, :, :, skip:].reshape(b, kv, rep * (n_queries - skip), d)
        out, lse = _top_k_part(rows, prepared, cfg, first + skip, rep, scale)
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


def _softmax_part(logits: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention from masked float32 logits; rows with nothing visible get lse = -inf and output 0."""
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.exp(logits - lse[..., None]).nan_to_num(0.0)
    return torch.matmul(weights, values.float()), lse
