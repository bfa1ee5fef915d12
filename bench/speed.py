"""Prefill and decode speed, and memory, vanilla vs LM-Infinite vs Dual Chunk Attention, same machine, same text,
same dtype.

Each measurement runs in fresh subprocesses: one for timings, one for peak memory (see ``MEMORY_ENV``).

    python -m bench speed                       # full grid (tens of minutes on 2 cores)
    python -m bench speed --vanilla 8192 --patched 8192 --decode-steps 8   # quick look
    python -m bench speed --vanilla 32768 --patched --dca 32768             # DCA against vanilla at 32K

Writes ``speed.md``, ``speed.json`` (the command, the machine and the rows; ``null`` where a value was not measured)
and ``speed.png`` to ``bench/results/`` (``--results DIR`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    add_dtype,
    add_results,
    command_line,
    finite_or_none,
    length_label,
    make_parser,
    positive_int,
)
from lminf_integrations.config import DCAConfig, LMInfiniteConfig

HERE = Path(__file__).resolve().parent
MODES = ("vanilla", "lminf", "dca")
Row = dict[str, float | None]  # None: not measured (no separate memory run)


def measure(mode: str, n_tokens: int, dtype: str, n_local: int, cache: str, decode_steps: int) -> Row:
    """One measurement in this process: prefill n_tokens, then decode_steps single-token steps.

    ``mode``: ``vanilla`` (transformers' SDPA and DynamicCache), ``lminf`` (Λ-attention and its cache) or ``dca``
    (Dual Chunk Attention, default ``DCAConfig``, and its cache). Both patched modes prefill 2048 tokens per forward,
    as the engine does.
    """
    import torch
    from transformers import DynamicCache

    from bench.common import peak_rss, token_ids
    from lminf_integrations import new_cache, patch_model
    from lminf_integrations.hf_compat import cache_kwargs
    from lminf_integrations.models import load_model

    model, tokenizer = load_model(None, dtype)
    ids = token_ids(tokenizer, n_tokens)
    decoder = model.get_decoder()
    with torch.inference_mode():
        if mode == "vanilla":
            kv = DynamicCache(config=model.config)
            warm = DynamicCache(config=model.config)
        elif mode == "dca":
            patch_model(model, DCAConfig())
            kv, warm = new_cache(model), new_cache(model)
        else:
            patch_model(model, LMInfiniteConfig(n_local=n_local, cache_mode=cache, chunk_size=2048))  # type: ignore[arg-type]
            kv, warm = new_cache(model), new_cache(model)
        decoder(input_ids=torch.tensor([ids[:256]]), **cache_kwargs(warm))  # warm-up (kernels, allocator)
        del warm
        with peak_rss() as memory:
            started = time.perf_counter()
            if mode == "vanilla":
                # Vanilla's fastest prefill: one forward, the fused causal kernel, no logits.
                decoder(input_ids=torch.tensor([ids]), **cache_kwargs(kv))
            else:
                for s in range(0, n_tokens, 2048):
                    decoder(input_ids=torch.tensor([ids[s : s + 2048]]), **cache_kwargs(kv))
            prefill_s = time.perf_counter() - started
            token = torch.tensor([[ids[-1]]])
            model(input_ids=token, **cache_kwargs(kv))  # first step outside the timing (allocations)
            started = time.perf_counter()
            for _ in range(decode_steps):
                logits = model(input_ids=token, **cache_kwargs(kv), logits_to_keep=1).logits
                token = logits[:, -1:].argmax(-1)
            decode_s = time.perf_counter() - started
    settings = DCAConfig().resolve(model.config.max_position_embeddings) if mode == "dca" else (0, 0)
    return {
        "chunk_size": settings[0],
        "local_window": settings[1],
        "prefill_tok_s": n_tokens / prefill_s,
        "prefill_s": prefill_s,
        "decode_tok_s": decode_steps / decode_s,
        "peak_gib": memory["peak_gib"],
    }


# glibc keeps freed heap memory and raises its mmap threshold as big blocks come and go, so a process's RSS rise
# depends on its allocation history (the same window-cache run read 0.13-0.20 GiB). With a fixed, low threshold
# every large tensor is mapped on allocation and unmapped on free: RSS then follows live tensors (repeat runs
# agree to 0.001 GiB). It also halves speed, so memory gets its own run.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
MEMORY_DECODE_STEPS = 4


def run_one(args: argparse.Namespace, mode: str, n_tokens: int) -> Row | None:
    """Timings from one fresh subprocess, memory from another (see ``MEMORY_ENV``)."""
    timing = _subprocess_row(args, mode, n_tokens, args.decode_steps, {})
    if timing is not None and not args.memory:  # timings only: the memory run takes twice as long again
        row = {**timing, "peak_gib": None, "peak_gib_default_malloc": timing["peak_gib"]}
        print(f"{mode:8s} {n_tokens:7d}: {row}", flush=True)
        return row
    memory = _subprocess_row(args, mode, n_tokens, MEMORY_DECODE_STEPS, MEMORY_ENV) if timing else None
    if timing is None or memory is None:
        return None
    row = {**timing, "peak_gib": memory["peak_gib"], "peak_gib_default_malloc": timing["peak_gib"]}
    print(f"{mode:8s} {n_tokens:7d}: {row}", flush=True)
    return row


def _subprocess_row(
    args: argparse.Namespace, mode: str, n_tokens: int, decode_steps: int, env: dict[str, str]
) -> Row | None:
    command = [
        sys.executable, "-m", "bench", "speed", "--one", mode, str(n_tokens), "--dtype", args.dtype,
        "--n-local", str(args.n_local), "--cache-mode", args.cache_mode, "--decode-steps", str(decode_steps),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent, env={**os.environ, **env})
    if result.returncode != 0:
        print(f"{mode} {n_tokens}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    row: Row = json.loads(result.stdout.strip().splitlines()[-1])
    return row


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("speed", __doc__)
    parser.add_argument("--vanilla", type=positive_int, nargs="*", default=[4096, 8192, 16384, 32768],
                        help="contexts for vanilla (none: no vanilla rows)")  # fmt: skip
    parser.add_argument("--patched", type=positive_int, nargs="*", default=[4096, 8192, 16384, 32768, 65536, 131072],
                        help="contexts for LM-Infinite")  # fmt: skip
    parser.add_argument("--dca", type=positive_int, nargs="*", default=[], help="contexts for Dual Chunk Attention")
    add_dtype(parser)
    parser.add_argument("--n-local", type=positive_int, default=4096, help="LM-Infinite's window")
    parser.add_argument("--cache-mode", default="window", choices=["window", "full"], help="LM-Infinite's cache")
    parser.add_argument("--decode-steps", type=positive_int, default=32, help="decoding steps timed per row")
    parser.add_argument(
        "--memory", action=argparse.BooleanOptionalAction, default=True, help="the separate memory run"
    )
    add_results(parser, "speed.md, speed.json and speed.png")
    parser.add_argument(
        "--one", nargs=2, metavar=("MODE", "TOKENS"), default=None,
        help=f"one measurement in this process, printed as a JSON line, nothing written: MODE ({', '.join(MODES)}) "
        "at TOKENS tokens, with --dtype, --n-local, --cache-mode and --decode-steps (each row runs this in fresh "
        "subprocesses; default: the whole grid)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.one:
        mode, tokens = args.one
        if mode not in MODES:
            parser.error(f"argument --one: MODE must be one of {', '.join(MODES)}, got {mode!r}")
        try:
            n_tokens = positive_int(tokens)
        except argparse.ArgumentTypeError as error:
            parser.error(f"argument --one: TOKENS {error}")
        print(json.dumps(measure(mode, n_tokens, args.dtype, args.n_local, args.cache_mode, args.decode_steps),
                         allow_nan=False))  # fmt: skip
        return
    rows: dict[tuple[str, int], Row] = {}
    for mode, sizes in (("vanilla", args.vanilla), ("lminf", args.patched), ("dca", args.dca)):
        for n in sizes:
            row = run_one(args, mode, n)
            if row:
                rows[(mode, n)] = row
    write_report(rows, args, command_line("speed", argv))


LABELS = {"vanilla": "vanilla", "lminf": "LM-Inf", "dca": "DCA"}


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def write_report(rows: dict[tuple[str, int], Row], args: argparse.Namespace, command: str) -> None:
    from bench.common import machine_line, results_payload, write_json, write_result

    sizes = sorted({n for _, n in rows})
    modes = [m for m in LABELS if any(mode == m for mode, _ in rows)]
    patched = [m for m in modes if m != "vanilla"]
    dca_rows = [r for (m, _), r in rows.items() if m == "dca"]
    dca_line = ""
    if dca_rows:
        chunk, local = dca_rows[0]["chunk_size"] or 0, dca_rows[0]["local_window"] or 0
        dca_line = f"DCA: chunk_size={chunk:.0f}, local_window={local:.0f} (the defaults), prefill chunk 2048, its own "
        dca_line += "cache. "
    header = ["context"]
    for what in ("prefill tok/s", "decode tok/s"):
        header += [f"{LABELS[m]} {what}" for m in modes]
        header += [f"{LABELS[m]} speed-up" for m in patched if "vanilla" in modes]
    header += [f"{LABELS[m]} mem GiB" for m in modes]
    head = (
        f"# Prefill and decode speed, SmolLM2-135M-Instruct, {args.dtype}\n\n"
        f"LM-Infinite: n_local={args.n_local}, n_global={LMInfiniteConfig().n_global}, cache_mode={args.cache_mode}, "
        f"prefill chunk 2048. {dca_line}Vanilla: "
        "transformers SDPA, one forward, DynamicCache. Text: pydoc_data.topics. "
        + (
            f"Memory: peak RSS rise during prefill + {MEMORY_DECODE_STEPS} decode steps (beyond the weights), in a "
            "separate run with MALLOC_MMAP_THRESHOLD_=65536 so that RSS follows live tensors. "
            if args.memory
            else "Memory not measured (--no-memory). "
        )
        + 
        f"{machine_line()}.\n"
        f"Command: `{command}`\n\n"
        "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    )
    lines = []
    for n in sizes:
        cells = [length_label(n)]
        for key, fmt in (("prefill_tok_s", "{:.0f}"), ("decode_tok_s", "{:.1f}")):
            cells += [_cell(rows[(m, n)][key], fmt) if (m, n) in rows else "–" for m in modes]
            if "vanilla" in modes:
                base = rows.get(("vanilla", n), {}).get(key)
                for m in patched:
                    value = rows[(m, n)][key] if (m, n) in rows else None
                    cells.append(f"{value / base:.2f}×" if value is not None and base else "–")
        cells += [_cell(rows[(m, n)]["peak_gib"], "{:.2f}") if (m, n) in rows else "–" for m in modes]
        lines.append("| " + " | ".join(cells) + " |")
    text = head + "\n".join(lines) + "\n"
    print(text)
    write_result("speed.md", text, args.results)
    json_rows = [{"mode": m, "tokens": n, **{k: finite_or_none(v) for k, v in r.items()}} for (m, n), r in rows.items()]
    write_json("speed.json", results_payload(command, rows=json_rows), args.results)
    plot(rows, args.results / "speed.png")


def plot(rows: dict[tuple[str, int], Row], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode, label in (("vanilla", "vanilla"), ("lminf", "LM-Infinite"), ("dca", "Dual Chunk Attention")):
        points = sorted((n, r) for (m, n), r in rows.items() if m == mode)
        if not points:
            continue
        xs = [n / 1024 for n, _ in points]
        axes[0].plot(xs, [r["prefill_tok_s"] for _, r in points], marker="o", label=label)
        axes[1].plot(xs, [r["decode_tok_s"] for _, r in points], marker="o", label=label)
    for ax, title in zip(axes, ("prefill tokens/s", "decode tokens/s"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (K tokens)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
