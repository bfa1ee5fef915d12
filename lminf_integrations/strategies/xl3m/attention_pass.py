"""A cheap first ranking of a document's segments: where the model's own attention, asked the question, looks.

Scoring every segment by the likelihood of the question after it (:func:`.scoring.score_rows`) costs the question's
tokens through the whole model once per segment, which at a hundred segments dominates a question's time. This
pass costs one forward of the question alone: the question is read after the shared prefix, its query vectors are
recorded at every layer, and at every other layer of the middle half they are matched against the keys every
segment already has in the document's state (computed when the segments were read). For each attention head and
question token, each segment is represented by its best-matching key (its largest attention logit, the shared
prefix left out); a softmax over the segments gives the head's weight on each, averaged over the
``ATTENTION_TOKENS`` question tokens that weigh it most (of its words: the line breaks before them only condition
them); a segment's score is its largest weight in any head.

Why these choices (measured on ``python -m bench rag-vs-full`` documents; README, "Choosing a strategy"):

- The largest weight in any head, not a sum over heads: most heads spread their attention evenly over segments of
  similar text, while a few (the "retrieval heads" of Wu et al., 2024) put most of it on the text the question
  asks about. Summing buries those few under the rest; the maximum keeps them, with no list of heads to learn per
  model.
- The best key per segment, not the attention mass over all of its keys (a log-sum-exp per segment): both ranked
  the segments a question needs among the first few alike, and the maximum costs a comparison per logit where
  the mass costs an exponential.
- The question tokens that weigh a segment most, not all of them: "the archive code of the place where the olive
  statuette is kept" is found by "olive statuette", which one segment holds; the words every such question shares
  ("archive code", "kept") spread their weight over many segments, and an average over all tokens let those
  outvote it. Averaged over the best few instead, the segment holding a chain question's first fact was handed on
  to likelihood scoring more often, and every single-fact and pair-fact segment still was.
- Every other layer of the middle half: the middle holds such heads in the models studied (and in the default
  model), and neighbouring layers ranked alike, so every other one ranked as well as all of them (slightly better
  on the default model) at a quarter of the whole model's cost.

The question sees only the prefix here, not the segment, so this is a ranking to narrow the field, not the
decision: the best few segments are then scored by likelihood as before (:class:`.strategy.XL3M`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ...hf_compat import cache_kwargs
from ...models import input_device
from ...ops.partial import additive_mask
from ..vanilla import FullCache
from .scoring import SegmentBlock, attention_implementation, rows_by_block

RECORDING_ATTENTION = "lminf_xl3m_recording"
# How many of the question's tokens a segment's weight is averaged over: those that weigh it most.
ATTENTION_TOKENS = 5
# Logit elements (rows × heads × query tokens × keys) computed at once when matching queries against keys: a few
# MiB, so that each chunk's logits are reduced while still in the CPU's caches (larger chunks ran slower).
_MATCH_ELEMENTS = 1 << 21

# Per layer index: the (rotated) queries and the attention's scale, while a recording forward runs.
_RECORDED: contextvars.ContextVar[dict[int, tuple[torch.Tensor, float]] | None] = contextvars.ContextVar(
    "lminf_xl3m_recorded", default=None
)


def recording_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, keeping each layer's queries (after the position rotation) on the way."""
    recorded = _RECORDED.get()
    if recorded is not None:
        scale = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
        recorded[int(getattr(module, "layer_idx", len(recorded)))] = (query.detach(), scale)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(RECORDING_ATTENTION, recording_attention)
AttentionMaskInterface.register(RECORDING_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def _recording(model: PreTrainedModel) -> Iterator[dict[int, tuple[torch.Tensor, float]]]:
    """``model`` recording its queries for the duration (the caller holds the model's lock)."""
    recorded: dict[int, tuple[torch.Tensor, float]] = {}
    token = _RECORDED.set(recorded)
    try:
        with attention_implementation(model, RECORDING_ATTENTION):
            yield recorded
    finally:
        _RECORDED.reset(token)


@torch.inference_mode()
def question_queries(
    model: PreTrainedModel, prefix: FullCache, query: Sequence[int], start: int, first: int = 0
) -> dict[int, tuple[torch.Tensor, float]]:
    """Per layer, the queries ``[heads, tokens, head_dim]`` of ``query[first:]`` when all of ``query`` is read after
    ``prefix`` at positions ``start, start + 1, ...`` (where it would stand after a segment), and the layer's
    attention scale. The tokens before ``first`` only condition the rest (see :func:`.scoring.question_start`)."""
    if not 0 <= first < len(query):
        raise ValueError(f"first={first} leaves no token of a {len(query)}-token query")
    positions = torch.arange(start, start + len(query), device=input_device(model))[None]
    tokens = torch.tensor([list(query)], device=input_device(model))
    with _recording(model) as recorded:
        model.get_decoder()(input_ids=tokens, position_ids=positions, use_cache=True, **cache_kwargs(prefix))
    return {layer: (queries[0, :, first:], scale) for layer, (queries, scale) in recorded.items()}


def ranking_layers(n_layers: int) -> list[int]:
    """Every other layer of the middle half of a model's layers (at least one)."""
    middle = list(range(n_layers // 4, max(n_layers // 4 + 1, (3 * n_layers) // 4)))
    return middle[1::2] or middle


def _padding_bias(
    lengths: torch.Tensor, prefix: int, width: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``[rows, width]``: 0 at each row's own keys, -inf at the shared prefix's and at its padding (added to logits:
    an add ran faster than a masked fill here)."""
    position = torch.arange(width, device=device)[None, :]
    seen = (position >= prefix) & (position < lengths.to(device)[:, None])
    return additive_mask(seen, dtype)


def _row_best_logits(queries: torch.Tensor, scale: float, keys: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``[heads, tokens, rows]``: per head and query token, its largest attention logit over each row's own keys
    (``hidden``: :func:`_padding_bias` of the rows, which leaves out the shared prefix). Every key is matched, the
    prefix's too, so that each chunk of rows is one contiguous block for the matmul (a slice past the prefix made
    it copy the keys first, slower than the few extra products)."""
    heads, n_tokens, dim = queries.shape
    rows, kv_heads, width, _ = keys.shape
    groups = heads // kv_heads
    # Each key head with its query heads, in the keys' dtype: the products are summed in fp32 by the matmul, and
    # only the largest per row is kept, so storing them at the keys' precision costs the ranking nothing visible.
    grouped = queries.reshape(kv_heads, groups * n_tokens, dim).to(keys.dtype)
    per_chunk = max(1, _MATCH_ELEMENTS // max(1, heads * n_tokens * width))
    out = []
    for first in range(0, rows, per_chunk):
        logits = torch.matmul(grouped, keys[first : first + per_chunk].transpose(-1, -2))
        logits.add_(hidden[first : first + per_chunk, None, None, :])
        out.append(logits.amax(-1).float() * scale)  # [chunk, kv_heads, groups*tokens]
    return torch.cat(out).reshape(rows, heads, n_tokens).permute(1, 2, 0)


def top_token_share(logits: torch.Tensor) -> torch.Tensor:
    """``[heads, rows]`` from logits ``[heads, question tokens, rows]``: each head's weight on each row (a softmax
    over the rows), averaged over the ``ATTENTION_TOKENS`` question tokens that give that row the most."""
    weights = logits.softmax(-1)
    return weights.topk(min(ATTENTION_TOKENS, weights.shape[1]), dim=1).values.mean(1)


@torch.inference_mode()
def attention_scores(
    queries: dict[int, tuple[torch.Tensor, float]],
    places: Sequence[tuple[SegmentBlock, int]],
    prefix: int,
    layers: Sequence[int],
) -> list[float]:
    """Each segment's score (``places[i]``: its block and row, read after ``prefix`` shared tokens): its largest
    weight, in any head of ``layers``, among all segments represented by their best-matching keys, averaged over
    the question tokens that weigh it most."""
    groups = []
    for block, indices in rows_by_block(places, range(len(places))):
        rows = [places[i][1] for i in indices]
        # The rows from the first to the last used, as a view (a repeated segment is one row, used twice).
        low, high = min(rows), max(rows) + 1
        keys = block.keys[0]
        hidden = _padding_bias(torch.tensor(block.lengths[low:high]), prefix, keys.shape[2], keys.dtype, keys.device)
        groups.append((block, indices, low, high, [row - low for row in rows], hidden))
    best = torch.full((len(places),), float("-inf"))
    for layer in layers:
        query, scale = queries[layer]
        logits = torch.empty(query.shape[0], query.shape[1], len(places))
        for block, indices, low, high, picked, hidden in groups:
            keys = block.keys[layer][low:high]
            # A split model's layers (their keys) may sit on several GPUs: the bias goes where each layer's keys are.
            row_logits = _row_best_logits(query.to(keys.device), scale, keys, hidden.to(keys.device))
            logits[:, :, indices] = row_logits.cpu()[:, :, picked]
        best = torch.maximum(best, top_token_share(logits).amax(0))
    return best.tolist()


@torch.inference_mode()
def span_attention_scores(
    queries: dict[int, tuple[torch.Tensor, float]],
    spans: Sequence[tuple[SegmentBlock, int, int, int]],
    layers: Sequence[int],
) -> list[float]:
    """Each of ``spans`` (a block, a row, and the row's key positions ``[first, end)``: a passage inside a segment
    already read) scored among them as :func:`attention_scores` scores whole segments: per head and question token,
    each span's best-matching key; a softmax over the spans; averaged over the tokens that weigh it most; the largest
    in any head."""
    by_row: dict[tuple[int, int], list[int]] = {}
    for index, (block, row, _, _) in enumerate(spans):
        by_row.setdefault((id(block), row), []).append(index)
    best = torch.full((len(spans),), float("-inf"))
    for layer in layers:
        query, scale = queries[layer]
        heads, n_tokens, dim = query.shape
        logits = torch.empty(heads, n_tokens, len(spans))
        for indices in by_row.values():
            block, row = spans[indices[0]][0], spans[indices[0]][1]
            low, high = min(spans[i][2] for i in indices), max(spans[i][3] for i in indices)
            keys = block.keys[layer][row, :, low:high]  # [kv_heads, keys, dim]
            grouped = query.to(keys.device, keys.dtype).reshape(keys.shape[0], -1, dim)  # each key head's queries
            row_logits = torch.matmul(grouped, keys.transpose(-1, -2)).float().reshape(heads, n_tokens, -1).cpu()
            for i in indices:
                logits[:, :, i] = row_logits[:, :, spans[i][2] - low : spans[i][3] - low].amax(-1) * scale
        best = torch.maximum(best, top_token_share(logits).amax(0))
    return best.tolist()
