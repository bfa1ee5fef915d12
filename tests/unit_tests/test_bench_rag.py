"""The rag-vs-full harness: seeded documents, scoring, result files, and a tiny end-to-end slice.

The slice runs every method with a 2-layer random-weight model (answers are noise: only the mechanics are
checked) and the real all-MiniLM-L6-v2 embeddings (retrieval is real).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bench import rag_vs_full
from bench.facts import FactDocument, answer_line, codes_in, has_code, make_document, score
from lminf_integrations import is_patched
from lminf_integrations.config import XL3MConfig
from lminf_integrations.strategies.xl3m.strategy import XL3M


@pytest.fixture(scope="module")
def tokenizer(default_tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    return default_tokenizer


@pytest.fixture(scope="module")
def document(tokenizer: PreTrainedTokenizerBase) -> FactDocument:
    return make_document(tokenizer, 4096, seed=3, n_questions=8, n_multi=4)


# ---- the generator --------------------------------------------------------------------------------------------
def test_same_seed_same_document_other_seed_other_document(tokenizer: PreTrainedTokenizerBase) -> None:
    first = make_document(tokenizer, 2048, seed=1, n_questions=4, n_multi=2)
    assert make_document(tokenizer, 2048, seed=1, n_questions=4, n_multi=2) == first
    other = make_document(tokenizer, 2048, seed=2, n_questions=4, n_multi=2)
    assert other.text != first.text
    assert [q.text for q in other.questions] != [q.text for q in first.questions]
    assert other.codes != first.codes
    # The length is part of the seed: a longer document is not the shorter one extended.
    assert not make_document(tokenizer, 3072, seed=1, n_questions=4, n_multi=2).text.startswith(first.text[:2000])


def test_document_length_and_fact_positions(tokenizer: PreTrainedTokenizerBase, document: FactDocument) -> None:
    ids = tokenizer(document.text, add_special_tokens=False)["input_ids"]
    assert len(ids) == document.n_tokens
    assert abs(document.n_tokens - document.requested_tokens) <= 2
    for fact in document.facts:
        assert document.text[fact.char_start : fact.char_start + len(fact.sentence)] == fact.sentence
        assert document.text.count(fact.sentence) == 1
        # The reported token starts the sentence: decoding from it gives the sentence's beginning.
        assert tokenizer.decode(ids[fact.token_start : fact.token_start + 6]).strip().startswith("The")
        assert fact.sentence.startswith(tokenizer.decode(ids[fact.token_start : fact.token_start + 3]).strip())
        assert fact.depth == pytest.approx(fact.token_start / document.n_tokens)
        # A paragraph of its own.
        assert document.text[fact.char_start - 2 : fact.char_start] == "\n\n"


def test_questions_codes_and_multi_fact_distance(document: FactDocument) -> None:
    kinds = [q.kind for q in document.questions]
    assert kinds == ["single"] * 4 + ["pair", "chain", "pair", "chain"]
    assert len({q.id for q in document.questions}) == len(document.questions)
    assert {f.role for f in document.facts} == {"single", "pair", "chain-link", "chain-code", "decoy"}
    every_code = [c for f in document.facts for c in codes_in(f.sentence)]
    assert len(every_code) == len(set(every_code)) == len(document.codes)
    for code in document.codes:
        assert codes_in(document.text).count(code) == 1
    for question in document.questions:
        sentences = [document.facts[i].sentence for i in question.facts]
        assert all(any(has_code(s, c) for s in sentences) for c in question.answers)
        if question.multi:
            a, b = (document.facts[i] for i in question.facts)
            assert abs(a.depth - b.depth) >= 0.4
        if question.kind == "chain":
            link, code_fact = (document.facts[i] for i in question.facts)
            place = link.sentence.split(" is kept in the ")[1].rstrip(".")
            assert place in code_fact.sentence and place not in question.text
    # Chain questions come with decoys: more "archive code" facts than chain questions.
    assert sum("archive code" in f.sentence for f in document.facts) >= 2 + 3


def test_bad_arguments(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="n_multi"):
        make_document(tokenizer, 2048, n_questions=2, n_multi=3)
    with pytest.raises(ValueError, match="too many"):
        make_document(tokenizer, 65536, n_questions=80, n_multi=0)


# ---- scoring --------------------------------------------------------------------------------------------------
def test_scoring() -> None:
    assert score("48213.", ["48213"])
    assert score("The code is 48213, I think", ["48213"])
    assert not score("48212.", ["48213"])
    assert not score("", ["48213"])
    # Digits inside longer numbers or words do not count.
    assert not score("148213", ["48213"]) and not score("482130", ["48213"]) and not score("x48213", ["48213"])
    # Multi-fact: every code is needed, in any order.
    assert score("51890 and 48213", ["48213", "51890"])
    assert not score("48213 and 5189", ["48213", "51890"])
    assert not score("48213", ["48213", "51890"])
    # Another code of the document makes the answer wrong (no credit for listing everything).
    assert not score("48213 or 77402", ["48213"], others=["77402"])
    assert score("48213 or 12345", ["48213"], others=["77402"])
    with pytest.raises(ValueError):
        score("48213", [])


def test_answer_line_and_codes() -> None:
    assert answer_line(" 48213.\n\nThe locker number of the red kite is 11111.") == "48213."
    assert answer_line("\n\n  51890 and 48213\nmore") == "51890 and 48213"
    assert answer_line("   ") == ""
    assert codes_in("a 12345, 123456 and 54321.") == ["12345", "54321"]


# ---- configuration and result files ---------------------------------------------------------------------------
def test_parse_config() -> None:
    label, config = rag_vs_full.parse_config("lambda", 2048)
    assert config.n_local == 2048 and config.top_k == 0 and config.cache_mode == "window" and "Λ" in label
    _, config = rag_vs_full.parse_config("topk:5", 4096)
    assert (config.top_k, config.top_k_from_layer, config.cache_mode) == (5, 0, "full")
    _, config = rag_vs_full.parse_config("topk:20:8", 4096)
    assert (config.top_k, config.top_k_from_layer) == (20, 8)
    for bad in ("topk", "topk:x", "lambda:4", "full"):
        with pytest.raises(ValueError):
            rag_vs_full.parse_config(bad, 4096)
    with pytest.raises(SystemExit):
        rag_vs_full.parse_args(["--configs", "nonsense"])


def _answer(method: str, kind: str, correct: bool, latency: float) -> rag_vs_full.AnswerRecord:
    return rag_vs_full.AnswerRecord(
        method, 4096, f"{kind}-1", kind, "q?", ["12345"], "12345." if correct else "0", "raw", correct,
        ["12345"] if correct else [], True, 100, latency, latency / 2,
    )  # fmt: skip


def test_summary_table_and_files(tmp_path: Path, document: FactDocument) -> None:
    full, rag = "full, LM-Infinite Λ (n_local=4096)", "vector RAG (all-MiniLM-L6-v2), top 4 of 254-token chunks"
    runs = [
        rag_vs_full.MethodRun(full, 4096, 10.0, 0.5, [
            _answer(full, "single", True, 1.0), _answer(full, "single", False, 3.0), _answer(full, "pair", True, 2.0),
        ]),
        rag_vs_full.MethodRun(rag, 4096, 2.0, 0.25, [
            _answer(rag, "single", True, 1.0), _answer(rag, "single", True, 1.0), _answer(rag, "chain", False, 1.0),
        ]),
    ]  # fmt: skip
    rows = rag_vs_full.summary_rows(runs)
    assert rows[0]["single"] == "1/2" and rows[0]["pair"] == "1/1"
    assert rows[0]["chain"] == "–" and rows[0]["multi"] == "1/1" and rows[0]["all"] == "2/3"
    assert rows[0]["mean_latency_s"] == 2.0 and rows[0]["mean_ttft_s"] == 1.0 and rows[0]["total_s"] == 16.0
    assert rows[1]["single"] == "2/2" and rows[1]["multi"] == "0/1"
    args = rag_vs_full.parse_args(["--tokens", "4096", "--questions", "3", "--results", str(tmp_path / "out")])
    text = rag_vs_full.write_outputs(args.results, [document], runs, args, "TinyModel, float32")
    out = tmp_path / "out"
    assert (out / "rag-vs-full.md").read_text(encoding="utf-8") == text
    assert f"Command: `python -m bench rag-vs-full --tokens 4096 --questions 3 --results {out}`" in text
    table = [line for line in text.splitlines() if line.startswith("| 4096 |")]
    cells = "| 1/2 (9–91%) | 1/1 (21–100%) | – | 1/1 (21–100%) | 2/3 (21–94%) | 3/3 (44–100%) | 10.0 | 2.00 | 1.00 |"
    assert len(table) == 2 and cells + " 16.0 | 0.50 |" in table[0]
    assert "single 1/2 vs 2/2 (≥ not met), multi 1/1 vs 0/1 (> met)" in text
    payload = json.loads((out / "rag-vs-full.json").read_text(encoding="utf-8"))
    assert payload["rows"] == rows and len(payload["answers"]) == 6
    assert payload["command"] == f"python -m bench rag-vs-full --tokens 4096 --questions 3 --results {out}"
    assert payload["documents"][0]["facts"][0]["sentence"] == document.facts[0].sentence
    assert (out / "rag-vs-full.png").stat().st_size > 1000


def test_vanilla_keeps_room_for_question_and_answer(tokenizer: PreTrainedTokenizerBase, document: FactDocument) -> None:
    keep = rag_vs_full.vanilla_keep(document, tokenizer, 2048, 20)
    suffixes = [rag_vs_full.suffix(q) for q in document.questions]
    longest = max(len(ids) for ids in tokenizer(suffixes, add_special_tokens=False)["input_ids"])
    assert keep == 2048 - longest - 20
    assert rag_vs_full.vanilla_keep(document, tokenizer, 8192, 20) == document.n_tokens  # all of it fits
    with pytest.raises(ValueError):
        rag_vs_full.vanilla_keep(document, tokenizer, 30, 20)


def test_oracle_context_is_what_a_perfect_selection_gives(
    tiny_llama_with_real_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase], document: FactDocument
) -> None:
    """The ``oracle`` context is XL3M's answer prompt had it chosen exactly the segments holding the facts: the
    segments as the strategy itself cuts the document, not as the harness would."""
    model, tokenizer = tiny_llama_with_real_tokenizer
    doc_ids = list(tokenizer(document.text, add_special_tokens=False)["input_ids"])
    read = XL3M(XL3MConfig(segment_tokens=256)).read_document(model, tokenizer, doc_ids, lambda done, total: None)
    for question in document.questions:
        starts = [document.facts[i].token_start for i in question.facts]
        holding = [(a, b) for a, b in read.spans if any(a <= start < b for start in starts)]
        expected = doc_ids[: read.prefix] + [token for a, b in holding for token in doc_ids[a:b]]
        assert rag_vs_full.oracle_ids(document, question, tokenizer, 256) == expected
        sentences = tokenizer.decode(rag_vs_full.oracle_ids(document, question, tokenizer, None))
        in_order = sorted(question.facts, key=lambda i: document.facts[i].char_start)
        assert sentences == "\n\n".join(document.facts[i].sentence for i in in_order)
        assert len(holding) == len(set(holding)) <= len(question.facts)


# ---- a tiny end-to-end slice ----------------------------------------------------------------------------------
def test_every_method_answers_every_question(
    tmp_path: Path, tiny_llama_with_real_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase]
) -> None:
    model, tokenizer = tiny_llama_with_real_tokenizer
    was_patched = is_patched(model)
    argv = [
        "--tokens", "2048", "--questions", "3", "--multi", "1", "--seed", "0",
        "--configs", "lambda", "topk:2", "--n-local", "512", "--rag-top-k", "3",
        "--vanilla-length", "1024", "--max-new-tokens", "4", "--xl3m-context", "full", "--results", str(tmp_path),
    ]  # fmt: skip
    text = rag_vs_full.main(argv, model=model, tokenizer=tokenizer)
    assert is_patched(model) == was_patched  # left as it came
    payload = json.loads((tmp_path / "rag-vs-full.json").read_text(encoding="utf-8"))
    methods = [row["method"] for row in payload["rows"]]
    assert len(methods) == 9 and methods[0].startswith("full") and methods[1].startswith("full")
    assert methods[2].startswith("xl3m") and methods[3].startswith("dca") and methods[4].startswith("vector RAG")
    assert methods[5].startswith("BM25") and methods[6].startswith("vanilla")
    assert methods[7] == "oracle: the 512-token segments holding the facts"
    assert methods[8] == "oracle: the fact sentences alone"
    assert len([line for line in text.splitlines() if line.startswith("| 2048 |")]) == 9
    answers = payload["answers"]
    assert len(answers) == 9 * 3
    document = payload["documents"][0]
    assert document["tokens"] == 2048 and len(document["questions"]) == 3
    facts = document["facts"]
    codes = {c for f in facts for c in codes_in(f["sentence"])}
    for answer in answers:
        assert answer["raw"] and answer["latency_s"] >= answer["ttft_s"] > 0
        others = codes - set(answer["expected"])
        assert answer["correct"] == score(answer["answer"], answer["expected"], others)
    # The same arguments give the same document: the vanilla cut can be recomputed.
    doc = make_document(tokenizer, 2048, seed=0, n_questions=3, n_multi=1)
    keep = rag_vs_full.vanilla_keep(doc, tokenizer, 1024, 4)
    outside = []
    for answer in answers:
        question = next(q for q in document["questions"] if q["id"] == answer["question_id"])
        needed = [facts[i] for i in question["facts"]]
        if answer["method"].startswith("vector") and question["kind"] == "single":
            # Vector RAG on single-fact questions: the retrieved chunks hold the asked fact.
            assert answer["facts_in_prompt"]
            assert any(s["start"] <= needed[0]["char_start"] < s["end"] for s in answer["retrieved"])
            assert len(answer["retrieved"]) == 3 and answer["retrieval_s"] > 0
        if answer["method"].startswith(("full", "dca")):  # the whole document, every fact in the prompt
            assert answer["facts_in_prompt"] and answer["prompt_tokens"] > 2048
        if answer["method"].startswith("oracle"):  # only the facts' text: every fact, and far less than all
            assert answer["facts_in_prompt"] and answer["prompt_tokens"] <= 512 * len(needed) + 64
        if answer["method"].startswith("vanilla"):
            assert answer["prompt_tokens"] <= 1024 - 4
            if all(f["token_start"] + 20 < keep for f in needed):
                assert answer["facts_in_prompt"]
            if any(f["token_start"] >= keep for f in needed):
                assert not answer["facts_in_prompt"]
                outside.append(answer["question_id"])
    assert outside  # the cut really drops facts
    assert (tmp_path / "rag-vs-full.png").exists() and (tmp_path / "rag-vs-full.md").exists()
