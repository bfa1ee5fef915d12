"""Passkey retrieval: a random 5-digit key hidden at a given depth in filler text, the model asked to repeat it.

    python -m bench passkey                                          # default grid (see --help), ~40 min here
    python -m bench passkey --lengths 4096 16384 --depths 0 0.5 1    # a quick look
    python -m bench passkey --methods xl3m --keys 5                  # XL3M, 5 keys per cell
    python -m bench passkey --methods dca lambda --lengths 8192 16384 --keys 3   # Dual Chunk Attention vs Λ

The task is the standard one (Mohtashami & Jaggi, 2023; used by the LM-Infinite paper): an instruction to find
and remember the key, then lines of irrelevant filler ("The grass is green. The sky is blue. ..."), with one
line "The pass key is 12345. Remember it. 12345 is the pass key." placed after ``depth`` × the filler, then
"What is the pass key? The pass key is" and greedy decoding. An answer counts when the key's five digits
appear as a number in the first 8 generated tokens.

Methods, all on the same prompts (the default runs the first three; ``--methods`` picks any):

* ``vanilla`` – the unpatched model with its ordinary cache (only up to ``--vanilla-max`` tokens: past its
  8K training length it fails, and its quadratic prefill makes longer prompts slow);
* ``lambda`` – LM-Infinite Λ-attention only (``top_k=0``);
* ``lambda+topk`` – Λ-attention plus top-k middle attention for the last prompt token and the answer;
* ``xl3m`` – ``Engine(strategy="xl3m")`` with the default ``XL3MConfig``, told that the question is the prompt's
  tokens after the filler (``QUESTION``): the unpatched model reads the prompt in segments, ranks them by where
  the question's attention falls, scores the best few by the question's likelihood after each, keeps the best
  ones within its context budget and answers from their best passages. Its *recall* is whether the key's sentence
  ("The pass key is 48213.", the key line's first) is whole in what the answer read (the kept passages; a prompt
  that fits the training length with the answer is read whole: recall by definition). The rest of the key line
  repeats it: a passage of one sentence may hold the key without it.
* ``dca`` – ``Engine(strategy="dca")`` with the default ``DCAConfig``: every key stays visible, at distances no
  larger than the training length (Dual Chunk Attention). Its cache keeps every key, so it shares the encode
  chain as Λ does; its prefill is quadratic like vanilla's, which bounds the lengths it can be run at here.

Prompts are built from token ids (the filler line is tokenized once), so lengths and key positions are exact.
``--keys K`` asks K different keys per (length, depth) cell: key ``k`` is drawn from
``random.Random(f"{seed}-{length}-{depth}-{k}")``, key 0 from ``random.Random(f"{seed}-{length}-{depth}")`` as
before ``--keys`` existed (a key equal to an earlier one of its cell is drawn again), so the same seed gives the
same prompts and ``--keys 1`` the earlier results. Each cell's accuracy is correct/asked, reported with its 95%
Wilson score interval (``bench.common.wilson``): with few keys per cell the intervals are wide.

Cost: every prompt shares its beginning (instruction + filler lines) with the others up to its key, so
prefixes are encoded once along one chain and each prompt encodes only its key and what follows. Top-k only
changes the queries from the last prompt token on, so ``lambda`` and ``lambda+topk`` share every encoded prefix
too. Encoding runs in absolute chunk-aligned steps, and sharing stops at a chunk boundary, so each prompt goes
through exactly the computation of encoding it from scratch. ``xl3m`` runs every prompt on its own through its own
engine (no encode chain); its engine keeps the segments it has read by their tokens, so filler segments that
recur within and across prompts are read once.

Writes ``passkey.md``, ``passkey.json`` (the command, the machine and every answer) and ``passkey.png`` (accuracy
heatmaps) to ``bench/results/`` (``--results DIR`` elsewhere).
"""

from __future__ import annotations

import argparse
import copy
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from bench.common import (
    add_dtype,
    add_results,
    command_line,
    fraction,
    length_label,
    machine_line,
    make_parser,
    non_negative_int,
    positive_int,
    rate,
    results_payload,
    write_json,
    write_result,
)
from lminf_integrations import LMInfiniteConfig, unpatch_model
from lminf_integrations.config import DCAConfig, XL3MConfig
from lminf_integrations.engine import DocumentState, Engine, GenerationSettings
from lminf_integrations.hf_compat import cache_kwargs
from lminf_integrations.model_thread import on_model_thread
from lminf_integrations.models import load_model
from lminf_integrations.strategies.xl3m.strategy import CONTEXT_SHARE

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_SENTENCE = " The pass key is {key}."  # what a reader needs of the key line
KEY_LINE = KEY_SENTENCE + " Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 8
METHODS = ("vanilla", "lambda", "lambda+topk", "xl3m", "dca")
CHAIN_METHODS = ("lambda", "lambda+topk")  # share one encode chain (LambdaRunner)


@dataclass(frozen=True)
class PasskeyPrompt:
    length: int  # the requested length; len(token_ids) is within one filler line of it
    depth: float  # requested depth in [0, 1]
    key: str
    token_ids: list[int]
    key_start: int  # token index where the key line starts
    shared_prefix: int  # tokens before the key line (instruction + filler lines), shared with other prompts
    key_index: int = 0  # which of the cell's keys (--keys)
    question_tokens: int = 0  # the closing question's tokens (QUESTION), the prompt's last ones
    key_tokens: int = 0  # the key sentence's tokens (KEY_SENTENCE, or the whole key line), from key_start on

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

    def key_sentence_tokens(self, key: str) -> int:
        """How many of the key line's first tokens are its first sentence (the whole line, should a tokenizer join
        that sentence's last token with the next)."""
        line = self.key_line(key)
        sentence = list(self.tokenizer(KEY_SENTENCE.format(key=key), add_special_tokens=False)["input_ids"])
        return len(sentence) if line[: len(sentence)] == sentence else len(line)


def draw_key(seed: int, length: int, depth: float, index: int = 0) -> str:
    """Key ``index`` of the cell (length, depth): seeded, and different from the cell's keys before it."""
    if index < 0:
        raise ValueError(f"key index must be >= 0, got {index}")
    keys: list[str] = []
    for k in range(index + 1):
        name = f"{seed}-{length}-{depth}" if k == 0 else f"{seed}-{length}-{depth}-{k}"
        key, attempt = str(random.Random(name).randint(10000, 99999)), 0
        while key in keys:  # a repeat (about 1 in 90000 per pair): draw again, still deterministically
            attempt += 1
            key = str(random.Random(f"{name}-again-{attempt}").randint(10000, 99999))
        keys.append(key)
    return keys[index]


def make_prompt(parts: PromptParts, length: int, depth: float, seed: int, key_index: int = 0) -> PasskeyPrompt:
    """A prompt of about ``length`` tokens with the key line after ``round(depth × filler lines)`` lines."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = draw_key(seed, length, depth, key_index)
    key_ids = parts.key_line(key)
    fixed = len(parts.instruction) + len(key_ids) + len(parts.question)
    n_lines = (length - fixed) // len(parts.filler)
    if n_lines < 1:
        raise ValueError(f"length {length} is too short for a passkey prompt (needs > {fixed} tokens)")
    before = round(depth * n_lines)
    prefix = parts.instruction + parts.filler * before
    ids = prefix + key_ids + parts.filler * (n_lines - before) + parts.question
    return PasskeyPrompt(
        length, depth, key, ids, len(prefix), len(prefix), key_index, len(parts.question),
        parts.key_sentence_tokens(key),
    )  # fmt: skip


def make_prompts(
    parts: PromptParts, lengths: Sequence[int], depths: Sequence[float], seed: int, keys: int = 1
) -> list[PasskeyPrompt]:
    """``keys`` prompts per (length, depth) cell, in grid order."""
    if keys < 1:
        raise ValueError(f"keys must be >= 1, got {keys}")
    return [make_prompt(parts, n, d, seed, k) for n in lengths for d in depths for k in range(keys)]


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


class DCARunner:
    """Dual Chunk Attention (default ``DCAConfig``): an encode chain like :class:`LambdaRunner`'s (its cache keeps
    every key, so a copied prefix state continues exactly)."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: DCAConfig | None = None,
        chunk: int = LMInfiniteConfig().chunk_size,
    ) -> None:  # fmt: skip
        # The engine's prefill step (``chunk``) is an engine setting, kept in its LMInfiniteConfig for every strategy.
        self.engine = Engine(
            model=model, tokenizer=tokenizer, config=LMInfiniteConfig(chunk_size=chunk), strategy="dca", dca=config,
            reuse_prefixes=False,
        )
        self.chunk = chunk

    def empty(self) -> DocumentState:
        return self.engine.encode([])

    def extend(self, state: DocumentState, ids: Sequence[int]) -> DocumentState:
        return self.engine.encode(list(ids), state=state)

    def answer(self, method: str, state: DocumentState, ids: list[int]) -> str:
        settings = GenerationSettings(max_new_tokens=ANSWER_TOKENS)
        return "".join(self.engine.stream(ids, settings, state=state))


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

    @on_model_thread
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

    @on_model_thread
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
    runner: LambdaRunner | DCARunner | VanillaRunner, methods: Sequence[str], prompts: list[PasskeyPrompt]
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
                    "key_index": prompt.key_index,
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


class XL3MRunner:
    """``Engine(strategy="xl3m")`` with the default settings, each prompt on its own (no encode chain)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: XL3MConfig | None = None):
        self.config = config or XL3MConfig()
        self.engine = Engine(model=model, tokenizer=tokenizer, strategy="xl3m", xl3m=self.config, reuse_prefixes=False)

    def answer(self, prompt: PasskeyPrompt) -> tuple[str, dict[str, Any] | None]:
        """The answer, and the strategy's selection (``None``: the prompt fitted and was read whole)."""
        settings = GenerationSettings(max_new_tokens=ANSWER_TOKENS)
        with self.engine.stream(prompt.token_ids, settings, question_tokens=prompt.question_tokens) as stream:
            answer = "".join(stream)
        details = stream.result.details if stream.result is not None else None
        return answer, (details or {}).get("xl3m")


def answered_from(selection: dict[str, Any]) -> list[dict[str, Any]]:
    """The spans XL3M's answer read: the kept passages and a hop's, or the chosen segments whole
    (``passage_tokens=None``)."""
    return list(selection["read"])


def key_chosen(prompt: PasskeyPrompt, selection: dict[str, Any] | None) -> bool:
    """XL3M's recall: the key's sentence, from its first token to its last, is in what the answer read (a prompt
    read whole holds it by definition)."""
    if selection is None:
        return True
    end = prompt.key_start + max(prompt.key_tokens, 1)
    kept = answered_from(selection)
    return all(any(c["start"] <= t < c["end"] for c in kept) for t in range(prompt.key_start, end))


def run_xl3m(runner: XL3MRunner, prompts: list[PasskeyPrompt]) -> list[dict[str, object]]:
    """Answer every prompt with XL3M, in the order given (grid order: prompts of one cell share their filler)."""
    rows: list[dict[str, object]] = []
    for prompt in prompts:
        started = time.perf_counter()
        answer, selection = runner.answer(prompt)
        seconds = time.perf_counter() - started
        ok, recall = is_correct(answer, prompt.key), key_chosen(prompt, selection)
        rows.append(
            {
                "method": "xl3m",
                "length": prompt.length,
                "tokens": len(prompt.token_ids),
                "depth": prompt.depth,
                "key_index": prompt.key_index,
                "key": prompt.key,
                "answer": answer,
                "correct": ok,
                "key_chosen": recall,
                "key_start": prompt.key_start,
                "read_whole": selection is None,
                "segments": None if selection is None else selection["segments"],
                "chosen": None if selection is None else selection["chosen"],
                "passages": None if selection is None else selection.get("passages"),
                "seconds": round(seconds, 2),
            }
        )
        chosen = "read whole" if selection is None else f"{len(selection['chosen'])}/{selection['segments']} segments"
        print(
            f"{'xl3m':12s} {len(prompt.token_ids):7d} tokens depth {prompt.depth:.2f}: "
            f"{'ok ' if ok else 'MISS'} {answer!r} (key {prompt.key}; {chosen}, key sentence "
            f"{'read' if recall else 'NOT read'}; {seconds:.1f} s)",
            flush=True,
        )
    return rows


# ---- report ---------------------------------------------------------------------------------------------------
def _cell(
    rows: list[dict[str, object]], method: str, length: int, depths: Sequence[float], field: str = "correct"
) -> tuple[int, int]:
    """(yes, asked) over the rows of ``method`` at ``length`` and any of ``depths`` that have ``field``."""
    values = [
        r[field] for r in rows if r["method"] == method and r["length"] == length and r["depth"] in depths
        and r.get(field) is not None
    ]  # fmt: skip
    return sum(map(bool, values)), len(values)


def accuracy_grid(
    rows: list[dict[str, object]], method: str, lengths: Sequence[int], depths: Sequence[float]
) -> dict[tuple[int, float], float | None]:
    """correct/asked per (length, depth) cell; ``None`` where the method was not run."""
    grid: dict[tuple[int, float], float | None] = {}
    for length in lengths:
        for depth in depths:
            k, n = _cell(rows, method, length, [depth])
            grid[(length, depth)] = k / n if n else None
    return grid


def render_table(
    rows: list[dict[str, object]], lengths: Sequence[int], depths: Sequence[float], header: Sequence[str]
) -> str:
    """Accuracy (and XL3M's recall) as ``correct/asked (95% Wilson interval)``, over all depths and by depth."""
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    columns = ["| " + " | ".join(map(length_label, lengths)) + " |", "|---|" + "---|" * len(lengths)]
    # (label, method, row field) of every line shown: each method's accuracy, and XL3M's recall after it.
    shown = [(m, m, "correct") for m in methods]
    if "xl3m" in methods:
        shown.append(("xl3m recall (key sentence read)", "xl3m", "key_chosen"))
    lines = [*header, "", "Accuracy over all depths (correct/asked, 95% Wilson interval; '–': not run):", ""]
    lines += ["| method " + columns[0], columns[1]]
    for label, method, column in shown:
        cells = [rate(*_cell(rows, method, n, depths, column)) for n in lengths]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, method, column in shown:
        lines += ["", f"{label}, by depth (rows) and length (columns):", ""]
        lines += ["| depth " + columns[0], columns[1]]
        for depth in depths:
            cells = [rate(*_cell(rows, method, n, [depth], column)) for n in lengths]
            lines.append(f"| {depth:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(
    rows: list[dict[str, object]], lengths: Sequence[int], depths: Sequence[float], path: Path,
    model: str = "SmolLM2-135M-Instruct",
) -> bool:  # fmt: skip
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
        data = [[float("nan") if (v := grid[(n, d)]) is None else v for n in lengths] for d in depths]
        image = ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("prompt length")
        if index == 0:
            ax.set_ylabel("key depth")
        ax.set_title(method)
        for y, row in enumerate(data):
            for x, value in enumerate(row):
                ax.text(x, y, "–" if value != value else f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03)
    fig.suptitle(f"Passkey retrieval accuracy, {model}")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return True


def xl3m_details(xl3m: XL3MConfig, training: int, question_tokens: int) -> str:
    """The results' line on the XL3M settings that ran, for a model trained to ``training`` tokens."""
    budget = f"{training // CONTEXT_SHARE if xl3m.context_tokens is None else xl3m.context_tokens} tokens"
    gate = ""
    if xl3m.hop_confidence is not None:
        gate = f", tried only when one of the answer's first new tokens is less likely than {xl3m.hop_confidence}"
    return (
        f"xl3m: default XL3MConfig (segments of at most {xl3m.segment_tokens} tokens, the {xl3m.candidates} best "
        f"of a first attention pass scored by {xl3m.score}, context up to {budget}, answered from their "
        f"passages, a sentence each of up to {xl3m.passage_tokens} tokens, within {xl3m.passage_margin} of the "
        f"best, one hop when it leads by {xl3m.hop_margin}{gate}); question = the prompt's last {question_tokens} "
        "tokens; recall = the key's sentence is whole in what the answer read (a prompt within the training length "
        "is read whole)."
    )


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("passkey", __doc__)
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[4096, 8192, 16384, 32768, 65536],
                        help="prompt lengths in tokens")  # fmt: skip
    parser.add_argument("--depths", type=fraction, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="where the key line sits, as a fraction of the filler (0: first, 1: last)")  # fmt: skip
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS[:3]),
                        help="methods to run (xl3m and dca on request)")  # fmt: skip
    parser.add_argument("--keys", type=positive_int, default=1, help="different keys per (length, depth) cell")
    parser.add_argument("--vanilla-max", type=positive_int, default=16384, help="longest prompt given to vanilla")
    parser.add_argument("--n-local", type=positive_int, default=4096, help="LM-Infinite's window")
    parser.add_argument("--n-global", type=non_negative_int, default=10, help="LM-Infinite's global tokens")
    parser.add_argument("--top-k", type=non_negative_int, default=5, help="lambda+topk's middle keys per query")
    parser.add_argument("--top-k-from-layer", type=non_negative_int, default=8,
                        help="lambda+topk's first layer with top-k")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the keys")
    add_dtype(parser)
    parser.add_argument("--model", default=None, help="model id or path (default: the embedded SmolLM2)")
    add_results(parser, "passkey.md, passkey.json and passkey.png")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    command = command_line("passkey", argv)
    model, tokenizer = load_model(args.model, args.dtype)
    parts = PromptParts.of(tokenizer)
    started = time.time()
    rows: list[dict[str, object]] = []
    chain_methods = [m for m in args.methods if m in CHAIN_METHODS]
    if "vanilla" in args.methods:
        short = [n for n in args.lengths if n <= args.vanilla_max]
        prompts = make_prompts(parts, short, args.depths, args.seed, args.keys)
        rows += run_chain(VanillaRunner(model, tokenizer), ["vanilla"], prompts)
    if chain_methods:
        config = LMInfiniteConfig(
            n_global=args.n_global, n_local=args.n_local, top_k=args.top_k, top_k_from_layer=args.top_k_from_layer,
            cache_mode="full",
        )
        prompts = make_prompts(parts, args.lengths, args.depths, args.seed, args.keys)
        rows += run_chain(LambdaRunner(model, tokenizer, config), chain_methods, prompts)
    xl3m = XL3MConfig()
    if "xl3m" in args.methods:
        prompts = make_prompts(parts, args.lengths, args.depths, args.seed, args.keys)
        rows += run_xl3m(XL3MRunner(model, tokenizer, xl3m), prompts)
    if "dca" in args.methods:
        prompts = make_prompts(parts, args.lengths, args.depths, args.seed, args.keys)
        rows += run_chain(DCARunner(model, tokenizer), ["dca"], prompts)
    elapsed = time.time() - started
    details = [f"Seed {args.seed}, {args.keys} key{'s' if args.keys > 1 else ''} per (length, depth) cell, "
               f"answers of {ANSWER_TOKENS} tokens, greedy."]  # fmt: skip
    if chain_methods:
        details.append(
            f"LM-Infinite: n_global={args.n_global}, n_local={args.n_local}"
            + (f"; lambda+topk adds top_k={args.top_k} from layer {args.top_k_from_layer}." if "lambda+topk"
               in args.methods else ".")
        )  # fmt: skip
    if "vanilla" in args.methods:
        details.append(f"vanilla: prompts up to {args.vanilla_max} tokens ('–': not run).")
    if "xl3m" in args.methods:
        details.append(xl3m_details(xl3m, int(model.config.max_position_embeddings), len(parts.question)))
    if "dca" in args.methods:
        chunk, local = DCAConfig().resolve(int(model.config.max_position_embeddings))
        details.append(f"dca: default DCAConfig (chunk_size={chunk}, local_window={local}).")
    model_label = "SmolLM2-135M-Instruct" if args.model is None else str(args.model)
    header = [
        f"# Passkey retrieval, {model_label}",
        "",
        f"{machine_line()}, {args.dtype}. Command: `{command}` ({_minutes(elapsed)}).",
        " ".join(details),
    ]
    print(write_outputs(args.results, rows, args.lengths, args.depths, command, model_label, header))


def write_outputs(
    results: Path, rows: list[dict[str, object]], lengths: Sequence[int], depths: Sequence[float], command: str,
    model: str, header: Sequence[str],
) -> str:  # fmt: skip
    """``passkey.md`` (returned), ``passkey.json`` (the command, the machine, the model and every row) and the plot."""
    table = render_table(rows, lengths, depths, header)
    write_result("passkey.md", table, results)
    write_json("passkey.json", results_payload(command, model=model, rows=rows), results)
    plot(rows, lengths, depths, results / "passkey.png", model)
    return table


if __name__ == "__main__":
    main()
