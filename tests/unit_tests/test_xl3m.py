"""XL3M segment selection on tiny random models: segmenting, batched reading and scoring against independent plain
forwards, selection within the budget, segments read once (in memory, in document states and saved files), and the
strategy through the engine and ``lminf``."""

from __future__ import annotations

import re
from contextlib import closing
from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations import cli
from lminf_integrations.config import GenerationSettings, XL3MConfig
from lminf_integrations.engine import Engine
from lminf_integrations.strategies.vanilla import FullCache
from lminf_integrations.strategies.xl3m.scoring import (
    SegmentStore,
    answer_start,
    contrast_scores,
    question_start,
    read,
    read_block,
    score_rows,
    token_logprobs,
)
from lminf_integrations.strategies.xl3m.segments import sentences, split
from lminf_integrations.strategies.xl3m.strategy import (
    ANSWER_TOKENS,
    PASSAGE_MIN_TOKENS,
    XL3M,
    SegmentedDocument,
    _choose,
    template_parts,
)
from lminf_integrations.streaming import Progress
from tests.tiny_models import tiny_llama
from tests.tolerances import network_bound
from tests.unit_tests.test_attention import ARCHITECTURES, VOCAB, _common, _tiny

TRAINING_LENGTH = 256  # the tiny model's: prompts past it are answered from chosen segments
SINK = 4  # the document's first tokens, read before every segment (no chat template in these prompts)
TEXT = "\n\n".join(f"Room {i} is on floor {i % 7}. Its code is {1000 + i}. Nobody else knows it." for i in range(80))


@pytest.fixture(scope="module")
def tiny(default_tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return tiny_llama(default_tokenizer, 2, TRAINING_LENGTH), default_tokenizer


def test_segments_cover_the_text_at_paragraph_ends(default_tokenizer: PreTrainedTokenizerBase) -> None:
    ids = list(default_tokenizer(TEXT, add_special_tokens=False).input_ids)
    spans = split(ids, default_tokenizer, 64)
    assert spans[0][0] == 0 and spans[-1][1] == len(ids)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))  # contiguous, in order
    assert all(0 < end - start <= 64 for start, end in spans)
    for _, end in spans[:-1]:  # paragraphs are ~20 tokens: every cut can be at one
        assert default_tokenizer.decode(ids[:end]).endswith(("\n\n", "it.")) or "\n" in default_tokenizer.decode(
            ids[end - 1 : end + 1]
        )
    with pytest.raises(ValueError, match="max_tokens"):
        split(ids, default_tokenizer, 0)


def test_passages_are_sentences_short_ones_joined_long_ones_cut(default_tokenizer: PreTrainedTokenizerBase) -> None:
    """A passage is one sentence or line; one shorter than ``min_tokens`` joins the next, one longer than
    ``max_tokens`` is cut as segments are."""
    ids = list(default_tokenizer(TEXT, add_special_tokens=False).input_ids)
    pieces = [default_tokenizer.decode(ids[a:b]) for a, b in sentences(ids, default_tokenizer, 40, 8)]
    assert "".join(pieces) == default_tokenizer.decode(ids)
    # "Nobody else knows it." is under 8 tokens: it joins the next paragraph's first sentence.
    assert pieces[:5] == [
        "Room 0 is on floor 0.", " Its code is 1000.", " Nobody else knows it.\n\nRoom 1 is on floor 1.",
        " Its code is 1001.", " Nobody else knows it.\n\nRoom 2 is on floor 2.",
    ]  # fmt: skip
    text = "A " + "very " * 60 + "long sentence. Short. And one more sentence here, a normal one."
    long = list(default_tokenizer(text, add_special_tokens=False).input_ids)
    spans = sentences(long, default_tokenizer, 16, 8)
    assert spans[0][0] == 0 and spans[-1][1] == len(long)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert all(0 < end - start <= 16 for start, end in spans)
    assert default_tokenizer.decode(long[spans[-1][0] :]) == " Short. And one more sentence here, a normal one."
    assert default_tokenizer.decode(long[: spans[-1][0]]).endswith("long sentence.")
    with pytest.raises(ValueError, match="min_tokens"):
        sentences(long, default_tokenizer, 8, 16)


def test_choose_takes_the_best_that_fit_in_document_order() -> None:
    assert _choose([0.1, 0.9, 0.5, 0.8], [10, 10, 10, 10], budget=25) == [1, 3]
    assert _choose([0.1, 0.9, 0.5, 0.8], [10, 30, 10, 10], budget=25) == [2, 3]  # the best does not fit
    assert _choose([0.3], [10], budget=5) == []


SEGMENTS = [
    " Room 3 is on floor 3. Its code is 1003.",
    " Room 12 is on floor 5.",
    " Room 40 is on floor 5. Its code is 1040. Nobody else knows it, not even the porter.",
]


def _rooms(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[list[int]]]:
    """A prefix and ``SEGMENTS``, as token ids."""
    prefix = list(tokenizer("Rooms:", add_special_tokens=False).input_ids)
    return prefix, [list(tokenizer(text, add_special_tokens=False).input_ids) for text in SEGMENTS]


@pytest.mark.parametrize("score", ["loglik", "entropy"])
def test_batched_scores_match_plain_forwards(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase], score: str) -> None:
    """Segments of different lengths read together (right-padded) and scored together (the padding masked) score
    as one uncached forward of prefix + segment + query each does."""
    model, tokenizer = tiny
    prefix_ids, segments = _rooms(tokenizer)
    query = tokenizer("\nQuestion: what is the code of room 3?\nAnswer:", add_special_tokens=False).input_ids
    block = read_block(model, read(model, prefix_ids), segments)
    assert block.lengths == [len(prefix_ids) + len(segment) for segment in segments]
    got = score_rows(model, block, [2, 0, 1], query, score)  # any rows, any order
    got.append(score_rows(model, block, [2], query, score)[0])  # the longest row alone: nothing padded
    for value, segment in zip(got, [segments[2], segments[0], segments[1], segments[2]], strict=True):
        with torch.inference_mode():
            logits = model(torch.tensor([[*prefix_ids, *segment, *query]])).logits[0].float()
        tail = logits[len(prefix_ids) + len(segment) :]
        if score == "loglik":
            logp = tail[:-1].log_softmax(-1)
            expected = float(logp.gather(-1, torch.tensor(query[1:])[:, None]).mean())
        else:
            logp = tail[-1].log_softmax(-1)
            expected = float((logp.exp() * logp).sum())
        # Batched, cached and uncached forwards differ in summation order only: a logit moves by at most the
        # network bound (fp32, the MLP's 128-term sums, 2 layers), a log-softmax value by at most twice that.
        bound = 2 * network_bound(tail, torch.float32, reduction=128, layers=2)
        assert abs(value - expected) <= bound, (value, expected, bound)


def test_token_logprobs_at_chosen_positions_match_a_plain_forward(
    tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    """Per-token log-probabilities of a query's chosen positions after each row equal an uncached forward's."""
    model, tokenizer = tiny
    prefix_ids, segments = _rooms(tokenizer)
    query = tokenizer("\nQuestion: what is the code of room 3?\nAnswer:", add_special_tokens=False).input_ids
    block = read_block(model, read(model, prefix_ids), segments)
    positions = [1, 4, len(query) - 1]
    got = token_logprobs(model, block, [1, 2], query, positions)
    assert got.shape == (2, len(positions))
    assert token_logprobs(model, block, [1], query, 3).shape == (1, 3)  # a count: the last three
    for values, segment in zip(got, [segments[1], segments[2]], strict=True):
        with torch.inference_mode():
            logits = model(torch.tensor([[*prefix_ids, *segment, *query]])).logits[0].float()
        logp = logits[len(prefix_ids) + len(segment) - 1 :].log_softmax(-1)  # logp[j]: of query[j]
        expected = torch.stack([logp[j, query[j]] for j in positions])
        bound = 2 * network_bound(logits, torch.float32, reduction=128, layers=2)
        assert (values - expected).abs().max() <= bound, (values, expected)
    with pytest.raises(ValueError, match="scored positions"):
        token_logprobs(model, block, [0], query, [0])  # the first token has no logits before it


def test_rows_read_only_up_to_a_given_length_score_as_that_context_alone(
    tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    """``lengths`` reads each row only up to that many of its positions, in the same forward as whole rows: a row cut
    to the shared prefix scores the query as the prefix alone does (the hop's baseline), a row cut inside its
    segment as that part of the segment does."""
    model, tokenizer = tiny
    prefix_ids, segments = _rooms(tokenizer)
    query = tokenizer("\nQuestion: what is the code of room 3?\nAnswer:", add_special_tokens=False).input_ids
    block = read_block(model, read(model, prefix_ids), segments)
    positions = [2, len(query) - 1]
    cut = len(prefix_ids) + 3
    got = token_logprobs(model, block, [0, 2, 1], query, positions, [len(prefix_ids), block.lengths[2], cut])
    contexts = [prefix_ids, [*prefix_ids, *segments[2]], [*prefix_ids, *segments[1][:3]]]
    for values, context in zip(got, contexts, strict=True):
        expected = _plain_logprobs(model, context, query, positions)
        assert (values - expected).abs().max() <= _bound(model, [*context, *query]), (values, expected)
    for wrong in ([0], [block.lengths[0] + 1]):
        with pytest.raises(ValueError, match="lengths"):
            token_logprobs(model, block, [0], query, positions, wrong)


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "mistral, window of 6"])
def test_token_logprobs_equal_a_plain_forward_on_each_architecture(arch: str) -> None:
    """Rows of different lengths, gathered out of order, one read only partly, and a contiguous run of rows: each
    row's log-probabilities equal one uncached forward of its context and the query, also where a sliding window
    shorter than the row and the query hides some of the row's keys, and some of the query's own, from the
    query's last tokens."""
    if arch == "mistral, window of 6":
        torch.manual_seed(1234)
        model: PreTrainedModel = MistralForCausalLM(MistralConfig(**_common(), sliding_window=6)).eval()
    else:
        model = _tiny(arch)
    generator = torch.Generator().manual_seed(7)
    prefix_ids = torch.randint(0, VOCAB, (3,), generator=generator).tolist()
    segments = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (7, 11, 4, 9)]
    query = torch.randint(0, VOCAB, (8,), generator=generator).tolist()
    block = read_block(model, read(model, prefix_ids), segments)
    positions = [1, 4, len(query) - 1]
    cut = len(prefix_ids) + 5
    for rows, lengths in (([3, 0, 1], [block.lengths[3], block.lengths[0], cut]), ([1, 2], None)):
        got = token_logprobs(model, block, rows, query, positions, lengths)
        read_to = lengths or [block.lengths[row] for row in rows]
        for values, row, length in zip(got, rows, read_to, strict=True):
            context = [*prefix_ids, *segments[row]][:length]
            expected = _plain_logprobs(model, context, query, positions)
            assert (values - expected).abs().max() <= _bound(model, [*context, *query]), (arch, row, values, expected)


def test_contrast_scores_are_the_mean_of_each_rows_best_gains_over_the_rows_mean() -> None:
    """Worked by hand: the rows' mean per token is [-2, -2, -2, -6]; row 0 gains [1, 0, -1, 2], row 1 [-1, 0, 1,
    -2]. A row that predicts every token fairly well loses to one that predicts a few far better than the rest."""
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-3.0, -2.0, -1.0, -8.0]])
    assert contrast_scores(logprobs, 2) == [1.5, 0.5]
    assert contrast_scores(logprobs, 10) == [0.5, -0.5]  # more tokens than the query has: all of them
    assert contrast_scores(torch.zeros(0, 3), 2) == []
    hub, link, other = [-1.0, -1.0, -1.0, -1.0], [-4.0, -4.0, -0.1, -0.2], [-2.0, -2.0, -5.0, -5.0]
    table = torch.tensor([hub, link, other])
    assert table.mean(1).argmax() == 0  # the mean log-likelihood picks the hub
    scores = contrast_scores(table, 2)
    assert max(range(3), key=lambda i: scores[i]) == 1


def test_a_block_row_is_the_segment_read_alone(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    """A row's keys and values (what the answer continues from) equal reading prefix + segment on its own."""
    model, tokenizer = tiny
    prefix_ids, segments = _rooms(tokenizer)
    block = read_block(model, read(model, prefix_ids), segments)
    for row, segment in enumerate(segments):
        alone = read(model, [*prefix_ids, *segment]).key_values()
        mine = block.row_cache(row).key_values()
        assert len(alone) == len(mine) == 2
        for (keys, values), (row_keys, row_values) in zip(alone, mine, strict=True):
            assert row_keys.shape == keys.shape
            # Keys come from one projection of normed hidden states: the same bound as the network's output.
            bound = network_bound(keys, torch.float32, reduction=128, layers=2)
            assert (row_keys - keys).abs().max() <= bound and (row_values - values).abs().max() <= bound
    with pytest.raises(ValueError, match="non-empty segments"):
        read_block(model, read(model, prefix_ids), [segments[0], []])


def test_the_store_reads_each_segment_once_and_stays_in_bounds(
    tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = tiny
    prefix_ids, segments = _rooms(tokenizer)
    store = SegmentStore()
    first = store.locate(model, prefix_ids, [segments[0], segments[1], segments[0]])
    assert store.encoded == 2 and first[0] == first[2]  # the repeated segment read once
    again = store.locate(model, prefix_ids, segments)
    assert store.encoded == 3 and again[0] == first[0] and again[1] == first[1]
    one = read_block(model, read(model, prefix_ids), segments[:1]).nbytes()
    small = SegmentStore(max_bytes=one + 1)
    small.locate(model, prefix_ids, segments[:1])
    small.locate(model, prefix_ids, segments[1:2])  # the first block is dropped to make room
    small.locate(model, prefix_ids, segments[:1])
    assert small.encoded == 3


def _engine(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, **settings: object) -> Engine:
    config = XL3MConfig(**{"segment_tokens": 48, "question_tokens": 12, **settings})  # type: ignore[arg-type]
    return Engine(model=model, tokenizer=tokenizer, strategy="xl3m", xl3m=config, reuse_prefixes=False)


def test_a_long_prompt_is_answered_from_chosen_segments(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    model, tokenizer = tiny
    engine = _engine(model, tokenizer)
    prompt = engine.chat_prompt([{"role": "user", "content": TEXT + "\n\nWhat is the code of room 7?"}])
    n = engine.count_tokens(prompt)
    assert n > 4 * TRAINING_LENGTH
    stream = engine.stream(prompt, GenerationSettings(max_new_tokens=4))
    "".join(stream)
    result = stream.result
    assert result is not None and result.input_tokens == n and result.output_tokens == 4
    assert result.details is not None
    details = result.details["xl3m"]
    chosen = details["chosen"]
    assert chosen and details["segments"] > len(chosen) and details["query_tokens"] == 12
    assert [c["start"] for c in chosen] == sorted(c["start"] for c in chosen)  # document order
    kept = sum(c["end"] - c["start"] for c in chosen)
    assert kept <= TRAINING_LENGTH - 4 - 12  # within the training length with the question and answer
    encoded = engine.strategy.segments.encoded  # type: ignore[attr-defined]
    other = prompt.replace("room 7", "room 9")
    "".join(engine.stream(other, GenerationSettings(max_new_tokens=4)))
    assert engine.strategy.segments.encoded - encoded <= 1  # type: ignore[attr-defined]  # only the last segment


def test_closing_the_stream_stops_reading_the_document(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    """XL3M reads a whole book before it answers: a stream closed meanwhile (a client gone, Ctrl-C, a cancelled
    task) stops the reading at its next forward, rather than holding the model until every segment is read."""
    model, tokenizer = tiny
    engine = _engine(model, tokenizer)
    rooms = "\n\n".join(f"Room {i} is on floor {i % 7}. Its code is {1000 + i}." for i in range(3000))  # ~48K tokens
    stream = engine.stream(rooms + "\n\nWhat is the code of room 7?", GenerationSettings(max_new_tokens=4))
    with closing(stream.events()) as events:
        for item in events:
            assert isinstance(item, Progress), "an answer before any progress"
            break  # the reading has begun: leave
    assert stream.result is not None and stream.result.stop_reason == "cancelled"
    segments = len(split(list(tokenizer(rooms, add_special_tokens=False).input_ids), tokenizer, 48))
    assert engine.strategy.segments.encoded < segments  # type: ignore[attr-defined]
    assert engine.generate("Room 1 is on floor 1. What floor is room 1 on?", GenerationSettings(max_new_tokens=2))


def test_a_prompt_that_fits_is_read_whole(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    model, tokenizer = tiny
    engine = _engine(model, tokenizer)
    vanilla = Engine(model=model, tokenizer=tokenizer, strategy="vanilla", reuse_prefixes=False)
    prompt = "Room 1 is on floor 1. Its code is 1001. What is the code of room 1?"
    stream = engine.stream(prompt, GenerationSettings(max_new_tokens=5))
    assert "".join(stream) == vanilla.generate(prompt, GenerationSettings(max_new_tokens=5))
    assert stream.result is not None and stream.result.details is None


def test_budget_setting(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    model, tokenizer = tiny
    engine = _engine(model, tokenizer, context_tokens=60)
    stream = engine.stream(TEXT + "\nWhat is the code of room 7?", GenerationSettings(max_new_tokens=2))
    "".join(stream)
    assert stream.result is not None and stream.result.details is not None
    assert sum(c["end"] - c["start"] for c in stream.result.details["xl3m"]["chosen"]) <= 60
    # By default the context holds an eighth of the training length (32 tokens here), and at least two segments.
    wide = _engine(model, tokenizer, segment_tokens=64)
    stream = wide.stream(TEXT + "\nWhat is the code of room 7?", GenerationSettings(max_new_tokens=2))
    "".join(stream)
    assert stream.result is not None and stream.result.details is not None
    assert 32 < sum(c["end"] - c["start"] for c in stream.result.details["xl3m"]["chosen"]) <= 2 * 64 - SINK
    with pytest.raises(ValueError, match="segment_tokens=512 exceeds the model's training length 256"):
        _engine(model, tokenizer, segment_tokens=512)
    narrow = _engine(model, tokenizer, context_tokens=10)
    with pytest.raises(ValueError, match="no segment fits the answer's context: 10 tokens"):
        "".join(narrow.stream(TEXT + "\nWhat is the code of room 7?", GenerationSettings(max_new_tokens=2)))
    assert isinstance(engine.strategy, XL3M)


def test_question_start_skips_the_leading_line_breaks_only(default_tokenizer: PreTrainedTokenizerBase) -> None:
    for text in ["\n\nQuestion: what?", " \n What is it", "\nAnswer:", "What is it?\n\n"]:
        ids = list(default_tokenizer(text, add_special_tokens=False).input_ids)
        start = question_start(default_tokenizer, ids)
        assert default_tokenizer.decode(ids[:start]).strip() == "" and default_tokenizer.decode(ids[start]).strip()
        assert (start > 0) == (text != text.lstrip())
    blank = list(default_tokenizer("\n\n", add_special_tokens=False).input_ids)
    assert question_start(default_tokenizer, blank) == 0  # nothing but blanks: everything counts


def test_the_line_breaks_joining_a_segment_to_the_question_are_not_scored(
    tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    """A chosen segment's likelihood score is the mean log-probability of the question from its first word on,
    read after the prefix and the segment (an independent plain forward): the line breaks before the question say
    how the segment ended, not whether it answers, so they only condition."""
    model, tokenizer = tiny
    query = list(tokenizer("\n\nWhat is the code of room 7?", add_special_tokens=False).input_ids)
    engine = _engine(model, tokenizer, candidates=None, question_tokens=len(query), score="loglik")
    ids = engine.tokenize(TEXT + "\n\nWhat is the code of room 7?")
    assert ids[-len(query) :] == query
    blank = next(i for i, token in enumerate(query) if tokenizer.decode([token]).strip())
    assert blank >= 2  # the question starts with two line-break tokens: one conditions anyway, one is the junction
    engine.strategy.prepare(model)
    plan = engine.strategy.plan(model, tokenizer, ids, 4, lambda done, total: None)
    assert plan is not None
    for chosen in plan.details["chosen"]:
        with torch.inference_mode():
            whole = [*ids[:SINK], *ids[chosen["start"] : chosen["end"]], *query]
            logits = model(torch.tensor([whole])).logits[0].float()
        logp = logits[len(whole) - len(query) : -1].log_softmax(-1)
        per_token = logp.gather(-1, torch.tensor(query[1:])[:, None])[:, 0]
        expected = float(per_token[blank - 1 :].mean())
        bound = max(2 * network_bound(logits, torch.float32, reduction=128, layers=2), 1e-4)  # details round to 4
        assert abs(chosen["score"] - expected) <= bound, (chosen["score"], expected, float(per_token.mean()))


def test_planning_records_no_autograd_graph(
    tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading, the attention pass and likelihood scoring run the model with gradients off, even when the caller
    (the engine plans outside inference mode) has them on and the weights require them."""
    model, tokenizer = tiny
    engine = _engine(model, tokenizer)
    ids = engine.tokenize(TEXT + "\nWhat is the code of room 7?")
    engine.strategy.prepare(model)
    grad_on: list[bool] = []
    forward = type(model.model).forward

    def watched(self: torch.nn.Module, *args: object, **kwargs: object) -> object:
        grad_on.append(torch.is_grad_enabled())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model.model), "forward", watched)
    assert any(p.requires_grad for p in model.parameters()) and torch.is_grad_enabled()
    assert engine.strategy.plan(model, tokenizer, ids, 4, lambda done, total: None) is not None
    assert grad_on and not any(grad_on)


def test_the_answer_continues_the_first_chosen_segment(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    """The plan hands the engine the first chosen segment as read (no second reading), and it is the same cache
    as reading the answer prompt's beginning afresh (answered from whole segments: passages, below)."""
    model, tokenizer = tiny
    engine = _engine(model, tokenizer, passage_tokens=None)
    ids = engine.tokenize(TEXT + "\nWhat is the code of room 7?")
    engine.strategy.prepare(model)
    plan = engine.strategy.plan(model, tokenizer, ids, 4, lambda done, total: None)
    assert plan is not None and isinstance(plan.prefix_cache, FullCache)
    first = plan.details["chosen"][0]
    assert plan.prefix_length == SINK + first["end"] - first["start"]
    assert plan.ids[SINK : plan.prefix_length] == ids[first["start"] : first["end"]]
    fresh = read(model, plan.ids[: plan.prefix_length]).key_values()
    for (keys, values), (got_keys, got_values) in zip(fresh, plan.prefix_cache.key_values(), strict=True):
        bound = network_bound(keys, torch.float32, reduction=128, layers=2)
        assert (got_keys - keys).abs().max() <= bound and (got_values - values).abs().max() <= bound


def _plain_score(model: PreTrainedModel, context: list[int], query: list[int], first: int) -> tuple[float, float]:
    """An uncached forward of ``context + query``: the mean log-probability of ``query[first:]`` (the question from
    its first word), and how far a batched, cached computation of it may be (rounded to 4 places in details)."""
    with torch.inference_mode():
        logits = model(torch.tensor([[*context, *query]])).logits[0].float()
    logp = logits[len(context) : -1].log_softmax(-1)
    per_token = logp.gather(-1, torch.tensor(query[1:])[:, None])[:, 0]
    bound = max(2 * network_bound(logits, torch.float32, reduction=128, layers=2), 1e-4)
    return float(per_token[max(first, 1) - 1 :].mean()), bound


def test_the_answer_reads_the_best_passages_of_the_chosen_segments(
    tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    """The chosen segments are cut into passages; each is scored as an independent plain forward of prefix +
    passage + question scores; by log-likelihood (``score="loglik"``), those within ``passage_margin`` of the best
    are kept, in document order, and the
    answer prompt is the prefix, them and the question, continuing the first one's keys and values as read.
    ``passage_tokens=None`` answers from the same segments whole."""
    model, tokenizer = tiny
    question = "\n\nWhat is the code of room 7?"
    query = list(tokenizer(question, add_special_tokens=False).input_ids)
    words = question_start(tokenizer, query)
    settings: dict[str, object] = {
        "segment_tokens": 96, "candidates": None, "question_tokens": len(query), "score": "loglik", "hop_margin": None
    }  # fmt: skip
    whole = _engine(model, tokenizer, passage_tokens=None, **settings)
    ids = whole.tokenize(TEXT + question)
    whole.strategy.prepare(model)
    plan = whole.strategy.plan(model, tokenizer, ids, 4, lambda done, total: None)
    assert plan is not None and "passages" not in plan.details
    chosen = plan.details["chosen"]
    assert plan.ids == ids[:SINK] + [t for c in chosen for t in ids[c["start"] : c["end"]]] + query
    assert plan.details["read"] == [{"start": c["start"], "end": c["end"]} for c in chosen]

    passages = [
        (c["start"] + a, c["start"] + b)
        for c in chosen
        for a, b in sentences(ids[c["start"] : c["end"]], tokenizer, 16, PASSAGE_MIN_TOKENS)
    ]
    assert len(passages) > 3
    scored = [_plain_score(model, ids[:SINK] + ids[a:b], query, words) for a, b in passages]
    scores, bound = [score for score, _ in scored], max(bound for _, bound in scored)
    order = sorted(range(len(passages)), key=lambda i: -scores[i])
    best, second, third = (scores[i] for i in order[:3])
    assert second - third > 4 * bound  # room for a margin that keeps exactly the best two
    margin = best - second + (second - third) / 2
    engine = _engine(model, tokenizer, passage_tokens=16, passage_margin=margin, **settings)
    engine.strategy.prepare(model)
    plan = engine.strategy.plan(model, tokenizer, ids, 4, lambda done, total: None)
    assert plan is not None and plan.details["chosen"] == chosen  # the same segments
    kept = plan.details["passages"]
    assert [(p["start"], p["end"]) for p in kept] == sorted(passages[i] for i in order[:2])
    for p in kept:
        assert abs(p["score"] - scores[passages.index((p["start"], p["end"]))]) <= bound
    assert plan.ids == ids[:SINK] + [t for p in kept for t in ids[p["start"] : p["end"]]] + query
    assert plan.details["read"] == [{"start": p["start"], "end": p["end"]} for p in kept]
    assert plan.prefix_length == SINK + kept[0]["end"] - kept[0]["start"]
    assert isinstance(plan.prefix_cache, FullCache)
    fresh = read(model, plan.ids[: plan.prefix_length]).key_values()
    for (keys, values), (got_keys, got_values) in zip(fresh, plan.prefix_cache.key_values(), strict=True):
        kv_bound = network_bound(keys, torch.float32, reduction=128, layers=2)
        assert (got_keys - keys).abs().max() <= kv_bound and (got_values - values).abs().max() <= kv_bound


def test_the_attention_pass_narrows_passage_scoring(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    """``candidates`` passages (by the attention pass over the chosen segments' keys) are scored by likelihood; as
    many candidates as passages keep what scoring them all keeps."""
    model, tokenizer = tiny
    ids = _engine(model, tokenizer).tokenize(TEXT + "\nWhat is the code of room 7?")

    def plan(candidates: int | None) -> dict:
        engine = _engine(model, tokenizer, segment_tokens=96, passage_tokens=16, candidates=candidates, hop_margin=None)
        engine.strategy.prepare(model)
        result = engine.strategy.plan(model, tokenizer, ids, 4, lambda done, total: None)
        assert result is not None
        return result.details

    everything, wide, one = plan(None), plan(1000), plan(1)
    assert all("attention" not in p for p in everything["passages"])
    assert [p["start"] for p in wide["passages"]] == [p["start"] for p in everything["passages"]]
    assert len(one["passages"]) == 1 and 0 < one["passages"][0]["attention"] <= 1
    with pytest.raises(ValueError, match="passage_tokens must be None or an int >= 8"):
        XL3MConfig(passage_tokens=4)
    for margin in (-0.1, True, "1"):
        with pytest.raises(ValueError, match="passage_margin must be a number >= 0"):
            XL3MConfig(passage_margin=margin)  # type: ignore[arg-type]


def test_a_document_state_is_read_once_saved_and_loaded(
    tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase], tmp_path: Path
) -> None:
    """encode_document reads every segment; questions with the state read none again and choose as a prompt
    without the state does; the state saves, loads (into a fresh engine) and answers the same."""
    model, tokenizer = tiny
    engine = _engine(model, tokenizer)
    state = engine.encode_document(TEXT)
    assert isinstance(state.cache, SegmentedDocument) and state.cache.nbytes() > 0
    read_segments = engine.strategy.segments.encoded  # type: ignore[attr-defined]
    assert read_segments == len(state.cache.spans) > 4
    prompt = TEXT + "\nWhat is the code of room 7?"
    settings = GenerationSettings(max_new_tokens=4)
    with_state = engine.stream(prompt, settings, state=state)
    answer = "".join(with_state)
    assert engine.strategy.segments.encoded - read_segments <= 1  # type: ignore[attr-defined]  # the body's end
    path = engine.save_state(state, tmp_path / "doc.lminf")
    fresh = _engine(model, tokenizer)
    loaded = fresh.load_state(path)
    assert loaded.token_ids == state.token_ids and loaded.cache.nbytes() == state.cache.nbytes()
    from_file = fresh.stream(prompt, settings, state=loaded)
    assert "".join(from_file) == answer
    assert fresh.strategy.segments.encoded <= 1  # type: ignore[attr-defined]
    plain = _engine(model, tokenizer).stream(prompt, settings)
    "".join(plain)
    results = [with_state.result, from_file.result, plain.result]
    assert all(r is not None and r.details is not None for r in results)
    chosen = [r.details["xl3m"]["chosen"] for r in results if r is not None and r.details is not None]
    assert [c["start"] for c in chosen[0]] == [c["start"] for c in chosen[1]] == [c["start"] for c in chosen[2]]
    with pytest.raises(ValueError, match="a state cannot be continued"):
        engine.encode(engine.tokenize(TEXT + " More."), state=state)
    other = Engine(model=model, tokenizer=tokenizer, strategy="xl3m", xl3m=XL3MConfig(segment_tokens=32))
    with pytest.raises(ValueError, match="segment_tokens"):
        other.load_state(path)


def test_lminf_ask_with_xl3m_shows_its_selection(
    tmp_path: Path, tiny_model_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shared tiny model trains to 8192 tokens: a ~9K-token document is past it."""
    document = tmp_path / "doc.txt"
    document.write_text(TEXT * 9)
    common = ["--model", tiny_model_dir, "--dtype", "fp32", "--max-new-tokens", "3", "--no-progress"]
    gated = ["--strategy", "xl3m", "--show-selection", "--hop-confidence", "0.9"]
    assert cli.main(["ask", str(document), "Code of room 7?", *common, *gated]) == 0
    err = capsys.readouterr().err
    scored = XL3MConfig().candidates  # the default: more than twice the two 512-token segments that fit
    assert "[xl3m: " in err and f" segments, {scored} scored by contrast after the attention pass; tokens " in err
    segments, passages = err.split("; answered from ")
    chosen = re.findall(r"\d+-\d+ \(contrast [-+]\d+\.\d+, attention \d\.\d+\)", segments)
    assert chosen and len(chosen) == int(re.search(r"\[xl3m: (\d+) of ", err).group(1))  # type: ignore[union-attr]
    passages, hop = passages.split("; hop from ")  # the tiny random model is never sure of its answer
    assert re.search(r"; (answer's first new tokens: least likely \d\.\d{3}|no new answer tokens)$", passages)
    kept = re.findall(r"\d+-\d+ \(likelihood [-+]\d+\.\d+, contrast [-+]\d+\.\d+, attention \d\.\d+\)", passages)
    assert kept and passages.startswith(f"{len(kept)} of their passages: tokens ")
    assert re.fullmatch(
        r"\d+-\d+: segment \d+-\d+ \(gain [-+]\d+\.\d+, next [-+]\d+\.\d+\): "
        r"(added \d+-\d+|nothing added \(under hop_margin\))\]\n",
        hop,
    ), hop
    no_passages = ["--strategy", "xl3m", "--show-selection", "--passage-tokens", "none"]
    assert cli.main(["ask", str(document), "Code of room 7?", *common, *no_passages]) == 0
    err = capsys.readouterr().err
    assert "[xl3m: " in err and "passages" not in err
    state = tmp_path / "s.lminf"
    assert cli.main(["encode", str(document), "-o", str(state), *common[:4], "--strategy", "xl3m"]) == 0
    assert "saved " in capsys.readouterr().err
    ask = ["ask", "--state", str(state), "Code of room 7?", *common, "--strategy", "xl3m", "--show-selection"]
    assert cli.main(ask) == 0
    assert "[xl3m: " in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a state of one strategy is refused by another
        cli.main(["ask", "--state", str(state), "Code of room 7?", *common])


def test_chat_prompts_keep_their_opening_question_and_closing(
    tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = tiny
    engine = _engine(model, tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXT + "\n\nCode of room 7?"}]
    ids = engine.tokenize(engine.chat_prompt(messages))
    parts = template_parts(tokenizer, ids)
    assert tokenizer.decode(ids[: parts.head]).endswith("Be brief.<|im_end|>\n<|im_start|>user\n")
    assert tokenizer.decode(ids[len(ids) - parts.tail :]) == "<|im_end|>\n<|im_start|>assistant\n"
    engine.strategy.prepare(model)
    plan = engine.strategy.plan(model, tokenizer, ids, 4, lambda done, total: None)
    assert plan is not None
    kept = parts.tail + 12  # the question (question_tokens) and the template's closing part
    assert plan.ids[: parts.head] == ids[: parts.head] and plan.ids[-kept:] == ids[-kept:]
    assert len(plan.ids) + 4 <= TRAINING_LENGTH


LLAMA3_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


@pytest.mark.parametrize("content", ["Paragraph 0. The cellar door.", " Paragraph 0.", "\nParagraph 0."])
def test_a_template_opening_whose_last_token_merges_with_the_text_is_still_found(
    default_tokenizer: PreTrainedTokenizerBase, content: str
) -> None:
    """A template whose user turn opens with whitespace ("<|end_header_id|>\\n\\n", Llama 3's) is tokenized
    with the text after it: "\\n\\n" alone is one token, before "Paragraph" two. The opening is still found (its
    whitespace may count as the text's), so it is neither cut up as document text nor lost."""
    import copy

    tokenizer = copy.deepcopy(default_tokenizer)
    tokenizer.chat_template = LLAMA3_LIKE_TEMPLATE
    headers = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": headers})
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    parts = template_parts(tokenizer, ids)
    head = tokenizer.decode(ids[: parts.head])
    assert head.startswith("<|im_start|><|start_header_id|>user<|end_header_id|>"), head  # its BOS is SmolLM's
    assert content.strip() in tokenizer.decode(ids[parts.head : len(ids) - parts.tail])
    assert tokenizer.decode(ids[len(ids) - parts.tail :]).startswith("<|eot_id|><|start_header_id|>assistant")


def _plain_logprobs(model: PreTrainedModel, context: list[int], query: list[int], positions: list[int]) -> torch.Tensor:
    """An uncached forward of ``context + query``: the log-probability of ``query[j]`` for each of ``positions``."""
    with torch.inference_mode():
        logits = model(torch.tensor([[*context, *query]])).logits[0].float()
    logp = logits[len(context) - 1 :].log_softmax(-1)
    return torch.stack([logp[j, query[j]] for j in positions])


def _bound(model: PreTrainedModel, ids: list[int]) -> float:
    """How far a batched, cached log-probability may be from a plain forward's (twice the network's bound on a
    logit) and no less than the 4 places details round to."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    return max(2 * network_bound(logits, torch.float32, reduction=128, layers=2), 1e-4)


def test_contrast_ranks_segments_against_each_other(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    """``score="contrast"`` (the default): every segment's score is the mean of its 3 largest gains in a question
    token's log-probability against the mean over the scored segments, each from an independent plain forward; the
    best that fit are chosen."""
    model, tokenizer = tiny
    question = "\n\nWhat is the code of room 7?"
    query = list(tokenizer(question, add_special_tokens=False).input_ids)
    engine = _engine(model, tokenizer, candidates=None, question_tokens=len(query), passage_tokens=None)
    assert engine.strategy.config.score == "contrast"
    ids = engine.tokenize(TEXT + question)
    engine.strategy.prepare(model)
    plan = engine.strategy.plan(model, tokenizer, ids, 4, lambda done, total: None)
    assert plan is not None
    layout = engine.strategy._layout(tokenizer, ids, TRAINING_LENGTH, len(query))
    document = engine.strategy._segments(model, tokenizer, ids, layout, lambda done, total: None, len(ids))
    positions = list(range(question_start(tokenizer, query), len(query)))
    table = torch.stack([
        _plain_logprobs(model, ids[:SINK] + ids[a:b], query, positions) for a, b in document.spans
    ])  # fmt: skip
    gains = table - table.mean(0, keepdim=True)
    expected = gains.topk(3, dim=1).values.mean(1)
    bound = 2 * _bound(model, ids[:SINK] + ids[slice(*document.spans[0])] + query)
    by_start = {a: i for i, (a, _) in enumerate(document.spans)}
    chosen = plan.details["chosen"]
    for c in chosen:
        assert abs(c["score"] - float(expected[by_start[c["start"]]])) <= bound
    # The reference's best two are chosen (at least two segments fit), unless within the bound of the next.
    order = expected.argsort(descending=True).tolist()
    if expected[order[1]] - expected[order[2]] > 2 * bound:
        assert set(order[:2]) <= {by_start[c["start"]] for c in chosen}


def test_a_hop_adds_the_sentence_that_best_explains_the_best_passage(
    tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    """The best kept passage, joined as the question is, is read after every other segment and after the prefix
    alone (independent plain forwards); the segment raising its tokens that are not in the question most, on
    average, is the hop, and its sentence doing the same best is answered from too, the two read last; with a
    margin the hop's lead does not reach, nothing is added."""
    model, tokenizer = tiny
    question = "\n\nWhat is the code of room 7?"
    query = list(tokenizer(question, add_special_tokens=False).input_ids)
    settings: dict[str, object] = {
        "segment_tokens": 96, "candidates": None, "question_tokens": len(query), "passage_tokens": 16,
        "hop_confidence": None,
    }  # fmt: skip
    ids = _engine(model, tokenizer).tokenize(TEXT + question)

    def plan(margin: float | None) -> tuple[list[int], dict]:
        engine = _engine(model, tokenizer, hop_margin=margin, **settings)
        engine.strategy.prepare(model)
        result = engine.strategy.plan(model, tokenizer, ids, 4, lambda done, total: None)
        assert result is not None
        return result.ids, result.details

    plain_ids, plain = plan(None)
    assert "hop" not in plain
    hop_ids, hopped = plan(0.0)
    kept = plain["passages"]
    assert hopped["chosen"] == plain["chosen"] and hopped["passages"] == kept
    source = max(kept, key=lambda p: p["contrast"])
    assert hopped["hop"]["from"] == {"start": source["start"], "end": source["end"]}
    first = question_start(tokenizer, query)
    hop_query = query[:first] + ids[source["start"] : source["end"]]
    new = [j for j in range(1, len(hop_query)) if hop_query[j] not in set(query)]
    assert new
    baseline = _plain_logprobs(model, ids[:SINK], hop_query, new)
    engine = _engine(model, tokenizer, **settings)
    layout = engine.strategy._layout(tokenizer, ids, TRAINING_LENGTH, len(query))
    spans = engine.strategy._segments(model, tokenizer, ids, layout, lambda done, total: None, len(ids)).spans
    gain = {
        (a, b): float((_plain_logprobs(model, ids[:SINK] + ids[a:b], hop_query, new) - baseline).mean())
        for a, b in spans
        if not a <= source["start"] < b
    }
    bound = 2 * _bound(model, ids[:SINK] + ids[slice(*spans[0])] + hop_query)
    ranked = sorted(gain, key=lambda span: -gain[span])
    found = hopped["hop"]
    assert abs(found["gain"] - gain[ranked[0]]) <= bound and abs(found["runner_up"] - gain[ranked[1]]) <= bound
    if gain[ranked[0]] - gain[ranked[1]] > 2 * bound:
        assert (found["segment"]["start"], found["segment"]["end"]) == ranked[0]
    a, b = found["segment"]["start"], found["segment"]["end"]
    cuts = [(a + x, a + y) for x, y in sentences(ids[a:b], tokenizer, 16, PASSAGE_MIN_TOKENS)]
    by_sentence = {
        cut: float((_plain_logprobs(model, ids[:SINK] + ids[slice(*cut)], hop_query, new) - baseline).mean())
        for cut in cuts
    }
    best = max(by_sentence, key=lambda cut: by_sentence[cut])
    added = (found["passage"]["start"], found["passage"]["end"])
    assert abs(found["passage"]["gain"] - by_sentence[best]) <= bound
    assert by_sentence[added] >= by_sentence[best] - 2 * bound
    # The chain read last, nearest the question: the passage hopped from, then the sentence it led to.
    source_span = (source["start"], source["end"])
    spans_read = [*((p["start"], p["end"]) for p in kept if (p["start"], p["end"]) not in (source_span, added))]
    spans_read += [source_span, added]
    assert hop_ids == ids[:SINK] + [t for span in spans_read for t in ids[slice(*span)]] + query
    assert [(r["start"], r["end"]) for r in hopped["read"]] == spans_read
    # A margin the hop's lead does not reach: found, reported, nothing added.
    far_ids, far = plan(found["gain"] - found["runner_up"] + 1.0)
    assert far_ids == plain_ids and "passage" not in far["hop"] and far["hop"]["gain"] == found["gain"]
    for margin in (-0.1, True, "1"):
        with pytest.raises(ValueError, match="hop_margin must be None or a number >= 0"):
            XL3MConfig(hop_margin=margin)  # type: ignore[arg-type]


def test_the_passage_contrast_ranks_first_is_kept_beside_the_likeliest(
    tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    """With ``score="contrast"`` and no margin, the answer reads the passage of the best mean log-likelihood and
    the passage of the best contrast (independent plain forwards of prefix + passage + question), in document
    order."""
    model, tokenizer = tiny
    question = "\n\nWhat is the code of room 7?"
    query = list(tokenizer(question, add_special_tokens=False).input_ids)
    engine = _engine(model, tokenizer, segment_tokens=96, candidates=None, question_tokens=len(query),
                     passage_tokens=16, passage_margin=0.0, hop_margin=None)  # fmt: skip
    ids = engine.tokenize(TEXT + question)
    engine.strategy.prepare(model)
    plan = engine.strategy.plan(model, tokenizer, ids, 4, lambda done, total: None)
    assert plan is not None
    passages = [
        (c["start"] + a, c["start"] + b)
        for c in plan.details["chosen"]
        for a, b in sentences(ids[c["start"] : c["end"]], tokenizer, 16, PASSAGE_MIN_TOKENS)
    ]
    positions = list(range(question_start(tokenizer, query), len(query)))
    table = torch.stack([_plain_logprobs(model, ids[:SINK] + ids[a:b], query, positions) for a, b in passages])
    likelihood = table.mean(1)
    contrast = (table - table.mean(0, keepdim=True)).topk(3, dim=1).values.mean(1)
    bound = 2 * _bound(model, ids[:SINK] + ids[slice(*passages[0])] + query)
    kept = plan.details["passages"]
    for p in kept:
        index = passages.index((p["start"], p["end"]))
        assert abs(p["score"] - float(likelihood[index])) <= bound
        assert abs(p["contrast"] - float(contrast[index])) <= bound
    expected = sorted({passages[int(likelihood.argmax())], passages[int(contrast.argmax())]})
    clear = all(
        (v.topk(2).values[0] - v.topk(2).values[1]) > 2 * bound for v in (likelihood, contrast)
    )
    if clear:
        assert [(p["start"], p["end"]) for p in kept] == expected
    assert len(kept) in (1, 2)


@pytest.fixture(scope="module")
def peaked(default_tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A tiny random model whose next-token distributions are peaked (its final norm's weight scaled up, as a
    trained model's are), so that greedy steps have clear winners and its probabilities are far from 0 and 1."""
    model = tiny_llama(default_tokenizer, 2, TRAINING_LENGTH)
    with torch.no_grad():
        model.model.norm.weight.mul_(80)
    return model, default_tokenizer


def _plain_greedy(model: PreTrainedModel, ids: list[int], steps: int) -> list[tuple[int, float, float]]:
    """Greedy steps by uncached forwards of the whole sequence: each token, its probability, and its lead over the
    next likeliest token (in probability)."""
    found, sequence = [], list(ids)
    with torch.inference_mode():
        for _ in range(steps):
            probabilities = model(torch.tensor([sequence])).logits[0, -1].float().softmax(-1)
            top = probabilities.topk(2)
            found.append((int(top.indices[0]), float(top.values[0]), float(top.values[0] - top.values[1])))
            sequence.append(int(top.indices[0]))
    return found


def test_answer_start_gives_the_first_new_tokens_probabilities_and_leaves_the_prompt_read(
    peaked: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    """The prompt's rest read into a cache, then greedy steps: the probabilities of the first tokens that are not
    ``known``, up to a ``stop`` token, as independent uncached forwards give them; afterwards the cache holds the
    prompt but its last token, as a fresh read of it does."""
    model, tokenizer = peaked
    ids = list(tokenizer(TEXT[:300] + "\nWhat is the code of room 7?", add_special_tokens=False).input_ids)
    held = len(ids) - 10
    reference = _plain_greedy(model, ids, 6)
    bound = _bound(model, ids)
    assert min(lead for _, _, lead in reference) > 2 * bound  # no near tie: both computations pick the same tokens
    known = {reference[0][0], reference[2][0]} - {reference[1][0], reference[3][0], reference[4][0]}
    expected = [p for token, p, _ in reference if token not in known][:3]
    cache = read(model, ids[:held])
    got = answer_start(model, cache, ids[held:], known, 3, 6, set())
    assert len(got) == len(expected) and all(abs(a - b) <= bound for a, b in zip(got, expected, strict=True))
    assert cache.get_seq_length() == len(ids) - 1
    for (keys, values), (got_keys, got_values) in zip(
        read(model, ids[:-1]).key_values(), cache.key_values(), strict=True
    ):
        limit = network_bound(keys, torch.float32, reduction=128, layers=2)
        assert (got_keys - keys).abs().max() <= limit and (got_values - values).abs().max() <= limit
    # A stop token ends it; steps bound it.
    stop = reference[2][0]
    before = [p for token, p, _ in reference[: [token for token, _, _ in reference].index(stop)]]
    stopped = answer_start(model, read(model, ids[:held]), ids[held:], set(), 5, 6, {stop})
    assert len(stopped) == len(before) and all(abs(a - b) <= bound for a, b in zip(stopped, before, strict=True))
    assert len(answer_start(model, read(model, ids[:held]), ids[held:], set(), 5, 2, set())) == 2


def test_the_hop_runs_only_when_the_answer_from_the_passages_is_unsure(
    peaked: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    """With ``hop_confidence``, the answer prompt from the kept passages is read first and the answer's first new
    tokens generated: their probabilities are reported (as independent uncached forwards give them); when one is
    below the setting the hop runs as without the setting, and when none is, no hop runs and the answer continues
    from that reading (every prompt token but the last, as a fresh read)."""
    model, tokenizer = peaked
    question = "\n\nWhat is the code of room 7?"
    query = list(tokenizer(question, add_special_tokens=False).input_ids)
    settings: dict[str, object] = {
        "segment_tokens": 96, "candidates": None, "question_tokens": len(query), "passage_tokens": 16,
        "hop_margin": 0.0,
    }  # fmt: skip
    ids = _engine(model, tokenizer).tokenize(TEXT + question)

    def plan(confidence: float | None) -> tuple[list[int], dict, object, int]:
        engine = _engine(model, tokenizer, hop_confidence=confidence, **settings)
        engine.strategy.prepare(model)
        result = engine.strategy.plan(model, tokenizer, ids, 4, lambda done, total: None)
        assert result is not None
        return result.ids, result.details, result.prefix_cache, result.prefix_length

    always_ids, always, _, _ = plan(None)
    assert "hop" in always and "answer_start" not in always
    unsure_ids, unsure, _, _ = plan(1.0)
    probabilities = unsure["answer_start"]
    assert 1 <= len(probabilities) <= ANSWER_TOKENS and min(probabilities) < 1.0
    assert unsure_ids == always_ids and unsure["hop"] == always["hop"]
    # The probabilities are those of greedy steps on the answer prompt without the hop, by plain forwards.
    no_hop = _engine(model, tokenizer, **{**settings, "hop_margin": None})
    no_hop.strategy.prepare(model)
    plain = no_hop.strategy.plan(model, tokenizer, ids, 4, lambda done, total: None)
    assert plain is not None
    bound = _bound(model, plain.ids)
    steps = _plain_greedy(model, plain.ids, 12)
    reference = [(t, p) for t, p, _ in steps if t not in set(query)][:ANSWER_TOKENS]
    assert len(reference) == len(probabilities)  # the tiny model's tokens are no stop tokens
    assert min(lead for _, _, lead in steps) > 2 * bound  # no near tie: both computations generate the same tokens
    assert all(abs(a - p) <= bound + 1e-4 for a, (_, p) in zip(probabilities, reference, strict=True))  # 4 places
    # Sure enough by the setting: no hop, the prompt without it, read but its last token.
    sure_ids, sure, cache, length = plan(max(min(probabilities) - 2 * bound - 1e-4, 1e-6))
    assert "hop" not in sure and sure_ids == plain.ids and sure["read"] == plain.details["read"]
    assert isinstance(cache, FullCache) and length == len(sure_ids) - 1 == cache.get_seq_length()
    for (keys, values), (got_keys, got_values) in zip(
        read(model, sure_ids[:-1]).key_values(), cache.key_values(), strict=True
    ):
        limit = network_bound(keys, torch.float32, reduction=128, layers=2)
        assert (got_keys - keys).abs().max() <= limit and (got_values - values).abs().max() <= limit
    # Through the engine: the answer continues from that reading.
    engine = _engine(model, tokenizer, hop_confidence=max(min(probabilities) - 2 * bound - 1e-4, 1e-6), **settings)
    stream = engine.stream(ids, GenerationSettings(max_new_tokens=3))
    vanilla = Engine(model=model, tokenizer=tokenizer, strategy="vanilla", reuse_prefixes=False)
    assert "".join(stream) == vanilla.generate(plain.ids, GenerationSettings(max_new_tokens=3))
    assert stream.result is not None and "hop" not in stream.result.details["xl3m"]
    for confidence in (0, -0.5, 1.5, True, "0.8"):
        with pytest.raises(ValueError, match=r"hop_confidence must be None or a number in \(0, 1\]"):
            XL3MConfig(hop_confidence=confidence)  # type: ignore[arg-type]
