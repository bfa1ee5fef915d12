"""Prefill and decode speed, and memory, vanilla vs LM-Infinite vs Dual Chunk Attention, same machine, same text,
same dtype.

Each measurement runs in fresh subprocesses: one for timings, one for peak memory (see ``MEMORY_ENV``).

    python -m bench speed                       # full grid (tens of minutes on 2 cores)
    python -m bench speed --vanilla 8192 --patched 8192 --decode-steps 8   # quick look
    python -m bench speed --vanilla 32768 --patched --dca 32768             # DCA against vanilla at 32K

Writes ``bench/results/speed.md`` and ``bench/results/speed.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from lminf_integrations.config import DCAConfig, LMInfiniteConfig

HERE = Path(__file__).resolve().parent


def measure(mode: str, n_tokens: int, dtype: str, n_local: int, cache: str, decode_steps: int) -> dict[str, float]:
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


def run_one(args: argparse.Namespace, mode: str, n_tokens: int) -> dict[str, float] | None:
    """Timings from one fresh subprocess, memory from another (see ``MEMORY_ENV``)."""
    timing = _subprocess_row(args, mode, n_tokens, args.decode_steps, {})
    if timing is not None and not args.memory:  # timings only: the memory run takes twice as long again
        row = {**timing, "peak_gib": math.nan, "peak_gib_default_malloc": timing["peak_gib"]}
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
) -> dict[str, float] | None:
    command = [
        sys.executable, "-m", "bench", "speed", "--one", mode, str(n_tokens), "--dtype", args.dtype,
        "--n-local", str(args.n_local), "--cache-mode", args.cache_mode, "--decode-steps", str(decode_steps),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent, env={**os.environ, **env})
    if result.returncode != 0:
        print(f"{mode} {n_tokens}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    row: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench speed", description=__doc__.splitlines()[0])
    parser.add_argument("--vanilla", type=int, nargs="*", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--patched", type=int, nargs="*", default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--dca", type=int, nargs="*", default=[], help="contexts for Dual Chunk Attention")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--n-local", type=int, default=4096)
    parser.add_argument("--cache-mode", default="window", choices=["window", "full"])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument(
        "--memory", action=argparse.BooleanOptionalAction, default=True, help="the separate memory run (default: on)"
    )
    parser.add_argument("--results", type=Path, default=HERE / "results", help="folder for speed.md/.json/.png")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        row = measure(args.one[0], int(args.one[1]), args.dtype, args.n_local, args.cache_mode, args.decode_steps)
        print(json.dumps(row))
        return
    rows: dict[tuple[str, int], dict[str, float]] = {}
    for mode, sizes in (("vanilla", args.vanilla), ("lminf", args.patched), ("dca", args.dca)):
        for n in sizes:
            row = run_one(args, mode, n)
            if row:
                rows[(mode, n)] = row
    write_report(rows, args)


LABELS = {"vanilla": "vanilla", "lminf": "LM-Inf", "dca": "DCA"}


def write_report(rows: dict[tuple[str, int], dict[str, float]], args: argparse.Namespace) -> None:
    from bench.common import machine_line, write_result

    sizes = sorted({n for _, n in rows})
    modes = [m for m in LABELS if any(mode == m for mode, _ in rows)]
    patched = [m for m in modes if m != "vanilla"]
    dca_rows = [r for (m, _), r in rows.items() if m == "dca"]
    dca_line = (
        f"DCA: chunk_size={dca_rows[0]['chunk_size']:.0f}, local_window={dca_rows[0]['local_window']:.0f} (the "
        "defaults), prefill chunk 2048, its own cache. "
        if dca_rows
        else ""
    )
    dca_option = f" --dca {' '.join(map(str, args.dca))}" if args.dca else ""
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
        f"Command: `python -m bench speed --vanilla {' '.join(map(str, args.vanilla))} --patched "
        f"{' '.join(map(str, args.patched))}{dca_option} --dtype {args.dtype} --decode-steps {args.decode_steps}"
        f"{'' if args.memory else ' --no-memory'}"
        f"{'' if args.results == HERE / 'results' else ' --results ' + str(args.results)}`\n\n"
        "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    )
    lines = []
    for n in sizes:
        cells = [f"{n // 1024}K"]
        for key, fmt in (("prefill_tok_s", "{:.0f}"), ("decode_tok_s", "{:.1f}")):
            cells += [fmt.format(rows[(m, n)][key]) if (m, n) in rows else "–" for m in modes]
            if "vanilla" in modes:
                base = rows.get(("vanilla", n))
                cells += [
                    f"{rows[(m, n)][key] / base[key]:.2f}×" if base and (m, n) in rows else "–" for m in patched
                ]
        cells += [
            f"{rows[(m, n)]['peak_gib']:.2f}" if (m, n) in rows and not math.isnan(rows[(m, n)]["peak_gib"]) else "–"
            for m in modes
        ]
        lines.append("| " + " | ".join(cells) + " |")
    text = head + "\n".join(lines) + "\n"
    print(text)
    write_result("speed.md", text, args.results)
    (args.results / "speed.json").write_text(
        json.dumps({f"{m}-{n}": r for (m, n), r in rows.items()}, indent=1), encoding="utf-8"
    )
    plot(rows, args.results / "speed.png")


def plot(rows: dict[tuple[str, int], dict[str, float]], path: Path) -> None:
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
