"""Segments read once, after a shared prefix, kept stacked; and how certain the model is about a question after each.

Every segment is read after the same short prefix (the prompt's opening and the document's first tokens), as the
answer prompt will have it, so each is scored in the context it is answered in. Segments read together form a
:class:`SegmentBlock`: per layer one tensor of keys and one of values, a row per segment, right-padded. Right
padding costs nothing in exactness: under causal attention no real token sees a later pad. A question is then
scored against many rows in one forward (batched), each row's pads hidden by the attention mask and the question
placed right after that row's own last token.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from transformers import AttentionInterface, PreTrainedModel, PreTrainedTokenizerBase
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ...cpu import decodes_faster_without_onednn, onednn_off
from ...hf_compat import cache_kwargs
from ...models import input_device
from ...ops.partial import additive_mask, combine, flash
from ..vanilla import FullCache

# Tokens per forward when reading segments (rows × segment length): big enough for efficient matrix products,
# small enough that one forward's activations stay well under a GiB for models of a few billion parameters.
READ_TOKENS = 4096
# Bytes of fp32 logits one scoring forward may produce (rows × question tokens × vocabulary × 4).
SCORE_LOGIT_BYTES = 2**28
# Logits turned into log-probabilities at once (float32 elements): a few MiB, reused from one chunk to the next,
# where converting a forward's logits whole allocates tens of MiB afresh per call (page faults cost more than the
# arithmetic on a CPU).
_LOGSUMEXP_ELEMENTS = 1 << 19


ROWS_ATTENTION = "lminf_xl3m_rows"


@dataclass
class _Rows:
    """The rows a scoring forward's new tokens follow: per layer their keys and values ``[rows, kv_heads, width,
    head_dim]`` (views of a block, or its rows gathered), and how many positions of each row are seen."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    lengths: torch.Tensor
    _hidden: dict[tuple[int | None, torch.device], torch.Tensor] = field(default_factory=dict)

    def hidden(self, layer: int, n_queries: int, window: int | None) -> torch.Tensor:
        """The bias added to the new tokens' logits over the rows' keys at ``layer``: 0 where seen, -inf at a row's
        padding and, with a sliding ``window``, at keys at least that many positions before the new token (the
        new tokens stand at ``length, length + 1, ...`` of their row). ``[rows, 1, 1 or n_queries, width]``, made
        once per window and device (a model split over devices has its layers' keys on theirs)."""
        keys = self.layers[layer][0]
        if (window, keys.device) not in self._hidden:
            lengths = self.lengths.to(keys.device)[:, None, None]
            key = torch.arange(keys.shape[2], device=keys.device)[None, None, :]
            seen = key < lengths
            if window is not None:
                seen = seen & (lengths + torch.arange(n_queries, device=keys.device)[None, :, None] - key < window)
            self._hidden[window, keys.device] = additive_mask(seen, keys.dtype)[:, None]
        return self._hidden[window, keys.device]


# The rows while a scoring forward that reads them in place runs (``_row_logits``).
_ROWS: contextvars.ContextVar[_Rows | None] = contextvars.ContextVar("lminf_xl3m_rows", default=None)


def rows_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of a few new tokens after each of many rows of a block, the rows' keys and values read where they
    are: the new tokens attend causally among themselves and, through a bias that hides padding (and what a
    sliding window hides), to their row's keys; the two parts merge exactly by their log-sum-exps
    (:func:`...ops.partial.combine`). ``attention_mask`` (the new tokens' own, without the rows) is not used.

    Why: transformers' cache concatenates the rows' keys with the new ones at every layer, a copy of every row per
    forward; for the hop's many long rows that copy cost about as much as the attention itself."""
    rows = _ROWS.get()
    if rows is None:
        raise RuntimeError(f"{ROWS_ATTENTION} runs only inside a scoring forward (scoring._row_logits)")
    layer = int(getattr(module, "layer_idx", 0))
    keys, values = rows.layers[layer]
    n = query.shape[2]
    if sliding_window is None or sliding_window >= n:
        own = flash(query, key, value, is_causal=True, scale=scaling)  # sees its own key: a finite first part
    else:
        offset = torch.arange(n, device=query.device)
        seen = (offset[None, :] <= offset[:, None]) & (offset[:, None] - offset[None, :] < sliding_window)
        own = flash(query, key, value, attn_mask=additive_mask(seen, query.dtype)[None, None], scale=scaling)
    before = flash(query, keys, values, attn_mask=rows.hidden(layer, n, sliding_window), scale=scaling)
    return combine([own, before], [], query.dtype), None


AttentionInterface.register(ROWS_ATTENTION, rows_attention)
AttentionMaskInterface.register(ROWS_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def attention_implementation(model: PreTrainedModel, name: str) -> Iterator[None]:
    """``model`` with the registered attention ``name`` for the duration (the caller holds the model's lock)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def segment_key(model: PreTrainedModel, ids: Sequence[int]) -> tuple[int, str]:
    """What identifies a read segment: the model and its tokens (prefix included)."""
    return id(model), hashlib.sha256(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes()).hexdigest()


def rows_by_block(
    places: Sequence[tuple[SegmentBlock, int]], indices: Iterable[int]
) -> list[tuple[SegmentBlock, list[int]]]:
    """``indices`` (into ``places``: each segment's block and row) grouped by block, in order of first appearance."""
    by_block: dict[int, tuple[SegmentBlock, list[int]]] = {}
    for index in indices:
        block = places[index][0]
        by_block.setdefault(id(block), (block, []))[1].append(index)
    return list(by_block.values())


@dataclass
class SegmentBlock:
    """Segments read together after one prefix. Per layer, keys and values of shape
    ``[rows, kv_heads, width, head_dim]``; row ``i`` holds ``lengths[i]`` real positions (prefix included), then
    padding."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lengths: list[int]

    @property
    def width(self) -> int:
        return int(self.keys[0].shape[2])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def row_cache(self, row: int) -> FullCache:
        """A cache of row ``row`` alone (a copy: the block is never written to), as a prompt's prefix."""
        return self.prefix_cache(row, self.lengths[row])

    def prefix_cache(self, row: int, length: int) -> FullCache:
        """A cache of row ``row``'s first ``length`` positions (the prefix every row of the block was read after)."""
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"prefix length {length} outside row {row} of {self.lengths[row]} positions")
        cache = FullCache()
        for index, (keys, values) in enumerate(zip(self.keys, self.values, strict=True)):
            cache.update(keys[row : row + 1, :, :length].clone(), values[row : row + 1, :, :length].clone(), index)
        return cache


@torch.inference_mode()
def read(model: PreTrainedModel, ids: Sequence[int]) -> FullCache:
    """``ids`` read by the (unpatched) model from position 0."""
    cache = FullCache()
    if ids:
        model.get_decoder()(
            input_ids=torch.tensor([list(ids)], device=input_device(model)), use_cache=True, **cache_kwargs(cache)
        )
    return cache


@torch.inference_mode()
def read_block(
    model: PreTrainedModel,
    prefix: FullCache,
    segments: Sequence[Sequence[int]],
    report: Callable[[int], None] | None = None,
) -> SegmentBlock:
    """Each of ``segments`` read after ``prefix``, several per forward; ``report(tokens)`` after each forward."""
    if not segments or not all(segments):
        raise ValueError("read_block needs non-empty segments")
    start = prefix.get_seq_length()
    longest = max(len(segment) for segment in segments)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    rows = max(1, READ_TOKENS // longest)
    for first in range(0, len(segments), rows):
        group = segments[first : first + rows]
        width = max(len(segment) for segment in group)
        # Padding repeats each row's last token; causal attention keeps it out of every real position.
        tokens = torch.tensor([[*s, *[s[-1]] * (width - len(s))] for s in group], device=input_device(model))
        cache = FullCache()
        for index, (prefix_keys, prefix_values) in enumerate(prefix.key_values()):
            shape = (len(group), -1, -1, -1)
            cache.update(prefix_keys.expand(*shape), prefix_values.expand(*shape), index)
        model.get_decoder()(input_ids=tokens, use_cache=True, **cache_kwargs(cache))
        for index, (read_keys, read_values) in enumerate(cache.key_values()):
            if len(keys) <= index:  # zeros, not empty: masked padding must still be finite (0 × NaN is NaN)
                shape = (len(segments), read_keys.shape[1], start + longest, read_keys.shape[3])
                keys.append(read_keys.new_zeros(shape))
                values.append(read_values.new_zeros(shape))
            keys[index][first : first + len(group), :, : start + width] = read_keys
            values[index][first : first + len(group), :, : start + width] = read_values
        if report:
            report(sum(len(segment) for segment in group))
    return SegmentBlock(keys, values, [start + len(segment) for segment in segments])


def question_start(tokenizer: PreTrainedTokenizerBase, query: Sequence[int]) -> int:
    """How many of ``query``'s first tokens only join it to the text before: its leading line breaks and spaces.

    Scoring starts after them. How likely a line break is after a segment says whether the segment ended at a
    paragraph's end, not whether it answers the question; on the default model that one token moved a segment's
    mean score by more than the question's own words did (README, "Choosing a strategy").
    """
    blank = 0
    while blank < len(query) and not str(tokenizer.decode([query[blank]])).strip():
        blank += 1
    return blank if blank < len(query) else 0


def _row_logits(
    model: PreTrainedModel,
    block: SegmentBlock,
    rows: Sequence[int],
    query: Sequence[int],
    keep: Sequence[int],
    lengths: Sequence[int] | None = None,
) -> Iterator[torch.Tensor]:
    """Logits ``[rows, len(keep), vocabulary]`` (the model's dtype) at ``keep`` (positions in ``query``) of
    ``query`` read right after each of ``rows`` (after its first ``lengths[i]`` positions when given), a few rows
    per forward (bounded by ``SCORE_LOGIT_BYTES``), in order. Only the kept positions go through the output layer:
    over a large vocabulary it is most of a short query's cost. The block is left as it was."""
    q = len(query)
    read_to = [block.lengths[row] for row in rows] if lengths is None else list(lengths)
    if len(read_to) != len(rows) or not all(0 < n <= block.lengths[row] for n, row in zip(read_to, rows, strict=True)):
        raise ValueError(f"lengths {read_to} must give each of rows {list(rows)} between 1 and its own length")
    vocabulary = int(model.config.vocab_size)
    per_forward = max(1, SCORE_LOGIT_BYTES // (4 * max(len(keep), 1) * vocabulary))
    device = input_device(model)
    for first in range(0, len(rows), per_forward):
        chosen = list(rows[first : first + per_forward])
        if chosen == list(range(chosen[0], chosen[0] + len(chosen))):  # a slice: a view, no copy
            pick = slice(chosen[0], chosen[0] + len(chosen))
            layers = [(k[pick], v[pick]) for k, v in zip(block.keys, block.values, strict=True)]
        else:
            index = torch.tensor(chosen, device=block.keys[0].device)
            layers = []
            for k, v in zip(block.keys, block.values, strict=True):
                at = index.to(k.device)  # a split model's layers may sit on several GPUs
                layers.append((k[at], v[at]))
        lengths_now = torch.tensor(read_to[first : first + per_forward])
        # Each row sees its own positions and the question, not its padding; the question continues its positions.
        positions = lengths_now[:, None] + torch.arange(q)[None, :]
        tokens = torch.tensor([list(query)] * len(chosen))
        token = _ROWS.set(_Rows(layers, lengths_now))
        try:
            with attention_implementation(model, ROWS_ATTENTION):
                logits = model(
                    input_ids=tokens.to(device),
                    position_ids=positions.to(device),
                    use_cache=False,
                    logits_to_keep=torch.tensor(list(keep), device=device),
                ).logits
        finally:
            _ROWS.reset(token)
        yield logits


def _gathered_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)`` in float32 at ``targets`` (one per position): ``[rows, positions]`` from logits
    ``[rows, positions, vocabulary]``, as the target's logit less the log-sum-exp, a few positions at a time
    (``_LOGSUMEXP_ELEMENTS``)."""
    rows, count, vocabulary = logits.shape
    flat = logits.reshape(rows * count, vocabulary)
    wanted = targets.to(logits.device).repeat(rows)[:, None]
    out = torch.empty(rows * count, dtype=torch.float32, device=logits.device)
    step = max(1, _LOGSUMEXP_ELEMENTS // vocabulary)
    for first in range(0, rows * count, step):
        part = flat[first : first + step].float()
        out[first : first + step] = part.gather(-1, wanted[first : first + step])[:, 0] - part.logsumexp(-1)
    return out.reshape(rows, count)


@torch.inference_mode()
def token_logprobs(
    model: PreTrainedModel,
    block: SegmentBlock,
    rows: Sequence[int],
    query: Sequence[int],
    scored: int | Sequence[int] | None = None,
    lengths: Sequence[int] | None = None,
) -> torch.Tensor:
    """The log-probability of each of ``query``'s last ``scored`` tokens read right after each of ``rows``:
    ``[len(rows), scored]`` (default: all but the first, which follows the segment's last token, whose logits are
    not kept; the tokens before them condition the rest, say an instruction before the question). ``scored`` may
    also list the positions (in ``query``, each at least 1) whose tokens are wanted. ``lengths``: each row read only
    up to that many of its positions (say the shared prefix alone, in the same forward as whole rows)."""
    if scored is None or isinstance(scored, int):
        if len(query) < 2:
            raise ValueError("scoring by log-likelihood needs a question of at least 2 tokens")
        count = len(query) - 1 if scored is None else max(1, min(scored, len(query) - 1))
        positions = list(range(len(query) - count, len(query)))
    else:
        positions = list(scored)
        if not positions or not all(1 <= p < len(query) for p in positions):
            raise ValueError(f"scored positions must be non-empty and within 1..{len(query) - 1}, got {positions}")
    targets = torch.tensor([query[p] for p in positions])
    parts = [
        _gathered_logprobs(logits, targets).cpu()
        for logits in _row_logits(model, block, rows, query, [p - 1 for p in positions], lengths)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, len(positions))


@torch.inference_mode()
def score_rows(
    model: PreTrainedModel,
    block: SegmentBlock,
    rows: Sequence[int],
    query: Sequence[int],
    score: str,
    scored: int | None = None,
) -> list[float]:
    """How certain the model is about ``query`` read right after each of ``rows`` (higher: more certain).

    ``"loglik"``: the mean of :func:`token_logprobs`; ``"entropy"``: minus the entropy of the next token after the
    query, where the answer would start. (``"contrast"`` compares rows with each other: :func:`contrast_scores`.)
    """
    if score == "entropy":
        scores: list[float] = []
        for logits in _row_logits(model, block, rows, query, [len(query) - 1]):
            logp = logits[:, -1].float().log_softmax(-1)
            scores.extend((logp.exp() * logp).sum(-1).tolist())
        return scores
    return token_logprobs(model, block, rows, query, scored).mean(-1).tolist()


@torch.inference_mode()
def answer_start(
    model: PreTrainedModel,
    cache: FullCache,
    rest: Sequence[int],
    known: set[int],
    tokens: int,
    steps: int,
    stop: set[int],
) -> list[float]:
    """How sure the model is of its answer's start: the probabilities of the first ``tokens`` greedily generated
    tokens not in ``known`` (the question's own), from at most ``steps`` generated, ending at a ``stop`` token.

    ``cache`` holds the prompt's beginning; ``rest`` (its other tokens) is read into it, and what is generated after
    is dropped from it again, so that it then holds every prompt token but the last, as a prompt's prefill does.
    """
    length = cache.get_seq_length() + len(rest)
    device = input_device(model)
    logits = model(input_ids=torch.tensor([list(rest)], device=device), use_cache=True, logits_to_keep=1,
                   **cache_kwargs(cache)).logits  # fmt: skip
    found: list[float] = []
    # One row per step, as the answer's own decoding runs it (oneDNN off where that is faster: ``cpu``).
    quiet = onednn_off() if decodes_faster_without_onednn(model.dtype, device) else contextlib.nullcontext()
    with quiet:
        for step in range(steps):
            probabilities = logits[0, -1].float().softmax(-1)
            token = int(probabilities.argmax())
            if token in stop:
                break
            if token not in known:
                found.append(float(probabilities[token]))
                if len(found) == tokens:
                    break
            if step + 1 < steps:
                logits = model(input_ids=torch.tensor([[token]], device=device), use_cache=True,
                               **cache_kwargs(cache)).logits  # fmt: skip
    cache.keep_first(length - 1)
    return found


def contrast_scores(logprobs: torch.Tensor, tokens: int) -> list[float]:
    """Each row's mean gain, over its ``tokens`` best, of a question token's log-probability after that row against
    the mean of all rows' (``logprobs``: ``[rows, question tokens]``, as :func:`token_logprobs` gives).

    Why: a mean log-likelihood favours a segment that makes the question's common words likely ("archive code"
    said many times); the segment holding the one sentence that names what the question asks about ("the violet
    kettle") predicts a few words far better than every other candidate does, and only those words say so
    (README, 'Choosing a strategy').
    """
    if logprobs.shape[0] == 0:
        return []
    gain = logprobs - logprobs.mean(0, keepdim=True)
    return gain.topk(max(1, min(tokens, gain.shape[1])), dim=1).values.mean(1).tolist()


def _default_max_bytes() -> int:
    """Half the machine's memory: a document's segments take about its keys/values once over."""
    return int(psutil.virtual_memory().total // 2)


@dataclass
class _Entry:
    block: SegmentBlock
    keys: list[tuple[int, str]] = field(default_factory=list)


class SegmentStore:
    """Read segments by their tokens (prefix included), per model, in blocks; least recently used blocks out first,
    bounded by bytes (default: half the machine's memory)."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = _default_max_bytes() if max_bytes is None else max_bytes
        self._where: dict[tuple[int, str], tuple[SegmentBlock, int]] = {}
        self._blocks: OrderedDict[int, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self.encoded = 0  # segments read rather than found (tests and reports)

    def locate(
        self,
        model: PreTrainedModel,
        prefix_ids: Sequence[int],
        segments: Sequence[Sequence[int]],
        report: Callable[[int], None] | None = None,
    ) -> list[tuple[SegmentBlock, int]]:
        """Where each of ``segments`` (read after ``prefix_ids``) is: found, or read now (the missing ones
        together, in one new block); ``report(tokens)`` as segments are read."""
        keys = [segment_key(model, [*prefix_ids, *segment]) for segment in segments]
        with self._lock:
            first_of: dict[tuple[int, str], int] = {}  # each missing segment once (a repeated one is read once)
            for i, key in enumerate(keys):
                if key not in self._where:
                    first_of.setdefault(key, i)
            missing = list(first_of.values())
            found = {key: self._where[key] for key in keys if key in self._where}
            if missing:
                block = read_block(model, read(model, prefix_ids), [segments[i] for i in missing], report)
                self.encoded += len(missing)
                new = {keys[i]: (block, row) for row, i in enumerate(missing)}
                found.update(new)
                self.add(block, list(new))
            for used in {id(found[key][0]) for key in keys}:
                if used in self._blocks:
                    self._blocks.move_to_end(used)
            return [found[key] for key in keys]

    def add(self, block: SegmentBlock, keys: Sequence[tuple[int, str]]) -> None:
        """Keep ``block``, whose row ``i`` is the segment ``keys[i]`` (a block larger than the bound is not kept)."""
        size = block.nbytes()
        with self._lock:
            if size > self.max_bytes or id(block) in self._blocks:
                return
            self._blocks[id(block)] = _Entry(block, list(keys))
            for row, key in enumerate(keys):
                self._where[key] = (block, row)
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._blocks) > 1:
                _, dropped = self._blocks.popitem(last=False)
                self._bytes -= dropped.block.nbytes()
                for key in dropped.keys:
                    if self._where.get(key, (None,))[0] is dropped.block:
                        del self._where[key]
