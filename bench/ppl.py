"""Perplexity by 2K-token position bucket: vanilla vs LM-Infinite (and Dual Chunk Attention with ``--dca``), on
any text (default: Python's ``pydoc_data.topics``).

For every bucket past the window we also score an *in-distribution baseline*: the vanilla model reading the
same bucket with only the preceding ``n_local`` tokens as context. LM-Infinite should track that baseline,
while vanilla with the full context blows up past its 8192-token training length. DCA (every key visible, at
remapped distances) is checked against the baseline of a whole training length of context.

    python -m bench ppl --tokens 32768 --n-local 4096 8192
    python -m bench ppl --tokens 65536 --n-local 4096 8192 --dca

Writes ``ppl.md`` and ``ppl.png`` to ``bench/results/`` (``--results DIR`` elsewhere).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel

from bench.common import (
    add_dtype,
    add_results,
    command_line,
    existing_file,
    int_at_least,
    length_label,
    machine_line,
    make_parser,
    non_negative_int,
    positive_int,
    token_ids,
    write_result,
)
from lminf_integrations import DCAConfig, LMInfiniteConfig, new_cache, patch_model, unpatch_model
from lminf_integrations.hf_compat import cache_kwargs
from lminf_integrations.models import load_model

BUCKET = 2048


@torch.inference_mode()
def token_nll(model: PreTrainedModel, ids: list[int], chunk: int, patched: bool) -> torch.Tensor:
    """Negative log-likelihood of ids[1:]; logits computed 512 positions at a time, never all at once.

    Vanilla reads the text in one forward (its fastest path: the fused causal kernel); a patched model (LM-Infinite
    or DCA) prefills ``chunk`` tokens at a time through its own cache, as the engine does.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if patched:
        cache = new_cache(model)
        hidden = torch.cat(
            [
                decoder(input_ids=torch.tensor([ids[s : s + chunk]]), **cache_kwargs(cache)).last_hidden_state[0]
                for s in range(0, len(ids), chunk)
            ]
        )
    else:
        hidden = decoder(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0]
    targets = torch.tensor(ids[1:])
    nll = []
    for s in range(0, len(targets), 512):
        logits = head(hidden[s : s + 512][: len(targets[s : s + 512])]).float()
        nll.append(torch.nn.functional.cross_entropy(logits, targets[s : s + 512], reduction="none"))
    return torch.cat(nll)


def bucket_ppl(nll: torch.Tensor, n_buckets: int) -> list[float]:
    # nll[i] scores token i+1: bucket b holds tokens [b*BUCKET, (b+1)*BUCKET).
    out = []
    for b in range(n_buckets):
        lo, hi = max(0, b * BUCKET - 1), (b + 1) * BUCKET - 1
        out.append(math.exp(nll[lo:hi].mean().item()))
    return out


def windowed_baseline(
    model: PreTrainedModel, ids: list[int], n_local: int, n_buckets: int, vanilla: list[float]
) -> list[float]:
    """Vanilla model on each bucket with only the preceding n_local tokens as context."""
    out = []
    for b in range(n_buckets):
        lo = b * BUCKET
        start = max(0, lo - n_local)
        if start == 0 and b < len(vanilla):  # the whole prefix fits: identical to the full-context run
            out.append(vanilla[b])
            continue
        nll = token_nll(model, ids[start : lo + BUCKET], chunk=4096, patched=False)
        out.append(math.exp(nll[lo - start - 1 if lo > 0 else 0 :].mean().item()))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("ppl", __doc__)
    # n_buckets = tokens // BUCKET: fewer tokens than one bucket would score nothing.
    at_least_a_bucket = int_at_least(BUCKET, f" (one perplexity bucket: n_buckets = tokens // {BUCKET})")
    parser.add_argument("--tokens", type=at_least_a_bucket, default=32768,
                        help=f"tokens of the text scored, in {BUCKET}-token buckets")  # fmt: skip
    parser.add_argument("--n-local", type=positive_int, nargs="+", default=[4096, 8192],
                        help="LM-Infinite windows to run, one column (and its baseline) each")  # fmt: skip
    parser.add_argument("--n-global", type=non_negative_int, default=10, help="LM-Infinite's global tokens")
    add_dtype(parser)
    parser.add_argument("--text", type=existing_file, default=None,
                        help="a UTF-8 text file (default: pydoc_data.topics)")  # fmt: skip
    parser.add_argument("--model", default=None, help="model id or path (default: the embedded SmolLM2)")
    add_results(parser, "ppl.md and ppl.png")
    parser.add_argument("--vanilla-max", type=positive_int, default=32768, help="longest input scored by vanilla")
    parser.add_argument("--dca", action="store_true", help="add Dual Chunk Attention, with DCAConfig's settings")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.command = command_line("ppl", argv)
    model, tokenizer = load_model(args.model, args.dtype)
    text = args.text.read_text(encoding="utf-8") if args.text else None
    ids = token_ids(tokenizer, args.tokens, text)
    n_buckets = args.tokens // BUCKET
    columns: dict[str, list[float]] = {}
    started = time.time()
    unpatch_model(model)
    vanilla_tokens = min(args.tokens, args.vanilla_max)
    vanilla = bucket_ppl(token_nll(model, ids[:vanilla_tokens], 2048, False), vanilla_tokens // BUCKET)
    columns["vanilla (full context)"] = vanilla + [math.nan] * (n_buckets - len(vanilla))
    print(f"vanilla done ({time.time() - started:.0f} s)", flush=True)
    for n_local in args.n_local:
        baseline = windowed_baseline(model, ids, n_local, n_buckets, vanilla)
        columns[f"vanilla, last {n_local} tokens only (baseline)"] = baseline
        print(f"baseline {n_local} done ({time.time() - started:.0f} s)", flush=True)
        patch_model(model, LMInfiniteConfig(n_global=args.n_global, n_local=n_local, chunk_size=2048))
        columns[f"LM-Infinite n_local={n_local}"] = bucket_ppl(token_nll(model, ids, 2048, True), n_buckets)
        unpatch_model(model)
        print(f"lminf {n_local} done ({time.time() - started:.0f} s)", flush=True)
    training_length = int(model.config.max_position_embeddings)
    if args.dca:
        full_window = f"vanilla, last {training_length} tokens only (baseline)"
        if full_window not in columns:
            columns[full_window] = windowed_baseline(model, ids, training_length, n_buckets, vanilla)
        chunk, local = DCAConfig().resolve(training_length)
        patch_model(model, DCAConfig())
        columns[dca_column(chunk, local)] = bucket_ppl(token_nll(model, ids, 2048, True), n_buckets)
        unpatch_model(model)
        print(f"dca done ({time.time() - started:.0f} s)", flush=True)
    write_tables(columns, n_buckets, args, training_length)


def dca_column(chunk: int, local: int) -> str:
    return f"DCA chunk={chunk} window={local}"


def write_tables(
    columns: dict[str, list[float]], n_buckets: int, args: argparse.Namespace, training_length: int
) -> None:
    names = list(columns)
    model = "SmolLM2-135M-Instruct" if args.model is None else str(args.model)
    text = "`pydoc_data.topics` (sorted topics)" if args.text is None else f"`{args.text.name}`"
    lines = [
        f"# Perplexity by position ({BUCKET}-token buckets), {model}, {args.dtype}",
        "",
        f"Text: {text}, first {args.tokens} tokens. n_global={args.n_global}. "
        f"{machine_line()}. Command: `{args.command}`",
        "",
        "| tokens | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for b in range(n_buckets):
        cells = [f"{columns[n][b]:.2f}" if not math.isnan(columns[n][b]) else "–" for n in names]
        # Bucket edges are multiples of 2048 tokens: whole K, so K labels are exact here (and "0K" reads as a range).
        lines.append(f"| {b * BUCKET // 1024}K–{(b + 1) * BUCKET // 1024}K | " + " | ".join(cells) + " |")
    past = length_label(training_length)
    lines += [
        "",
        f"Target check (buckets past the model's training length, {past}; patched ≤ 1.10 × baseline in every "
        "bucket, mean ≤ 1.05 ×):",
        "",
    ]
    first = -(-training_length // BUCKET)  # the first bucket wholly past the training length
    for n_local in args.n_local:
        lines.append(
            target_line(
                f"LM-Infinite n_local={n_local}",
                columns[f"LM-Infinite n_local={n_local}"][first:],
                columns[f"vanilla, last {n_local} tokens only (baseline)"][first:],
                past,
            )
        )
    for name in (n for n in names if n.startswith("DCA ")):
        base = columns[f"vanilla, last {training_length} tokens only (baseline)"][first:]
        label = f"{name} (baseline: last {training_length} tokens)"
        lines.append(target_line(label, columns[name][first:], base, past))
    table = "\n".join(lines) + "\n"
    print(table)
    write_result("ppl.md", table, args.results)
    plot(columns, n_buckets, args.results / "ppl.png", f"{model} on {text.replace('`', '')}", training_length)


def target_line(name: str, patched: list[float], base: list[float], past: str) -> str:
    """Worst per-bucket ratio and ratio of mean perplexities, patched over baseline."""
    if not patched:
        return f"- {name}: no buckets past {past}"
    worst = max(p / b for p, b in zip(patched, base, strict=True))
    mean_ratio = (sum(patched) / len(patched)) / (sum(base) / len(base))
    return f"- {name}: worst bucket ratio {worst:.3f}, mean ratio {mean_ratio:.3f}"


def plot(
    columns: dict[str, list[float]], n_buckets: int, path: Path, title: str, training_length: int = 8192
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    x = [(b + 1) * BUCKET / 1024 for b in range(n_buckets)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, values in columns.items():
        ax.plot(x, values, marker="o", markersize=3, label=name, linestyle="--" if "baseline" in name else "-")
    ax.set_yscale("log")
    ax.set_xlabel("position (K tokens, end of bucket)")
    ax.set_ylabel("perplexity (log scale)")
    ax.axvline(training_length / 1024, color="grey", linewidth=0.8)  # the model's training length
    ax.set_title(f"{title}: vanilla vs LM-Infinite" + (" vs DCA" if any(n.startswith("DCA") for n in columns) else ""),
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
