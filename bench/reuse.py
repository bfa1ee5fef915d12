"""Many questions about one document: with and without reuse of its encoded state.

    python -m bench reuse --tokens 32768 --questions 10                # 10 questions, reuse vs none
    python -m bench reuse --latency-only --tokens 16384 65536          # per-question latency after the first

Without reuse every question re-reads the whole document; with reuse (the engine's automatic prefix reuse,
as the LangChain/LlamaIndex classes use it) only the question and at most one prefill chunk are encoded. One tiny
untimed generation runs first, so that one-time costs (the model thread, kernels, allocations) fall on neither
timed pass. Writes ``reuse.md`` (``reuse-latency.md`` with ``--latency-only``) to ``bench/results/`` (``--results
DIR`` elsewhere).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from bench.common import (
    add_dtype,
    add_results,
    command_line,
    machine_line,
    make_parser,
    positive_int,
    token_ids,
    write_result,
)
from lminf_integrations import LMInfiniteConfig
from lminf_integrations.engine import Engine, GenerationSettings
from lminf_integrations.models import load_model

QUESTIONS = [
    "What does the assert statement do?",
    "How are augmented assignments evaluated?",
    "What is a coroutine?",
    "How does attribute access work?",
    "What are the bitwise operators?",
    "What does break do inside a loop?",
    "What is a callable type?",
    "How are function calls evaluated?",
    "How is a class definition executed?",
    "How do comparisons chain?",
]
SETTINGS = GenerationSettings(max_new_tokens=16)


def ask_all(engine: Engine, document: list[int], questions: list[str]) -> list[float]:
    seconds = []
    for question in questions:
        ids = document + engine.tokenize("\n\nQuestion: " + question + "\nAnswer:")
        started = time.perf_counter()
        engine.generate(ids, SETTINGS)
        seconds.append(time.perf_counter() - started)
        print(f"  {seconds[-1]:.1f} s  {question}", flush=True)
    return seconds


def warm_up(model: Any, tokenizer: Any, config: LMInfiniteConfig) -> None:
    """One tiny generation, untimed: whichever timed pass ran first would otherwise bear the one-time costs (the
    model thread and its OpenMP team, kernels, first allocations) and look slower than it is."""
    engine = Engine(model=model, tokenizer=tokenizer, config=config, reuse_prefixes=False)
    engine.generate(engine.tokenize("Question: " + QUESTIONS[0] + "\nAnswer:"), GenerationSettings(max_new_tokens=2))


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("reuse", __doc__)
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[32768], help="document lengths")
    parser.add_argument("--questions", type=positive_int, default=10, help="questions per document")
    parser.add_argument("--latency-only", action="store_true", help="only the reuse run (per-question latency)")
    add_dtype(parser)
    parser.add_argument("--cache-mode", default="window", choices=["window", "full"], help="LM-Infinite's cache")
    add_results(parser, "reuse.md (reuse-latency.md with --latency-only)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    model, tokenizer = load_model(None, args.dtype)
    config = LMInfiniteConfig(n_local=4096, cache_mode=args.cache_mode)
    lines = [
        f"# Reusing an encoded document, SmolLM2-135M-Instruct, {args.dtype}, cache_mode={args.cache_mode}",
        "",
        f"{machine_line()}. Answers of 16 tokens, after an untimed warm-up generation. "
        f"Command: `{command_line('reuse', argv)}`",
        "",
        "| document tokens | questions | without reuse: total s | with reuse: total s | ratio | "
        "with reuse: first question s | with reuse: median later question s |",
        "|---|---|---|---|---|---|---|",
    ]
    warm_up(model, tokenizer, config)
    for n in args.tokens:
        document = token_ids(tokenizer, n)
        questions = (QUESTIONS * 10)[: args.questions]
        print(f"{n} tokens, with reuse:", flush=True)
        reused = ask_all(Engine(model=model, tokenizer=tokenizer, config=config), document, questions)
        without_total = "–"
        ratio = "–"
        if not args.latency_only:
            print(f"{n} tokens, without reuse:", flush=True)
            plain = Engine(model=model, tokenizer=tokenizer, config=config, reuse_prefixes=False)
            without = ask_all(plain, document, questions)
            without_total = f"{sum(without):.1f}"
            ratio = f"{sum(reused) / sum(without):.3f}"
        later = f"{statistics.median(reused[1:]):.2f}" if len(reused) > 1 else "–"
        row = [str(n), str(len(questions)), without_total, f"{sum(reused):.1f}", ratio, f"{reused[0]:.1f}", later]
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_result("reuse-latency.md" if args.latency_only else "reuse.md", text, args.results)


if __name__ == "__main__":
    main()
