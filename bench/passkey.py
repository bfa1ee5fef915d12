"""Passkey retrieval: a random 5-digit key hidden at a given depth in filler text, the model asked to repeat it.

    python -m bench passkey                                          # default grid (see --help), ~40 min here
    python -m bench passkey --lengths 4096 16384 --depths 0 0.5 1    # a quick look

The task is the standard one (Mohtashami & Jaggi, 2023; used by the LM-Infinite paper): an instruction to find
and remember the key, then lines of irrelevant filler ("The grass is green. The sky is blue. ..."), with one
line "The pass key is 12345. Remember it. 12345 is the pass key." placed after ``depth`` × the filler, then
"What is the pass key? The pass key is" and greedy decoding. An answer counts when the key's five digits
appear as a number in the first 8 generated tokens.

Methods, all on the same prompts:

* ``vanilla`` – the unpatched model with its ordinary cache (only up to ``--vanilla-max`` tokens: past its
  8K training length it fails, and its quadratic prefill makes longer prompts slow);
* ``lambda`` – LM-Infinite Λ-attention only (``top_k=0``);
* ``lambda+topk`` – Λ-attention plus top-k middle attention for the last prompt token and the answer.

Prompts are built from token ids (the filler line is tokenized once), so lengths and key positions are exact.
Keys are drawn from ``random.Random(f"{seed}-{length}-{depth}")``: the same seed gives the same prompts.

Cost: every prompt shares its beginning (instruction + filler lines) with the others up to its key, so
prefixes are encoded once along one chain and each prompt encodes only its key and what follows. Top-k only
changes the queries from the last prompt token on, so ``lambda`` and ``lambda+topk`` share every encoded prefix
too. Encoding runs in absolute chunk-aligned steps, and sharing stops at a chunk boundary, so each prompt goes
through exactly the computation of encoding it from scratch.

Writes ``bench/results/passkey.md``, ``passkey.json`` and ``passkey.png`` (accuracy heatmaps).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from bench.common import RESULTS, machine_line, write_result
from lminf_integrations import LMInfiniteConfig, unpatch_model
from lminf_integrations.engine import DocumentState, Engine, GenerationSettings
from lminf_integrations.hf_compat import cache_kwargs
from lminf_integrations.models import load_model

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 8
METHODS = ("vanilla", "lambda", "lambda+topk")


@dataclass(frozen=True)
class PasskeyPrompt:
    length: int  # the requested length; len(token_ids) is within one filler line of it
    depth: float  # requested depth in [0, 1]
    key: str
    token_ids: list[int]
    key_start: int  # token index where the key line starts
    shared_prefix: int  # tokens before the key line (instruction + filler lines), shared with other prompts

    @property
    def actual_depth(self) -> float:
        return self.shared_prefix / len(self.token_ids)


@dataclass
class PromptParts:
    """The token ids the prompts are assembled from (tokenized once per tokenizer)."""

    instruction: list[int]
    filler: list[int]
    question: list[int]
    tokenizer: PreTrainedTokenizerBase = field(repr=False)

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> PromptParts:
        def ids(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        return cls(ids(INSTRUCTION), ids(FILLER), ids(QUESTION), tokenizer)

    def key_line(self, key: str) -> list[int]:
        return list(self.tokenizer(KEY_LINE.format(key=key), add_special_tokens=False)["input_ids"])


def draw_key(seed: int, length: int, depth: float) -> str:
    return str(random.Random(f"{seed}-{length}-{depth}").randint(10000, 99999))


def make_prompt(parts: PromptParts, length: int, depth: float, seed: int) -> PasskeyPrompt:
    """A prompt of about ``length`` tokens with the key line after ``round(depth × filler lines)`` lines."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = draw_key(seed, length, depth)
    key_ids = parts.key_line(key)
    fixed = len(parts.instruction) + len(key_ids) + len(parts.question)
    n_lines = (length - fixed) // len(parts.filler)
    if n_lines < 1:
        raise ValueError(f"length {length} is too short for a passkey prompt (needs > {fixed} tokens)")
    before = round(depth * n_lines)
    prefix = parts.instruction + parts.filler * before
    ids = prefix + key_ids + parts.filler * (n_lines - before) + parts.question
    return PasskeyPrompt(length, depth, key, ids, len(prefix), len(prefix))


def is_correct(answer: str, key: str) -> bool:
    """The key as a whole number (not inside a longer run of digits) in the answer."""
    return re.search(rf"(?<!\d){re.escape(key)}(?!\d)", answer) is not None


# ---- methods --------------------------------------------------------------------------------------------------
class LambdaRunner:
    """Λ-attention (full cache, so the same encoded prefix serves Λ-only and Λ + top-k answers)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: LMInfiniteConfig):
        plain = LMInfiniteConfig(
            n_global=config.n_global, n_local=config.n_local, distance_limit=config.distance_limit, cache_mode="full"
        )
        # The encoder's cache must keep middle keys for the top-k layers; the Λ-only engine ignores them.
        self.encoder = Engine(model=model, tokenizer=tokenizer, config=config, reuse_prefixes=False)
        self.chunk = config.chunk_size
        self.answerers = {
            "lambda": Engine(model=model, tokenizer=tokenizer, config=plain, reuse_prefixes=False),
            "lambda+topk": Engine(model=model, tokenizer=tokenizer, config=config, reuse_prefixes=False),
        }

    def empty(self) -> DocumentState:
        return self.encoder.encode([])

    def extend(self, state: DocumentState, ids: Sequence[int]) -> DocumentState:
        return self.encoder.encode(list(ids), state=state)

    def answer(self, method: str, state: DocumentState, ids: list[int]) -> str:
        settings = GenerationSettings(max_new_tokens=ANSWER_TOKENS)
        return "".join(self.answerers[method].stream(ids, settings, state=state))


@dataclass
class VanillaState:
    token_ids: list[int]
    cache: DynamicCache


class VanillaRunner:
    """The unpatched model; prefixes go through its ordinary DynamicCache (keys for every position)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, chunk: int = 2048):
        self.model, self.tokenizer, self.chunk = model, tokenizer, chunk

    def empty(self) -> VanillaState:
        return VanillaState([], DynamicCache(config=self.model.config))

    @torch.inference_mode()
    def extend(self, state: VanillaState, ids: Sequence[int]) -> VanillaState:
        unpatch_model(self.model)  # an Engine re-patches the model when it next runs
        decoder = self.model.get_decoder()
        target = list(ids)
        while len(state.token_ids) < len(target):
            done = len(state.token_ids)
            piece = target[done : done + self.chunk]
            decoder(input_ids=torch.tensor([piece]), **cache_kwargs(state.cache), use_cache=True)
            state.token_ids.extend(piece)
        return state

    @torch.inference_mode()
    def answer(self, method: str, state: VanillaState, ids: list[int]) -> str:
        unpatch_model(self.model)
        cache = copy.deepcopy(state.cache)
        self.extend(VanillaState(list(state.token_ids), cache), ids[:-1])
        output = self.model.generate(  # type: ignore[operator]
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            **cache_kwargs(cache),
            max_new_tokens=ANSWER_TOKENS,
            do_sample=False,
            top_k=None,
            pad_token_id=self.tokenizer.eos_token_id,
        )
        return str(self.tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True))


def copy_state(state: DocumentState | VanillaState) -> DocumentState | VanillaState:
    if isinstance(state, DocumentState):
        return state.copy()
    return VanillaState(list(state.token_ids), copy.deepcopy(state.cache))


def run_chain(
    runner: LambdaRunner | VanillaRunner, methods: Sequence[str], prompts: list[PasskeyPrompt]
) -> list[dict[str, object]]:
    """Answer every prompt with ``methods``, encoding shared prefixes once, in order of key position."""
    rows: list[dict[str, object]] = []
    chain = runner.empty()
    for prompt in sorted(prompts, key=lambda p: p.shared_prefix):
        # Share only whole chunks: the prompt then goes through exactly the chunks it would from scratch.
        boundary = prompt.shared_prefix // runner.chunk * runner.chunk
        chain = runner.extend(chain, prompt.token_ids[:boundary])  # type: ignore[arg-type]
        started = time.perf_counter()
        state = runner.extend(copy_state(chain), prompt.token_ids[:-1])  # type: ignore[arg-type]
        encode_s = time.perf_counter() - started
        for method in methods:
            answer = runner.answer(method, state, prompt.token_ids)  # type: ignore[arg-type]
            ok = is_correct(answer, prompt.key)
            rows.append(
                {
                    "method": method,
                    "length": prompt.length,
                    "tokens": len(prompt.token_ids),
                    "depth": prompt.depth,
                    "key": prompt.key,
                    "answer": answer,
                    "correct": ok,
                    "encode_s": round(encode_s, 2),
                }
            )
            print(
                f"{method:12s} {len(prompt.token_ids):7d} tokens depth {prompt.depth:.2f}: "
                f"{'ok ' if ok else 'MISS'} {answer!r} (key {prompt.key})",
                flush=True,
            )
    return rows


# ---- report ---------------------------------------------------------------------------------------------------
def accuracy_grid(
    rows: list[dict[str, object]], method: str, lengths: Sequence[int], depths: Sequence[float]
) -> dict[tuple[int, float], float | None]:
    grid: dict[tuple[int, float], float | None] = {}
    for length in lengths:
        for depth in depths:
            cell = [r["correct"] for r in rows if (r["method"], r["length"], r["depth"]) == (method, length, depth)]
            grid[(length, depth)] = sum(map(bool, cell)) / len(cell) if cell else None
    return grid


def render_table(
    rows: list[dict[str, object]], lengths: Sequence[int], depths: Sequence[float], header: Sequence[str]
) -> str:
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    lines = [*header, "", "Accuracy over all depths:", ""]
    lines += ["| method | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for method in methods:
        grid = accuracy_grid(rows, method, lengths, depths)
        cells = []
        for length in lengths:
            values = [grid[(length, d)] for d in depths if grid[(length, d)] is not None]
            cells.append(f"{100 * sum(values) / len(values):.0f}%" if values else "–")  # type: ignore[arg-type]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for method in methods:
        grid = accuracy_grid(rows, method, lengths, depths)
        lines += ["", f"{method}, by depth (rows) and length (columns):", ""]
        lines += ["| depth | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
        for depth in depths:
            cells = ["–" if grid[(n, depth)] is None else f"{100 * grid[(n, depth)]:.0f}%" for n in lengths]  # type: ignore[operator]
            lines.append(f"| {depth:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, object]], lengths: Sequence[int], depths: Sequence[float], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return False
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 3.8), squeeze=False, sharey=True)
    for index, (ax, method) in enumerate(zip(axes[0], methods, strict=True)):
        grid = accuracy_grid(rows, method, lengths, depths)
        data = [[float("nan") if grid[(n, d)] is None else grid[(n, d)] for n in lengths] for d in depths]
        image = ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("prompt length")
        if index == 0:
            ax.set_ylabel("key depth")
        ax.set_title(method)
        for y, row in enumerate(data):
            for x, value in enumerate(row):
                ax.text(x, y, "–" if value != value else f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03)
    fig.suptitle("Passkey retrieval accuracy, SmolLM2-135M-Instruct")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench passkey", description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--vanilla-max", type=int, default=16384, help="longest prompt given to vanilla")
    parser.add_argument("--n-local", type=int, default=4096)
    parser.add_argument("--n-global", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--top-k-from-layer", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--model", default=None, help="model id or path (default: the embedded SmolLM2)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for passkey.md/.json/.png")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model, args.dtype)
    parts = PromptParts.of(tokenizer)
    config = LMInfiniteConfig(
        n_global=args.n_global, n_local=args.n_local, top_k=args.top_k, top_k_from_layer=args.top_k_from_layer,
        cache_mode="full",
    )
    started = time.time()
    rows: list[dict[str, object]] = []
    lambda_methods = [m for m in args.methods if m != "vanilla"]
    if "vanilla" in args.methods:
        short = [n for n in args.lengths if n <= args.vanilla_max]
        prompts = [make_prompt(parts, n, d, args.seed) for n in short for d in args.depths]
        rows += run_chain(VanillaRunner(model, tokenizer), ["vanilla"], prompts)
    if lambda_methods:
        prompts = [make_prompt(parts, n, d, args.seed) for n in args.lengths for d in args.depths]
        rows += run_chain(LambdaRunner(model, tokenizer, config), lambda_methods, prompts)
    elapsed = time.time() - started
    command = "python -m bench passkey " + " ".join(argv if argv is not None else [])
    header = [
        "# Passkey retrieval, SmolLM2-135M-Instruct" if args.model is None else f"# Passkey retrieval, {args.model}",
        "",
        f"{machine_line()}, {args.dtype}. Command: `{command.strip()}` ({elapsed / 60:.0f} min).",
        f"LM-Infinite: n_global={args.n_global}, n_local={args.n_local}; lambda+topk adds top_k={args.top_k} "
        f"from layer {args.top_k_from_layer}. vanilla: prompts up to {args.vanilla_max} tokens ('–': not run). "
        f"Seed {args.seed}, one key per cell, answers of {ANSWER_TOKENS} tokens, greedy.",
    ]
    table = render_table(rows, args.lengths, args.depths, header)
    print(table)
    results: Path = args.results
    write_result("passkey.md", table, results)
    write_result("passkey.json", json.dumps(rows, indent=1) + "\n", results)
    plot(rows, args.lengths, args.depths, results / "passkey.png")


if __name__ == "__main__":
    main()
