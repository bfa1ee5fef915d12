"""``strategy="xl3m"``: the model itself picks which segments of a long prompt answer its question.

XL3M (Wang et al., 2024, arXiv 2405.17755), training-free: the prompt's body is cut into segments at natural
boundaries (:mod:`.segments`); the unpatched model reads each segment (after the prompt's opening and the
document's first tokens, within its training length). For a question, a cheap pass ranks the segments by where the
question's attention falls among their kept keys (:mod:`.attention_pass`); the model then reads the question after
each of the best few, and the question words each segment makes likelier than the others do rank them
(:mod:`.scoring`, ``score="contrast"``); the best, in document order, within a token budget, are chosen; they are
cut again into passages (a sentence or line each), narrowed the same way and scored by likelihood, and the passages
scoring nearly as well as the best (and the one contrast ranks first) are kept; unless the model is already sure of
its answer from them (with ``hop_confidence``: :meth:`XL3M._read_answer`), one hop from the best of them may add
the sentence its own new words point to (:meth:`XL3M._hop`); those are read again with the question and answered
from. Every token of the document is read by the model; each segment's keys and values are computed once and kept
(:class:`.scoring.SegmentStore`, and in a document state: :class:`SegmentedDocument`), so another question about the
same document costs one pass of its tokens, its tokens after each candidate segment and each candidate passage, the
reading of those passages, and the reading of the kept text after the first kept part, whose keys and values from
the reading are exactly those of the answer prompt's beginning.

Reusing the chosen segments' keys and values for the answer instead of reading them again (rotated to their new
positions) was tried and dropped: segments read apart do not attend to each other, and the default model then
answered far fewer questions than from the same text read again (measured on ``python -m bench rag-vs-full``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ...config import XL3MConfig
from ...model_thread import Cancelled
from ...models import eos_ids
from ...ops import cached_causal
from ..base import DocumentCache, Plan, Strategy
from ..support import check_model
from ..vanilla import FullCache, Vanilla
from .attention_pass import attention_scores, question_queries, ranking_layers, span_attention_scores
from .scoring import (
    SegmentBlock,
    SegmentStore,
    answer_start,
    contrast_scores,
    question_start,
    rows_by_block,
    score_rows,
    segment_key,
    token_logprobs,
)
from .segments import sentences, split

# Tokens kept free besides the question, template and answer when the budget is derived (a safety margin).
_MARGIN = 16
# Without a context_tokens setting, the answer's context is this fraction of the training length.
CONTEXT_SHARE = 8
# The document's first tokens, read before every segment (with the prompt's opening) as the shared prefix.
SINK_TOKENS = 4
# A sentence or line shorter than this joins the next one in a passage: a heading, a line of code or "Remember it."
# is too short to be scored against the question alone (README, 'Choosing a strategy').
PASSAGE_MIN_TOKENS = 8
# With score="contrast", a segment counts by the question tokens it predicts best against the other candidates: this
# many (a question names what it asks about in a word or two, each a token or two).
CONTRAST_TOKENS = 3
# A hop scores this many segments (the best by the question's attention, besides the best passage's own segment).
HOP_CANDIDATES = 16
# With hop_confidence, how sure the model is of its answer is read off this many of the answer's first tokens that
# are not the question's own (a name or a number is a few tokens; the words an answer repeats from the question
# are sure whether or not the passages hold the answer), generating at most ANSWER_STEPS tokens (within _MARGIN:
# they are generated past the prompt before the answer is).
ANSWER_TOKENS = 4
ANSWER_STEPS = 12


@dataclass(frozen=True)
class PromptParts:
    """Where a prompt's parts are: ``ids[:head]`` the chat template's opening, ``ids[len - tail:]`` its closing,
    and the question just before the closing part."""

    head: int
    tail: int


def template_parts(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> PromptParts:
    """The chat template's opening (up to the start of the last user turn's text: system turns included) and its
    closing part, when ``ids`` is a chat prompt; none otherwise."""
    if not getattr(tokenizer, "chat_template", None):
        return PromptParts(0, 0)
    marker = "\u0000XL3M\u0000"

    def around(messages: list[dict[str, str]]) -> tuple[str, str]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before, after = str(text).split(marker)
        return before, after

    def tokens(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    plain, after = around([{"role": "user", "content": marker}])
    with_system, _ = around([{"role": "system", "content": "S"}, {"role": "user", "content": marker}])
    # The user turn's opening: the tokens the two renderings end with in common (say "<|im_start|>user\n"), in
    # tokens, so that it never starts inside one ("|>" is the end of both "<|im_start|>" and "<|eot_id|>").
    alone, after_system = tokens(plain), tokens(with_system)
    common = 0
    while common < min(len(alone), len(after_system)) and alone[-1 - common] == after_system[-1 - common]:
        common += 1
    opening = alone[len(alone) - common :]
    # A part's whitespace next to the text may be tokenized with it ("\n\n" + "Paragraph": Llama 3's user turn):
    # each part is looked for as rendered, then without that whitespace, which then counts as the text's.
    # The closing part is found where it starts, not only at the very end: a template's switches (Qwen3's
    # enable_thinking=False) add to what follows it.
    t = _last_at(ids, [tokens(closing) for closing in dict.fromkeys((after, after.lstrip()))], len(ids))
    t = len(ids) - t if t is not None else 0
    bare = list(opening)
    while bare and not str(tokenizer.decode(bare[-1:])).strip():
        bare.pop()
    parts = [opening] if bare == opening else [opening, bare]  # each looked for once: a plain prompt has neither
    end = _last_at(ids, parts, len(ids) - t, after_it=True)  # the last user turn
    return PromptParts(end or 0, t)


def _last_at(ids: list[int], parts: list[list[int]], before: int, after_it: bool = False) -> int | None:
    """Where the first of ``parts`` (non-empty) found in ``ids[:before]`` last starts (``after_it``: ends)."""
    for part in parts:
        for start in range(before - len(part), -1, -1):
            if part and ids[start : start + len(part)] == part:
                return start + len(part) if after_it else start
    return None


@dataclass
class SegmentedDocument:
    """A document read in segments: its state (``DocumentState.cache``) for ``strategy="xl3m"``.

    ``prefix``: how many of the state's first tokens every segment was read after; ``spans``: each segment's
    ``[start, end)`` in the state's tokens; ``places``: where its keys and values are (block, row). Never written
    to, so copies share it.
    """

    prefix: int = 0
    spans: list[tuple[int, int]] = field(default_factory=list)
    places: list[tuple[SegmentBlock, int]] = field(default_factory=list)

    def _blocks(self) -> list[SegmentBlock]:
        unique: dict[int, SegmentBlock] = {}
        for block, _ in self.places:
            unique.setdefault(id(block), block)
        return list(unique.values())

    def nbytes(self) -> int:
        return sum(block.nbytes() for block in self._blocks())

    def clone(self) -> SegmentedDocument:
        return self

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.spans[-1][1] if self.spans else self.prefix

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], list[dict[str, int | None]]]:
        """Each block's keys and values (``block.{b}.layer.{l}.keys``/``.values``) and, per segment, its span,
        block, row and length."""
        blocks = self._blocks()
        number = {id(block): b for b, block in enumerate(blocks)}
        tensors: dict[str, torch.Tensor] = {}
        for b, block in enumerate(blocks):
            for index, (keys, values) in enumerate(zip(block.keys, block.values, strict=True)):
                tensors[f"block.{b}.layer.{index}.keys"], tensors[f"block.{b}.layer.{index}.values"] = keys, values
        rows: list[dict[str, int | None]] = [
            {"prefix": self.prefix, "start": start, "end": end, "block": number[id(block)], "row": row,
             "length": block.lengths[row]}
            for (start, end), (block, row) in zip(self.spans, self.places, strict=True)
        ]  # fmt: skip
        return tensors, rows

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], layers: Sequence[Mapping[str, int | None]]) -> None:
        """Fill this empty document with what :meth:`state_tensors` returned."""
        if self.spans:
            raise ValueError("load_state_tensors needs an empty SegmentedDocument")
        blocks: dict[int, SegmentBlock] = {}
        for info in layers:
            b, row = int(info["block"] or 0), int(info["row"] or 0)
            if b not in blocks:
                count = sum(1 for name in tensors if name.startswith(f"block.{b}.layer.") and name.endswith(".keys"))
                keys = [tensors[f"block.{b}.layer.{index}.keys"] for index in range(count)]
                values = [tensors[f"block.{b}.layer.{index}.values"] for index in range(count)]
                blocks[b] = SegmentBlock(keys, values, [0] * int(keys[0].shape[0]))
            blocks[b].lengths[row] = int(info["length"] or 0)
            self.prefix = int(info["prefix"] or 0)
            self.spans.append((int(info["start"] or 0), int(info["end"] or 0)))
            self.places.append((blocks[b], row))


@dataclass(frozen=True)
class _Layout:
    """Where a prompt's parts are: ``ids[:head]`` the template's opening, ``ids[head:body_end]`` the body
    (segmented), ``ids[body_end:len - tail]`` the question, ``ids[len - tail:]`` the template's closing."""

    head: int
    body_end: int
    tail: int


class XL3M(Strategy):
    name = "xl3m"
    continues_states: ClassVar[bool] = False

    def __init__(self, config: XL3MConfig) -> None:
        self.config = config
        self.vanilla = Vanilla()
        self.segments = SegmentStore()
        # Passages are read per question (a few short ones); kept apart so that a document's segments are not
        # pushed out by them, and bounded well below the segments' store.
        self.passages = SegmentStore(self.segments.max_bytes // 8)
        self._lock = threading.Lock()

    def check(self, model: PreTrainedModel) -> None:
        # Its own attention (cached_causal) is registered as the others are; segments stay within the training
        # length, so RoPE that changes past it never does here.
        check_model(model, "XL3M", fixed_rope=False)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and self.config.segment_tokens > limit:
            raise ValueError(f"segment_tokens={self.config.segment_tokens} exceeds the model's training length {limit}")

    # The answer is generated by the unpatched model from a prompt within its training length; its attention is
    # the model's own, computed by fused kernels where the answer prompt continues a chosen segment's cache.
    def prepare(self, model: PreTrainedModel) -> None:
        self.vanilla.prepare(model)
        cached_causal.use(model)

    def new_cache(self, model: PreTrainedModel) -> DocumentCache:
        return self.vanilla.new_cache(model)

    def new_document_cache(self, model: PreTrainedModel) -> SegmentedDocument:
        return SegmentedDocument()

    def cache_bytes(self, model: PreTrainedModel, n_tokens: int) -> int:
        return self.vanilla.cache_bytes(model, n_tokens)

    def memory_hint(self) -> str:
        return "smaller segment_tokens (less padding), strategy='lm-infinite' with cache_mode='window'"

    def settings(self) -> dict[str, Any]:
        return self.config.to_dict()

    def identity(self) -> dict[str, Any]:
        return {"strategy": self.name, **{name: getattr(self.config, name) for name in self.config.STATE_FIELDS}}

    def _layout(self, tokenizer: PreTrainedTokenizerBase, ids: list[int], limit: int, question: int) -> _Layout:
        parts = template_parts(tokenizer, ids)
        if parts.head > limit // 2:  # a long conversation before the last turn: its turns are segmented too
            parts = PromptParts(0, parts.tail)
        q = min(question, max(0, len(ids) - parts.head - parts.tail - 1))
        return _Layout(parts.head, len(ids) - parts.tail - q, parts.tail)

    def _segments(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        ids: list[int],
        layout: _Layout,
        report: Callable[[int, int], None],
        total: int,
    ) -> SegmentedDocument:
        """The body's segments, each read after the shared prefix (the opening and the document's first tokens),
        found or read now; the cut depends on the body's tokens only, so a document cuts the same way in every
        prompt that contains it."""
        prefix = _shared_prefix(layout)
        spans = [
            (prefix + a, prefix + b)
            for a, b in split(ids[prefix : layout.body_end], tokenizer, self.config.segment_tokens)
        ]
        done = [prefix]

        def progress(tokens: int) -> None:
            done[0] += tokens
            report(min(done[0], layout.body_end), total)

        report(prefix, total)
        places = self.segments.locate(model, ids[:prefix], [ids[a:b] for a, b in spans], progress)
        report(layout.body_end, total)
        return SegmentedDocument(prefix, spans, places)

    def read_document(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        ids: list[int],
        report: Callable[[int, int], None],
    ) -> SegmentedDocument:
        """Every segment of ``ids`` (a prompt's beginning: the template's opening and the document, no question)
        read and kept, cut as a prompt that continues ``ids`` with a question will be."""
        limit = getattr(model.config, "max_position_embeddings", None) or len(ids)
        with self._lock:
            return self._segments(model, tokenizer, ids, self._layout(tokenizer, ids, limit, 0), report, len(ids))

    def _adopt(self, model: PreTrainedModel, ids: list[int], state: SegmentedDocument) -> None:
        """Put a document's segments (say, loaded from a file) where this strategy finds them."""
        by_block: dict[int, tuple[SegmentBlock, dict[int, tuple[int, str]]]] = {}
        for (start, end), (block, row) in zip(state.spans, state.places, strict=True):
            key = segment_key(model, [*ids[: state.prefix], *ids[start:end]])
            by_block.setdefault(id(block), (block, {}))[1][row] = key
        for block, keys in by_block.values():
            if len(keys) == len(block.lengths):
                self.segments.add(block, [keys[row] for row in range(len(block.lengths))])

    def plan(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        ids: list[int],
        max_new_tokens: int,
        report: Callable[[int, int], None],
        question_tokens: int | None = None,
        state: DocumentCache | None = None,
        scored_tokens: int | None = None,
        stop: threading.Event | None = None,
    ) -> Plan | None:
        """The prompt to answer from: the chosen segments between the prompt's opening and its question.

        ``None`` when the whole prompt fits in the model's training length with the answer: nothing to choose.
        ``question_tokens`` overrides the setting when the caller knows where the question starts, ``scored_tokens``
        (default: all from its first word, see :func:`.scoring.question_start`) says how many of its last tokens
        rank the segments; ``state``: a :class:`SegmentedDocument` of a prefix of ``ids`` (its segments are used,
        not read again). ``stop`` set: :class:`~lminf_integrations.model_thread.Cancelled` at the next forward
        while segments are read, or between the steps of the choice.
        """
        limit = getattr(model.config, "max_position_embeddings", None) or len(ids) + max_new_tokens
        if len(ids) + max_new_tokens <= limit:
            return None
        report = _stopping(report, stop)
        cfg = self.config
        layout = self._layout(tokenizer, ids, limit, question_tokens or cfg.question_tokens)
        q = len(ids) - layout.tail - layout.body_end
        query = ids[layout.body_end : len(ids) - layout.tail]
        room = limit - layout.head - q - layout.tail - max_new_tokens - _MARGIN
        # The default model answered more questions from a few chosen segments than from a full training length
        # of them (README, 'Choosing a strategy'); at least two segments by default, so that a model with a short
        # training length still has a choice; never past the training length.
        budget = min(cfg.context_tokens or max(limit // CONTEXT_SHARE, 2 * cfg.segment_tokens), room)
        with self._lock:  # one document's segments are read once even if two questions come at once
            if isinstance(state, SegmentedDocument) and _covers(state, layout):
                document = state  # the document before the question, cut as this prompt cuts it: nothing to redo
                report(layout.body_end, len(ids))
            else:
                if isinstance(state, SegmentedDocument):
                    self._adopt(model, ids, state)
                document = self._segments(model, tokenizer, ids, layout, report, len(ids))
            _stop_if(stop)
            candidates = list(range(len(document.spans)))
            attention: list[float] | None = None
            # The question's words rank the segments; the line breaks joining it to the text before condition them.
            first = len(query) - scored_tokens if scored_tokens else question_start(tokenizer, query)
            first = max(0, min(first, len(query) - 1))  # at least one token ranks them
            queries = None
            wanted = self._candidate_count(budget)
            if wanted is not None and wanted < len(candidates):
                queries = self._queries(model, document, query, first)
                attention = attention_scores(
                    queries, document.places, document.prefix, ranking_layers(len(document.places[0][0].keys))
                )
                candidates = _best_in_order(candidates, attention, wanted)
                _stop_if(stop)
            certainty, contrast = self._scores(model, document.places, query, len(query) - first, candidates)
            scores = contrast or certainty
            lengths = [end - start for start, end in document.spans]
            sink = document.prefix - layout.head
            picked = _choose([scores[i] for i in candidates], [lengths[i] for i in candidates], budget - sink)
            chosen = [candidates[i] for i in picked]
            if not chosen:
                raise ValueError(
                    f"no segment fits the answer's context: {budget} tokens (the model reads {limit}; the question "
                    f"and template take {layout.head + q + layout.tail}, the answer {max_new_tokens}) for segments "
                    f"of up to {cfg.segment_tokens}: lower segment_tokens or max_new_tokens, or raise context_tokens"
                )
            selection = [
                {"start": document.spans[i][0], "end": document.spans[i][1], "score": round(scores[i], 4)}
                | ({} if attention is None else {"attention": round(attention[i], 4)})
                for i in chosen
            ]
            details: dict[str, Any] = {
                "segments": len(document.spans), "scored": len(candidates), "score": cfg.score, "chosen": selection,
                "query_tokens": q,
            }  # fmt: skip
            # What the answer reads: the chosen segments, or their best passages; each read after exactly the prefix
            # the answer prompt starts with, so the first one's keys and values are the answer prompt's beginning.
            parts: list[tuple[tuple[int, int], tuple[SegmentBlock, int]]] = [
                (document.spans[i], document.places[i]) for i in chosen
            ]
            read: _ReadAnswer | None = None
            if cfg.passage_tokens is not None:
                _stop_if(stop)
                parts, details["passages"] = self._passages(
                    model, tokenizer, ids, document, chosen, query, first, queries
                )
                if cfg.hop_margin is not None:
                    _stop_if(stop)
                    sure = False
                    if cfg.hop_confidence is not None:
                        read = self._read_answer(model, ids, document, layout, parts, query)
                        details["answer_start"] = [round(p, 4) for p in read.probabilities]
                        sure = bool(read.probabilities) and min(read.probabilities) >= cfg.hop_confidence
                    if not sure:
                        _stop_if(stop)
                        parts, details["hop"] = self._hop(
                            model, tokenizer, ids, document, attention, parts, details["passages"], query, first
                        )
        details["read"] = [{"start": start, "end": end} for (start, end), _ in parts]  # what the answer reads
        new_ids = _answer_ids(ids, document, layout, parts)
        if read is not None and read.ids == new_ids:  # no hop added a passage: the prompt is read but its last token
            return Plan(new_ids, details, read.cache, len(new_ids) - 1)
        (start, end), (block, row) = parts[0]
        return Plan(new_ids, details, block.row_cache(row), document.prefix + end - start)

    def _read_answer(
        self,
        model: PreTrainedModel,
        ids: list[int],
        document: SegmentedDocument,
        layout: _Layout,
        parts: list[tuple[tuple[int, int], tuple[SegmentBlock, int]]],
        query: list[int],
    ) -> _ReadAnswer:
        """The answer prompt from ``parts``, read after the first part's keys and values, and how sure the model is of
        the answer's start (:func:`.scoring.answer_start`).

        Why: the hop is for a question whose answer the passages found do not hold. Where the model is sure of its
        answer's first new words from them, the hop's pass (the largest part of a question's cost) is skipped; on
        the default model most single-fact questions answered from their one sentence were, and the questions
        needing a second fact were not (README, 'Full context vs RAG'). The reading is the answer's prefill unless
        the hop adds a sentence."""
        new_ids = _answer_ids(ids, document, layout, parts)
        (start, end), (block, row) = parts[0]
        cache = block.row_cache(row)
        held = document.prefix + end - start
        probabilities = answer_start(
            model, cache, new_ids[held:], set(query), ANSWER_TOKENS, ANSWER_STEPS, eos_ids(model)
        )
        return _ReadAnswer(new_ids, cache, probabilities)

    def _passages(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        ids: list[int],
        document: SegmentedDocument,
        chosen: Sequence[int],
        query: list[int],
        first: int,
        queries: dict[int, tuple[torch.Tensor, float]] | None,
    ) -> tuple[list[tuple[tuple[int, int], tuple[SegmentBlock, int]]], list[dict[str, Any]]]:
        """The chosen segments' passages the answer reads (each span with where its keys and values are, in document
        order) and their details (``queries``: the segments' attention pass's, if it ran): cut at natural
        boundaries (a sentence or line each, see :func:`.segments.sentences`), the ``candidates`` best by where the
        question's attention falls among their keys (already read with their segments), those read alone after the
        prefix and scored as segments are, and kept when within ``passage_margin`` of the best.

        Why (README, 'Choosing a strategy'): given only the fact sentences, the default model answered every
        multi-fact question it missed when given the two segments holding them; a passage of one sentence is what it
        can copy from without being led astray by the text around it (a pass key after a line of filler, in the same
        passage, was answered "a magical number").
        """
        cfg = self.config
        assert cfg.passage_tokens is not None
        spans: list[tuple[int, int]] = []
        keys: list[tuple[SegmentBlock, int, int, int]] = []
        for index in chosen:
            start, end = document.spans[index]
            block, row = document.places[index]
            for a, b in sentences(ids[start:end], tokenizer, cfg.passage_tokens, PASSAGE_MIN_TOKENS):
                spans.append((start + a, start + b))
                keys.append((block, row, document.prefix + a, document.prefix + b))
        candidates = list(range(len(spans)))
        attention: list[float] | None = None
        if cfg.candidates is not None and cfg.candidates < len(spans):
            if queries is None:  # the segments skipped the attention pass: read the question only now it is needed
                queries = self._queries(model, document, query, first)
            attention = span_attention_scores(queries, keys, ranking_layers(len(document.places[0][0].keys)))
            candidates = _best_in_order(candidates, attention, cfg.candidates)
        places = self.passages.locate(model, ids[: document.prefix], [ids[slice(*spans[i])] for i in candidates])
        # Passages are kept within the margin in nats per question token, so by their certainty (log-likelihood
        # unless the setting is "entropy"); with "contrast", the passage it ranks first is kept too.
        order = range(len(candidates))
        scores, contrast = self._scores(model, places, query, len(query) - first, order)
        best = max(scores.values())
        kept = [n for n in order if scores[n] >= best - cfg.passage_margin]
        if contrast:
            kept = sorted({*kept, max(contrast, key=lambda n: contrast[n])})
        details = [
            {"start": spans[candidates[n]][0], "end": spans[candidates[n]][1], "score": round(scores[n], 4)}
            | ({} if attention is None else {"attention": round(attention[candidates[n]], 4)})
            | ({"contrast": round(contrast[n], 4)} if contrast else {})
            for n in kept
        ]
        return [(spans[candidates[n]], places[n]) for n in kept], details

    def _hop(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        ids: list[int],
        document: SegmentedDocument,
        attention: list[float] | None,
        parts: list[tuple[tuple[int, int], tuple[SegmentBlock, int]]],
        kept: list[dict[str, Any]],
        query: list[int],
        first: int,
    ) -> tuple[list[tuple[tuple[int, int], tuple[SegmentBlock, int]]], dict[str, Any] | None]:
        """The answer's passages with one more, when the best kept passage points to it: the passages (in the order
        the answer reads them) and what the hop found (``None`` when there was nothing to hop from).

        A question may need a fact that shares no words with it: "the archive code of the place where the violet
        kettle is kept" needs "The violet kettle is kept in the olive cellar." and "The archive code of the olive
        cellar is 61024.". The first is what the question finds; its words that are not the question's ("olive
        cellar") are what the second shares with it. So the best kept passage is read, joined as the question is
        joined, after each of the ``HOP_CANDIDATES`` segments the question's attention ranks best (besides the
        passage's own) and after the prefix alone; a segment counts by how much likelier it makes the passage's
        tokens that are not in the question, on average. When the best segment beats the second by at least
        ``hop_margin`` nats per token (one segment explains the passage's new words, not a kind of text that many
        share), its sentence doing the same best (of the ``candidates`` its passage attends to most,
        :meth:`_hop_sentences`) is added; the two are read last, in that order, whatever their places in the
        document (README, 'Choosing a strategy'). Without ``candidates`` every segment and sentence is scored.
        """
        cfg = self.config
        assert cfg.hop_margin is not None and cfg.passage_tokens is not None
        best = max(range(len(kept)), key=lambda n: kept[n].get("contrast", kept[n]["score"]))
        (start, end), _ = parts[best]
        hop_query = query[:first] + ids[start:end]
        asked = set(query)
        # The passage's tokens the question does not have (the first is not scored: no logits before it).
        new_words = [j for j in range(1, len(hop_query)) if hop_query[j] not in asked]
        own = next(i for i, (a, b) in enumerate(document.spans) if a <= start < b)
        others = [i for i in range(len(document.spans)) if i != own]
        if not new_words or len(others) < 2:
            return parts, None
        if attention is not None:
            others = sorted(others, key=lambda i: -attention[i])[:HOP_CANDIDATES]
        # The baseline, the passage after the shared prefix alone: its own segment's row read only that far (every
        # row was read after the same prefix), in the same forward as the others.
        by_segment_logprobs = _logprobs(
            model, document.places, hop_query, new_words, [*others, own], {own: document.prefix}
        )
        baseline = by_segment_logprobs.pop(own)

        def gains(found: Mapping[int, torch.Tensor]) -> dict[int, float]:
            return {index: float((values - baseline).mean()) for index, values in found.items()}

        by_segment = gains(by_segment_logprobs)
        ranked = sorted(by_segment, key=lambda i: -by_segment[i])
        segment = ranked[0]
        found: dict[str, Any] = {
            "from": {"start": start, "end": end},
            "segment": {"start": document.spans[segment][0], "end": document.spans[segment][1]},
            "gain": round(by_segment[segment], 4),
            "runner_up": round(by_segment[ranked[1]], 4),
        }
        if by_segment[segment] - by_segment[ranked[1]] < cfg.hop_margin:
            return parts, found
        a, b = document.spans[segment]
        spans = [(a + x, a + y) for x, y in sentences(ids[a:b], tokenizer, cfg.passage_tokens, PASSAGE_MIN_TOKENS)]
        weights: list[float] | None = None
        if cfg.candidates is not None and cfg.candidates < len(spans):
            queries = self._queries(model, document, hop_query, first)
            spans, weights = self._hop_sentences(document, segment, spans, queries, cfg.candidates)
        places = self.passages.locate(model, ids[: document.prefix], [ids[x:y] for x, y in spans])
        by_sentence = gains(_logprobs(model, places, hop_query, new_words, range(len(spans))))
        pick = max(by_sentence, key=lambda n: by_sentence[n])
        found["passage"] = {"start": spans[pick][0], "end": spans[pick][1], "gain": round(by_sentence[pick], 4)} | (
            {} if weights is None else {"attention": round(weights[pick], 4)}
        )
        # The chain read last, nearest the question: the passage, then the sentence it led to (the default model
        # answered with the code of whichever place was named nearest the question, README 'Choosing a strategy').
        rest = [part for part in parts if part[0] not in ((start, end), spans[pick])]
        return [*rest, parts[best], (spans[pick], places[pick])], found

    def _hop_sentences(
        self,
        document: SegmentedDocument,
        segment: int,
        spans: list[tuple[int, int]],
        queries: dict[int, tuple[torch.Tensor, float]],
        count: int,
    ) -> tuple[list[tuple[int, int]], list[float]]:
        """The ``count`` sentences (``spans``, inside ``segment``) the hop's passage (its ``queries``) attends to most,
        in document order, with their attention scores (:func:`.attention_pass.span_attention_scores` over the
        segment's keys, already read): only those are read alone and scored.

        Why: reading and scoring every sentence of the segment cost as much as the hop's pass over the segments,
        and on the default model the sentence a chain question needed was among the passage's 4 best attended in
        its segment (README, 'Choosing a strategy')."""
        block, row = document.places[segment]
        start = document.spans[segment][0]
        keys = [(block, row, document.prefix + x - start, document.prefix + y - start) for x, y in spans]
        weights = span_attention_scores(queries, keys, ranking_layers(len(block.keys)))
        best = _best_in_order(range(len(spans)), weights, count)
        return [spans[n] for n in best], [weights[n] for n in best]

    def _candidate_count(self, budget: int) -> int | None:
        """How many segments the attention pass hands to likelihood scoring: the setting, and at least twice as many
        as fit in the answer's context; ``None`` when every segment is scored by likelihood."""
        if self.config.candidates is None:
            return None
        fit = -(-max(budget, 1) // self.config.segment_tokens)
        return max(self.config.candidates, 2 * fit)

    def _queries(
        self, model: PreTrainedModel, document: SegmentedDocument, query: list[int], first: int
    ) -> dict[int, tuple[torch.Tensor, float]]:
        """The question's queries for the attention pass (:mod:`.attention_pass`): read after the shared prefix where
        it would stand after a full segment, its tokens from ``first`` on."""
        block, row = document.places[0]
        return question_queries(
            model, block.prefix_cache(row, document.prefix), query, document.prefix + self.config.segment_tokens, first
        )

    def _scores(
        self,
        model: PreTrainedModel,
        places: Sequence[tuple[SegmentBlock, int]],
        query: list[int],
        scored: int | None,
        candidates: Sequence[int],
    ) -> tuple[dict[int, float], dict[int, float]]:
        """Each of ``candidates`` (indices into ``places``) scored after the question, the rows of one block
        together: its certainty (mean log-likelihood of the scored tokens, or minus the entropy after them with
        ``score="entropy"``) and, with ``score="contrast"``, its contrast among the candidates (else empty)."""
        order = list(candidates)
        certainty: dict[int, float] = {}
        if self.config.score == "entropy":
            for block, indices in rows_by_block(places, order):
                rows = [places[i][1] for i in indices]
                certainty.update(zip(indices, score_rows(model, block, rows, query, "entropy", scored), strict=True))
            return certainty, {}
        logprobs = _logprobs(model, places, query, scored, order)
        certainty = {i: float(logprobs[i].mean()) for i in order}
        if self.config.score != "contrast" or not order:
            return certainty, {}
        values = contrast_scores(torch.stack([logprobs[i] for i in order]), CONTRAST_TOKENS)
        return certainty, dict(zip(order, values, strict=True))


def _logprobs(
    model: PreTrainedModel,
    places: Sequence[tuple[SegmentBlock, int]],
    query: list[int],
    scored: int | Sequence[int] | None,
    indices: Sequence[int],
    lengths: Mapping[int, int] | None = None,
) -> dict[int, torch.Tensor]:
    """:func:`.scoring.token_logprobs` of ``query`` after each of ``indices`` (into ``places``), by index; the rows of
    one block together; ``lengths``: by index, how many of its row's positions are read (default: all)."""
    found: dict[int, torch.Tensor] = {}
    for block, group in rows_by_block(places, indices):
        rows = [places[i][1] for i in group]
        read_to = [(lengths or {}).get(i, block.lengths[row]) for i, row in zip(group, rows, strict=True)]
        found.update(zip(group, token_logprobs(model, block, rows, query, scored, read_to), strict=True))
    return found


@dataclass
class _ReadAnswer:
    """An answer prompt read but its last token (``cache``), and the probabilities of its answer's first new tokens."""

    ids: list[int]
    cache: FullCache
    probabilities: list[float]


def _answer_ids(
    ids: list[int], document: SegmentedDocument, layout: _Layout, parts: Sequence[tuple[tuple[int, int], Any]]
) -> list[int]:
    """The prompt the answer reads: the shared prefix, ``parts``' tokens in order, the question and what follows."""
    return ids[: document.prefix] + [t for (start, end), _ in parts for t in ids[start:end]] + ids[layout.body_end :]


def _shared_prefix(layout: _Layout) -> int:
    """How many of a prompt's first tokens every segment is read after: the template's opening and the body's first
    ``SINK_TOKENS`` (fewer for a short body, which keeps at least one token to segment)."""
    return layout.head + max(min(SINK_TOKENS, layout.body_end - layout.head - 1), 0)


def _covers(state: SegmentedDocument, layout: _Layout) -> bool:
    """Whether ``state`` (of a prefix of the prompt) is exactly the prompt's body read in segments: its segments end
    where the question starts and were read after the same prefix, so the body cuts as the state did."""
    return bool(state.spans) and state.spans[-1][1] == layout.body_end and state.prefix == _shared_prefix(layout)


def _best_in_order(indices: Iterable[int], scores: Sequence[float], count: int) -> list[int]:
    """The ``count`` of ``indices`` with the highest ``scores[i]``, in ascending (document) order."""
    return sorted(sorted(indices, key=lambda i: -scores[i])[:count])


def _choose(scores: list[float], lengths: list[int], budget: int) -> list[int]:
    """Indices of the best-scoring segments whose lengths fit ``budget`` together, in document order."""
    chosen, used = [], 0
    for index in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if used + lengths[index] <= budget:
            chosen.append(index)
            used += lengths[index]
    return sorted(chosen)


def _stop_if(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Cancelled


def _stopping(report: Callable[[int, int], None], stop: threading.Event | None) -> Callable[[int, int], None]:
    """``report`` that first raises :class:`Cancelled` once ``stop`` is set: reading stops at its next forward."""
    if stop is None:
        return report

    def checked(done: int, total: int) -> None:
        _stop_if(stop)
        report(done, total)

    return checked
