"""The passkey harness (``python -m bench passkey``): prompt construction, seeding, scoring, prefix sharing,
tables and plots. The model here is a tiny random-weight Llama: these tests check the harness, not accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bench.passkey import (
    KEY_LINE,
    DCARunner,
    LambdaRunner,
    PromptParts,
    VanillaRunner,
    is_correct,
    key_chosen,
    make_prompt,
    plot,
    render_table,
    run_chain,
    xl3m_details,
)
from lminf_integrations import DCAConfig, LMInfiniteConfig, unpatch_model
from lminf_integrations.config import XL3MConfig
from lminf_integrations.engine import Engine, GenerationSettings
from tests.tiny_models import tiny_llama

Tiny = tuple[PreTrainedModel, PreTrainedTokenizerBase]


@pytest.fixture(scope="module")
def parts(tiny_llama_with_real_tokenizer: Tiny) -> PromptParts:
    return PromptParts.of(tiny_llama_with_real_tokenizer[1])


def test_prompts_are_seeded(parts: PromptParts) -> None:
    first = make_prompt(parts, 2000, 0.5, seed=0)
    assert make_prompt(parts, 2000, 0.5, seed=0) == first
    others = {make_prompt(parts, 2000, 0.5, seed=s).key for s in range(1, 6)}
    assert others - {first.key}, "other seeds should draw other keys"
    assert make_prompt(parts, 2000, 0.25, seed=0).key != first.key or make_prompt(parts, 4000, 0.5, 0).key != first.key


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_key_sits_at_the_requested_depth(parts: PromptParts, depth: float) -> None:
    prompt = make_prompt(parts, 3000, depth, seed=7)
    ids, start = prompt.token_ids, prompt.key_start
    key_ids = parts.key_line(prompt.key)
    assert ids[start : start + len(key_ids)] == key_ids
    assert parts.tokenizer.decode(key_ids) == KEY_LINE.format(key=prompt.key)
    assert abs(len(ids) - 3000) < len(parts.filler)
    # Everything before the key is the instruction and whole filler lines; the question closes the prompt.
    before = ids[len(parts.instruction) : start]
    assert ids[: len(parts.instruction)] == parts.instruction
    assert len(before) % len(parts.filler) == 0 and before == parts.filler * (len(before) // len(parts.filler))
    assert ids[-len(parts.question) :] == parts.question
    filler_total = len(ids) - len(parts.instruction) - len(key_ids) - len(parts.question)
    assert abs(len(before) / filler_total - depth) <= len(parts.filler) / filler_total


def test_xl3m_recall_is_the_key_sentence_read_whole(parts: PromptParts) -> None:
    """Recall counts the key's own sentence ("The pass key is N."), every token of it, in the spans read; the rest of
    the key line (which repeats it) is not needed; a prompt read whole (no selection) holds it."""
    prompt = make_prompt(parts, 3000, 0.5, seed=3)
    start = prompt.key_start
    sentence = parts.tokenizer.decode(prompt.token_ids[start : start + prompt.key_tokens])
    assert sentence == f" The pass key is {prompt.key}."
    end = start + prompt.key_tokens
    line_end = start + len(parts.key_line(prompt.key))

    def read(*spans: tuple[int, int]) -> dict[str, object]:
        return {"chosen": [], "read": [{"start": a, "end": b} for a, b in spans]}

    assert key_chosen(prompt, read((start, end)))
    assert key_chosen(prompt, read((start - 20, start + 2), (start + 2, line_end)))  # two passages, no gap
    assert not key_chosen(prompt, read((start, end - 1)))  # the sentence's full stop missing
    assert not key_chosen(prompt, read((start - 20, start + 2), (start + 3, line_end)))  # a token missing
    assert not key_chosen(prompt, read((end, line_end)))  # "Remember it. N is the pass key." alone
    assert key_chosen(prompt, read((0, line_end)))  # a whole segment
    assert key_chosen(prompt, None)


def test_bad_prompt_requests_are_refused(parts: PromptParts) -> None:
    with pytest.raises(ValueError, match="depth"):
        make_prompt(parts, 3000, 1.5, seed=0)
    with pytest.raises(ValueError, match="too short"):
        make_prompt(parts, 40, 0.5, seed=0)


@pytest.mark.parametrize(
    "answer,correct",
    [(" 48213. Remember", True), ("48213", True), (" is 48213", True), (" 482130", False), ("148213", False),
     (" 4821", False), (" 12345.", False), ("", False)],
)
def test_scoring_wants_the_key_as_a_whole_number(answer: str, correct: bool) -> None:
    assert is_correct(answer, "48213") is correct


def test_shared_prefixes_give_the_same_answers_as_fresh_prompts(tiny_llama_with_real_tokenizer: Tiny) -> None:
    """Prefix sharing is an optimisation only: every answer equals encoding that prompt from scratch."""
    model, tokenizer = tiny_llama_with_real_tokenizer
    parts = PromptParts.of(tokenizer)
    config = LMInfiniteConfig(n_global=4, n_local=64, top_k=2, top_k_from_layer=1, cache_mode="full", chunk_size=64)
    prompts = [make_prompt(parts, n, d, seed=1) for n in (300, 520) for d in (0.0, 0.5, 1.0)]
    rows = run_chain(LambdaRunner(model, tokenizer, config), ["lambda", "lambda+topk"], prompts)
    assert len(rows) == 2 * len(prompts)
    plain = LMInfiniteConfig(n_global=4, n_local=64, cache_mode="full", chunk_size=64)
    fresh = {
        "lambda": Engine(model=model, tokenizer=tokenizer, config=plain, reuse_prefixes=False),
        "lambda+topk": Engine(model=model, tokenizer=tokenizer, config=config, reuse_prefixes=False),
    }
    settings = GenerationSettings(max_new_tokens=8)
    by_key = {(p.length, p.depth): p for p in prompts}
    for row in rows:
        prompt = by_key[(row["length"], row["depth"])]  # type: ignore[index]
        assert row["key"] == prompt.key and row["tokens"] == len(prompt.token_ids)
        assert row["answer"] == fresh[str(row["method"])].generate(prompt.token_ids, settings), row
        assert row["correct"] == is_correct(str(row["answer"]), prompt.key)
    # Top-k reaches the middle of a prompt longer than the window, so the two methods see different keys.
    assert any(
        a["answer"] != b["answer"] for a, b in zip(rows[::2], rows[1::2], strict=True)
    ) or all(r["tokens"] <= 64 for r in rows)


def test_dca_chain_gives_the_answers_of_fresh_prompts(tiny_llama_with_real_tokenizer: Tiny) -> None:
    """DCA shares encoded prefixes along the chain too: each answer equals that prompt encoded from scratch, on a
    model whose training length (64) puts the prompts over many chunks."""
    _, tokenizer = tiny_llama_with_real_tokenizer
    model = tiny_llama(tokenizer, seed=3, training_length=64)
    parts = PromptParts.of(tokenizer)
    prompts = [make_prompt(parts, 300, d, seed=4) for d in (0.0, 0.5, 1.0)]
    config = DCAConfig(chunk_size=40, local_window=8)
    rows = run_chain(DCARunner(model, tokenizer, config, chunk=32), ["dca"], prompts)
    fresh = Engine(model=model, tokenizer=tokenizer, strategy="dca", dca=config, reuse_prefixes=False)
    by_depth = {p.depth: p for p in prompts}
    for row in rows:
        prompt = by_depth[row["depth"]]  # type: ignore[index]
        assert row["method"] == "dca" and row["key"] == prompt.key
        assert row["answer"] == fresh.generate(prompt.token_ids, GenerationSettings(max_new_tokens=8)), row


def test_vanilla_runner_matches_plain_generate(tiny_llama_with_real_tokenizer: Tiny) -> None:
    model, tokenizer = tiny_llama_with_real_tokenizer
    parts = PromptParts.of(tokenizer)
    prompts = [make_prompt(parts, 300, d, seed=2) for d in (0.0, 1.0)]
    rows = run_chain(VanillaRunner(model, tokenizer, chunk=64), ["vanilla"], prompts)
    unpatch_model(model)
    for row, prompt in zip(rows, sorted(prompts, key=lambda p: p.shared_prefix), strict=True):
        import torch

        out = model.generate(  # type: ignore[operator]
            torch.tensor([prompt.token_ids]), max_new_tokens=8, do_sample=False, top_k=None,
            pad_token_id=tokenizer.eos_token_id,
        )
        assert row["answer"] == tokenizer.decode(out[0, len(prompt.token_ids) :], skip_special_tokens=True)


def _row(method: str, length: int, depth: float, correct: bool) -> dict[str, object]:
    return {"method": method, "length": length, "depth": depth, "correct": correct, "answer": "", "key": "1"}


def test_table_reports_accuracy_per_length_and_depth(tmp_path: Path) -> None:
    rows = [
        _row("lambda", 4096, 0.0, True), _row("lambda", 4096, 0.5, False), _row("lambda", 4096, 1.0, True),
        _row("lambda", 8192, 0.0, False), _row("lambda", 8192, 0.5, False), _row("lambda", 8192, 1.0, True),
        _row("vanilla", 4096, 0.0, True), _row("vanilla", 4096, 0.5, True), _row("vanilla", 4096, 1.0, True),
    ]
    table = render_table(rows, [4096, 8192], [0.0, 0.5, 1.0], ["# title"])
    assert "| lambda | 2/3 (21–94%) | 1/3 (6–79%) |" in table
    assert "| vanilla | 3/3 (44–100%) | – |" in table  # vanilla was not run at 8K
    assert "| 50% | 0/1 (0–79%) | 0/1 (0–79%) |" in table  # lambda's depth rows
    assert "lambda+topk" not in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib not installed")
    assert plot(rows, [4096, 8192], [0.0, 0.5, 1.0], tmp_path / "passkey.png")
    assert (tmp_path / "passkey.png").read_bytes()[:4] == b"\x89PNG"


def test_xl3m_details_name_the_hop_gate_only_when_it_is_set() -> None:
    """The results' line on the XL3M settings says what ran: without ``hop_confidence`` the hop always runs (no
    "less likely than None"), with it the threshold is named."""
    plain = xl3m_details(XL3MConfig(), training=8192, question_tokens=12)
    assert "None" not in plain and "one hop when it leads by 0.5)" in plain and "1024 tokens" in plain
    gated = xl3m_details(XL3MConfig(hop_confidence=0.9, context_tokens=2048), training=8192, question_tokens=12)
    assert "less likely than 0.9" in gated and "2048 tokens" in gated and "last 12 tokens" in gated
