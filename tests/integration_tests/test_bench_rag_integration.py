"""A CPU-sized slice of ``python -m bench rag-vs-full`` on the real default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bench import rag_vs_full

pytestmark = pytest.mark.integration


def test_full_context_answers_single_facts_and_vector_rag_retrieves_them(
    default_model: tuple[PreTrainedModel, PreTrainedTokenizerBase], tmp_path: Path
) -> None:
    """2K tokens, two single-fact questions and a pair: inside the window, so full context is exact attention."""
    model, tokenizer = default_model
    argv = [
        "--tokens", "2048", "--questions", "3", "--multi", "1", "--seed", "0",
        "--methods", "full", "vector", "--configs", "lambda", "--results", str(tmp_path),
    ]  # fmt: skip
    rag_vs_full.main(argv, model=model, tokenizer=tokenizer)
    payload = json.loads((tmp_path / "rag-vs-full.json").read_text(encoding="utf-8"))
    answers = payload["answers"]
    assert [a["kind"] for a in answers] == ["single", "single", "pair"] * 2
    full = [a for a in answers if a["method"].startswith("full")]
    vector = [a for a in answers if a["method"].startswith("vector")]
    for answer in full:
        if answer["kind"] == "single":
            assert answer["correct"], answer
    for answer in vector:
        assert answer["facts_in_prompt"], answer  # 2K tokens, top 4 chunks: every needed fact retrieved
    table = (tmp_path / "rag-vs-full.md").read_text("utf-8")
    assert "| 2048 | full, LM-Infinite Λ (n_local=4096) | 2/2 (34–100%) |" in table
