"""XL3M segment selection on tiny random models: segmenting, scoring against an independent reference, selection
within the budget, segments read once, and the strategy through the engine and ``lminf``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations import cli
from lminf_integrations.config import GenerationSettings, XL3MConfig
from lminf_integrations.engine import Engine
from lminf_integrations.strategies.xl3m.scoring import SegmentStore, score_segment
from lminf_integrations.strategies.xl3m.segments import split
from lminf_integrations.strategies.xl3m.strategy import XL3M, _choose, template_parts
from tests.tiny_models import tiny_llama
from tests.tolerances import network_bound

TRAINING_LENGTH = 256  # the tiny model's: prompts past it are answered from chosen segments
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


def test_choose_takes_the_best_that_fit_in_document_order() -> None:
    assert _choose([0.1, 0.9, 0.5, 0.8], [10, 10, 10, 10], budget=25) == [1, 3]
    assert _choose([0.1, 0.9, 0.5, 0.8], [10, 30, 10, 10], budget=25) == [2, 3]  # the best does not fit
    assert _choose([0.3], [10], budget=5) == []


@pytest.mark.parametrize("score", ["loglik", "entropy"])
def test_scores_match_a_plain_forward(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase], score: str) -> None:
    """The score from the segment's cache equals the one computed from one uncached forward of segment + query."""
    model, tokenizer = tiny
    prefix_ids = tokenizer("Rooms:", add_special_tokens=False).input_ids
    segment = tokenizer(" Room 3 is on floor 3. Its code is 1003.", add_special_tokens=False).input_ids
    query = tokenizer("\nQuestion: what is the code of room 3?\nAnswer:", add_special_tokens=False).input_ids
    store = SegmentStore()
    prefix = store.prefix(model, prefix_ids)
    cache = store.get(model, prefix, prefix_ids, segment)
    got = score_segment(model, cache, query, score)
    assert cache.get_seq_length() == len(prefix_ids) + len(segment)  # left as it was
    with torch.inference_mode():
        logits = model(torch.tensor([[*prefix_ids, *segment, *query]])).logits[0].float()
    tail = logits[len(prefix_ids) + len(segment) :]
    if score == "loglik":
        logp = tail[:-1].log_softmax(-1)
        expected = float(logp.gather(-1, torch.tensor(query[1:])[:, None]).mean())
    else:
        logp = tail[-1].log_softmax(-1)
        expected = float((logp.exp() * logp).sum())
    # Cached and uncached forwards differ in summation order only: a logit moves by at most the network bound
    # (fp32, the MLP's 128-term sums, 2 layers), a log-softmax value by at most twice that, and so their mean.
    bound = 2 * network_bound(tail, torch.float32, reduction=128, layers=2)
    assert abs(got - expected) <= bound, (got, expected, bound)


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


def test_a_prompt_that_fits_is_read_whole(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    model, tokenizer = tiny
    engine = _engine(model, tokenizer)
    vanilla = Engine(model=model, tokenizer=tokenizer, strategy="vanilla", reuse_prefixes=False)
    prompt = "Room 1 is on floor 1. Its code is 1001. What is the code of room 1?"
    stream = engine.stream(prompt, GenerationSettings(max_new_tokens=5))
    assert "".join(stream) == vanilla.generate(prompt, GenerationSettings(max_new_tokens=5))
    assert stream.result is not None and stream.result.details is None


def test_budget_setting_and_states_are_refused(
    tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase], tmp_path: Path
) -> None:
    model, tokenizer = tiny
    engine = _engine(model, tokenizer, context_tokens=60)
    stream = engine.stream(TEXT + "\nWhat is the code of room 7?", GenerationSettings(max_new_tokens=2))
    "".join(stream)
    assert stream.result is not None and stream.result.details is not None
    assert sum(c["end"] - c["start"] for c in stream.result.details["xl3m"]["chosen"]) <= 60
    with pytest.raises(ValueError, match="keeps what it reads per segment itself"):
        engine.encode_document(TEXT)
    with pytest.raises(ValueError, match="segment_tokens=512 exceeds the model's training length 256"):
        _engine(model, tokenizer, segment_tokens=512)
    assert isinstance(engine.strategy, XL3M)


def test_lminf_ask_with_xl3m_shows_its_selection(
    tmp_path: Path, tiny_model_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shared tiny model trains to 8192 tokens: a ~9K-token document is past it."""
    document = tmp_path / "doc.txt"
    document.write_text(TEXT * 9)
    common = ["--model", tiny_model_dir, "--dtype", "fp32", "--max-new-tokens", "3", "--no-progress"]
    assert cli.main(["ask", str(document), "Code of room 7?", *common, "--strategy", "xl3m", "--show-selection"]) == 0
    err = capsys.readouterr().err
    assert "[xl3m: " in err and " segments, tokens " in err
    with pytest.raises(SystemExit):
        cli.main(["encode", str(document), "-o", str(tmp_path / "s.lminf"), *common[:4], "--strategy", "xl3m"])
    assert "no state to encode" in capsys.readouterr().err


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
