"""XL3M's first pass (where the question's attention falls among the segments) on tiny random models: the recorded
queries are the ones the model attends with, the segment scores equal an eager forward's attention weights at the
first layer (a naive reference with one custom mask), and the pass narrows likelihood scoring in the engine, and the
hop's sentences."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations.config import GenerationSettings, XL3MConfig
from lminf_integrations.engine import Engine
from lminf_integrations.hf_compat import cache_kwargs
from lminf_integrations.strategies.xl3m.attention_pass import (
    ATTENTION_TOKENS,
    attention_scores,
    question_queries,
    ranking_layers,
    span_attention_scores,
)
from lminf_integrations.strategies.xl3m.scoring import read, read_block
from lminf_integrations.strategies.xl3m.segments import sentences
from lminf_integrations.strategies.xl3m.strategy import CONTEXT_SHARE, PASSAGE_MIN_TOKENS, XL3M
from tests.tiny_models import tiny_llama
from tests.tolerances import network_bound, sum_bound
from tests.unit_tests.test_attention import ARCHITECTURES, LAYERS, REDUCTION, VOCAB, _tiny

# More question tokens than the pass averages over, so that which of them count is tested.
PREFIX, QUESTION, START = 3, ATTENTION_TOKENS + 3, 40


def _weight_bound(logits: torch.Tensor) -> float:
    """Bound on a softmax weight's error when its fp32 logits come from queries and keys computed in another order
    (a different forward): the logits move by at most the network bound, a weight (at most 1) by twice that."""
    finite = logits[torch.isfinite(logits)]
    return 2 * network_bound(finite, torch.float32, REDUCTION, LAYERS) + sum_bound(torch.float32, logits.shape[-1])


def _eager_attentions(model: PreTrainedModel, ids: list[int], positions: list[int], mask: torch.Tensor) -> list:
    """Per layer, the eager attention weights ``[heads, tokens, tokens]`` of one forward with a custom 4D mask."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(
                input_ids=torch.tensor([ids]),
                position_ids=torch.tensor([positions]),
                attention_mask=torch.where(mask, 0.0, float("-inf"))[None, None],
                output_attentions=True,
            )
    finally:
        model.set_attn_implementation(previous)
    return [weights[0].double() for weights in out.attentions]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_recorded_queries_are_the_ones_the_model_attends_with(arch: str) -> None:
    """At every layer, the recorded queries against the keys of the same forward give the weights eager attention
    computes (the rotation at the given positions, query norms and scale included)."""
    model = _tiny(arch)
    ids = torch.randint(0, VOCAB, (PREFIX + QUESTION,), generator=torch.Generator().manual_seed(3)).tolist()
    positions = [*range(PREFIX), *range(START, START + QUESTION)]
    n = len(ids)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    expected = _eager_attentions(model, ids, positions, causal)
    prefix = read(model, ids[:PREFIX])
    queries = question_queries(model, prefix, ids[PREFIX:], START)
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]), **cache_kwargs(cache))
    assert sorted(queries) == list(range(model.config.num_hidden_layers))
    for layer, (query, scale) in queries.items():
        keys = cache.layers[layer].keys[0].double()  # [kv_heads, tokens, dim]
        groups = query.shape[0] // keys.shape[0]
        logits = query.double() @ keys.repeat_interleave(groups, 0).transpose(-1, -2) * scale
        logits = logits.masked_fill(~causal[PREFIX:], float("-inf"))
        got = logits.softmax(-1)
        assert (got - expected[layer][:, PREFIX:]).abs().max() <= _weight_bound(logits), layer


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_first_layer_scores_equal_eager_attention_over_all_segments(arch: str) -> None:
    """At the first layer queries and keys depend on tokens and positions only, so one eager forward of prefix,
    every segment (each at the positions it was read at, seeing the prefix and itself) and the question (seeing
    all of it) has the attention weights the pass works from: per head and question token, each segment's best
    key weight among the segments' best, averaged over the question tokens that weigh it most, the largest over
    heads. Segments of
    different lengths in two blocks, rows out of order, one segment twice (a repeated segment is one row)."""
    model = _tiny(arch)
    generator = torch.Generator().manual_seed(5)
    prefix_ids = torch.randint(0, VOCAB, (PREFIX,), generator=generator).tolist()
    segments = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (7, 11, 4, 9)]
    query = torch.randint(0, VOCAB, (QUESTION,), generator=generator).tolist()
    prefix = read(model, prefix_ids)
    first, second = read_block(model, prefix, segments[:2]), read_block(model, prefix, segments[2:])
    places = [(first, 1), (second, 0), (first, 0), (second, 1), (first, 1)]  # document order: segments 1, 2, 0, 3, 1
    order = [1, 2, 0, 3, 1]
    queries = question_queries(model, prefix, query, START)
    got = attention_scores(queries, places, PREFIX, [0])

    weights, owners = _question_after_segments(model, prefix_ids, [segments[i] for i in order], query)
    n = PREFIX + owners.numel() + QUESTION
    in_segments = weights[:, :, PREFIX : n - QUESTION]
    # A weight is exp(logit) over one normaliser, so a segment's best key weight over the sum of every segment's
    # best is the softmax over segments of their best logits.
    best = torch.stack([in_segments[:, :, owners == s].amax(-1) for s in range(len(order))], -1)
    expected = _top_token_share(best / best.sum(-1, keepdim=True)).amax(0)
    query, scale = queries[0]
    keys = torch.cat([block.keys[0][r, :, PREFIX:] for block, r in places], 1)  # [kv_heads, keys, dim]
    logits = query.double() @ keys.double().repeat_interleave(query.shape[0] // keys.shape[0], 0).mT * scale
    # Each share is a sum of at most n weights, each within the weight bound: the bound again, plus the sum's.
    bound = _weight_bound(logits) + sum_bound(torch.float32, n)
    error = (torch.tensor(got, dtype=torch.float64) - expected).abs().max()
    assert error <= bound, (got, expected.tolist(), bound)


def _top_token_share(weights: torch.Tensor) -> torch.Tensor:
    """``[heads, tokens, rows]`` weights → ``[heads, rows]``: the mean of each row's ``ATTENTION_TOKENS`` largest
    weights over the question's tokens (written out by sorting, not as the pass computes it)."""
    ordered = weights.sort(dim=1, descending=True).values
    return ordered[:, :ATTENTION_TOKENS].sum(1) / ATTENTION_TOKENS


def _question_after_segments(
    model: PreTrainedModel, prefix_ids: list[int], segments: list[list[int]], query: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One eager forward of the prefix, each segment (at the positions it is read at, seeing the prefix and itself)
    and the question at ``START`` (seeing all of it): the first layer's weights of the question's tokens
    ``[heads, question, keys]``, and which segment each key after the prefix belongs to."""
    ids, positions, owner = list(prefix_ids), list(range(PREFIX)), [-1] * PREFIX
    for index, segment in enumerate(segments):
        ids += segment
        positions += range(PREFIX, PREFIX + len(segment))
        owner += [index] * len(segment)
    ids += query
    positions += range(START, START + len(query))
    owner += [-2] * len(query)
    n = len(ids)
    owners = torch.tensor(owner)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        if owner[i] == -2:  # the question: everything before it, and itself causally
            mask[i, : i + 1] = True
        else:  # the prefix causally; a segment: the prefix and itself causally
            mask[i, :PREFIX] = owners[:PREFIX] < 0 if owner[i] >= 0 else torch.arange(PREFIX) <= i
            mask[i, : i + 1] |= owners[: i + 1] == owner[i]
    weights = _eager_attentions(model, ids, positions, mask)[0][:, n - len(query) :]
    return weights, owners[PREFIX : n - len(query)]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_first_layer_span_scores_equal_eager_attention_over_the_spans(arch: str) -> None:
    """Passages inside segments already read (key ranges of block rows, some keys in none, rows out of order): at
    the first layer, per head and question token, each span's best key weight among the spans' best, averaged over
    the question tokens that weigh it most, the largest over heads — from one eager forward of the prefix, the
    segments and the question. Spans that are whole rows score as the segment attention pass scores the rows."""
    model = _tiny(arch)
    generator = torch.Generator().manual_seed(7)
    prefix_ids = torch.randint(0, VOCAB, (PREFIX,), generator=generator).tolist()
    segments = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (12, 9, 10)]
    query = torch.randint(0, VOCAB, (QUESTION,), generator=generator).tolist()
    prefix = read(model, prefix_ids)
    first, second = read_block(model, prefix, segments[:2]), read_block(model, prefix, segments[2:])
    rows = [(first, 0), (first, 1), (second, 0)]  # segment i is rows[i]
    spans = [(1, 4, 9), (0, 0, 5), (0, 5, 12), (2, 2, 10), (1, 0, 3)]  # (segment, first key, end) after the prefix
    queries = question_queries(model, prefix, query, START)
    got = span_attention_scores(queries, [(*rows[i], PREFIX + a, PREFIX + b) for i, a, b in spans], [0])

    weights, owners = _question_after_segments(model, prefix_ids, segments, query)
    columns = [torch.nonzero(owners == i)[:, 0] for i in range(len(segments))]  # each segment's keys, in order
    best = torch.stack([weights[:, :, PREFIX + columns[i][a:b]].amax(-1) for i, a, b in spans], -1)
    expected = _top_token_share(best / best.sum(-1, keepdim=True)).amax(0)
    query_0, scale = queries[0]
    keys = torch.cat([rows[i][0].keys[0][rows[i][1], :, PREFIX : PREFIX + len(segments[i])] for i in range(3)], 1)
    logits = query_0.double() @ keys.double().repeat_interleave(query_0.shape[0] // keys.shape[0], 0).mT * scale
    bound = _weight_bound(logits) + sum_bound(torch.float32, weights.shape[-1])
    error = (torch.tensor(got, dtype=torch.float64) - expected).abs().max()
    assert error <= bound, (got, expected.tolist(), bound)

    whole = span_attention_scores(queries, [(*rows[i], PREFIX, PREFIX + len(segments[i])) for i in (2, 0, 1)], [0])
    by_rows = attention_scores(queries, [rows[i] for i in (2, 0, 1)], PREFIX, [0])
    assert max(abs(a - b) for a, b in zip(whole, by_rows, strict=True)) <= bound


def test_ranking_layers() -> None:
    assert ranking_layers(30) == list(range(8, 22, 2))  # every other layer of the middle half, 7..21
    assert ranking_layers(4) == [2]
    assert ranking_layers(2) == [0]
    assert ranking_layers(1) == [0]


TRAINING_LENGTH = 256
TEXT = "\n\n".join(f"Room {i} is on floor {i % 7}. Its code is {1000 + i}. Nobody else knows it." for i in range(80))


@pytest.fixture(scope="module")
def tiny(default_tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return tiny_llama(default_tokenizer, 2, TRAINING_LENGTH), default_tokenizer


def _plan(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase], candidates: int | None) -> dict:
    model, tokenizer = tiny
    config = XL3MConfig(segment_tokens=48, question_tokens=12, candidates=candidates)
    engine = Engine(model=model, tokenizer=tokenizer, strategy="xl3m", xl3m=config, reuse_prefixes=False)
    ids = engine.tokenize(TEXT + "\nWhat is the code of room 7?")
    engine.strategy.prepare(model)
    plan = engine.strategy.plan(model, tokenizer, ids, 4, lambda done, total: None)
    assert plan is not None
    return plan.details


def test_the_attention_pass_narrows_likelihood_scoring(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    """With ``candidates``, only the segments the attention pass ranks best are scored by likelihood (at least
    twice as many as fit in the answer's context), the choice comes from them and reports both scores; with
    ``None`` every segment is scored; with as many candidates as segments the choice is the same as with None."""
    everything = _plan(tiny, None)
    assert everything["scored"] == everything["segments"] > 8
    assert all("attention" not in chosen for chosen in everything["chosen"])
    fit = -(-max(TRAINING_LENGTH // CONTEXT_SHARE, 2 * 48) // 48)  # the default context: at least two segments
    narrowed = _plan(tiny, 1)
    assert narrowed["scored"] == 2 * fit
    narrowed = _plan(tiny, 5)
    assert narrowed["scored"] == 5 and narrowed["segments"] == everything["segments"]
    assert all(0 < chosen["attention"] <= 1 for chosen in narrowed["chosen"])
    same = _plan(tiny, everything["segments"])
    assert same["scored"] == same["segments"]
    assert [c["start"] for c in same["chosen"]] == [c["start"] for c in everything["chosen"]]


def test_the_chosen_segments_are_the_best_scored_of_the_best_attended(
    tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    """The candidates are the top of an independent recomputation of the attention pass over the question's words
    (the line breaks before it condition them only), and the chosen are the candidates with the best scores
    (contrast, the default, computed among those candidates)."""
    model, tokenizer = tiny
    query = list(tokenizer("\n\nWhat is the code of room 7?", add_special_tokens=False).input_ids)
    words = next(i for i, token in enumerate(query) if tokenizer.decode([token]).strip())
    assert words >= 1
    config = XL3MConfig(segment_tokens=48, question_tokens=len(query), candidates=5)
    engine = Engine(model=model, tokenizer=tokenizer, strategy="xl3m", xl3m=config, reuse_prefixes=False)
    ids = engine.tokenize(TEXT + "\n\nWhat is the code of room 7?")
    assert ids[-len(query) :] == query
    strategy = engine.strategy
    assert isinstance(strategy, XL3M)
    strategy.prepare(model)
    plan = strategy.plan(model, tokenizer, ids, 4, lambda done, total: None)
    assert plan is not None
    document = strategy.read_document(model, tokenizer, ids[: -len(query)], lambda done, total: None)
    block, row = document.places[0]
    prefix = block.prefix_cache(row, document.prefix)
    every = question_queries(model, prefix, query, document.prefix + 48)
    queries = {layer: (q[:, words:], scale) for layer, (q, scale) in every.items()}
    attention = attention_scores(queries, document.places, document.prefix, [0])  # the tiny model's ranking layer
    best = sorted(range(len(attention)), key=lambda i: -attention[i])[:5]
    certainty, contrast = strategy._scores(model, document.places, query, len(query) - words, best)
    likelihood = contrast or certainty  # the setting's score: contrast by default
    starts = {document.spans[i][0]: i for i in best}
    chosen = [starts[c["start"]] for c in plan.details["chosen"]]  # every chosen segment is a candidate
    assert sorted(chosen, key=lambda i: -likelihood[i]) == sorted(best, key=lambda i: -likelihood[i])[: len(chosen)]
    for c in plan.details["chosen"]:
        assert abs(c["attention"] - attention[starts[c["start"]]]) <= 1e-4
    with pytest.raises(ValueError, match="leaves no token"):
        question_queries(model, prefix, query, document.prefix + 48, len(query))


def test_candidates_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="candidates must be None or an int >= 1"):
        XL3MConfig(candidates=0)
    assert XL3MConfig(candidates=None).candidates is None


def test_answers_stream_through_the_narrowed_path(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    model, tokenizer = tiny
    engine = Engine(
        model=model, tokenizer=tokenizer, strategy="xl3m", xl3m=XL3MConfig(segment_tokens=48, question_tokens=12),
        reuse_prefixes=False,
    )  # fmt: skip
    stream = engine.stream(TEXT + "\nWhat is the code of room 7?", GenerationSettings(max_new_tokens=3))
    assert len(list(stream)) >= 1 and stream.result is not None and stream.result.output_tokens == 3


def test_the_hop_scores_only_the_sentences_its_passage_attends_to_most(
    tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    """With ``candidates``, of the sentences of the segment the hop finds, only the ``candidates`` that its passage
    (read as a question is) attends to most are read and scored (an independent recomputation of the attention
    pass): the sentence added is one of them, with its attention reported."""
    model, tokenizer = tiny
    query = list(tokenizer("\n\nWhat is the code of room 7?", add_special_tokens=False).input_ids)
    words = next(i for i, token in enumerate(query) if tokenizer.decode([token]).strip())
    config = XL3MConfig(
        segment_tokens=48, question_tokens=len(query), candidates=2, passage_tokens=16, hop_margin=0.0,
        hop_confidence=None,
    )  # fmt: skip
    engine = Engine(model=model, tokenizer=tokenizer, strategy="xl3m", xl3m=config, reuse_prefixes=False)
    ids = engine.tokenize(TEXT + "\n\nWhat is the code of room 7?")
    strategy = engine.strategy
    assert isinstance(strategy, XL3M)
    strategy.prepare(model)
    plan = strategy.plan(model, tokenizer, ids, 4, lambda done, total: None)
    assert plan is not None
    hop = plan.details["hop"]
    document = strategy.read_document(model, tokenizer, ids[: -len(query)], lambda done, total: None)
    block, row = document.places[0]
    hop_query = query[:words] + ids[hop["from"]["start"] : hop["from"]["end"]]
    every = question_queries(model, block.prefix_cache(row, document.prefix), hop_query, document.prefix + 48)
    a, b = hop["segment"]["start"], hop["segment"]["end"]
    cuts = sentences(ids[a:b], tokenizer, 16, PASSAGE_MIN_TOKENS)
    assert len(cuts) > 2
    segment_block, segment_row = document.places[document.spans.index((a, b))]
    weights = span_attention_scores(
        {layer: (q[:, words:], scale) for layer, (q, scale) in every.items()},
        [(segment_block, segment_row, document.prefix + x, document.prefix + y) for x, y in cuts],
        [0],  # the tiny model's ranking layer
    )
    best = sorted(range(len(cuts)), key=lambda n: -weights[n])[:2]
    added = (hop["passage"]["start"] - a, hop["passage"]["end"] - a)
    assert added in {cuts[n] for n in best}
    assert abs(hop["passage"]["attention"] - weights[cuts.index(added)]) <= 1e-4
