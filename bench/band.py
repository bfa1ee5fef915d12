"""The Λ band's kernel time by layout and query-block size: the measurement behind ``attention``'s band layout.

    python -m bench band                       # SmolLM2's head shapes, 2048-query chunk, 4K window
    python -m bench band --dtype fp32 --window 8192

One layer's band attention for one prefill chunk (queries whose window is full), random tensors with the default
model's head layout (9 query heads, 3 key/value heads, head size 64, queries in the (token, head) memory layout the
model hands over), each layout timed with the merge of its partial attentions into the output:

* the layout the attention uses for such chunks: one unmasked call over the keys every query sees (the *core*),
  plus a narrower blockwise band over the rest, for each block size;
* the blockwise band over the whole window (every block's keys cut from the window), for each block size;
* the same kernel with no mask over exactly ``window`` keys per query (2048 queries × 4096 keys: the same useful
  work, the floor a banded layout can approach).

Writes ``bench/results/band.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from bench.common import machine_line, write_result
from lminf_integrations import attention


def _time(fn: Callable[[], object], repeats: int) -> float:
    """Best of ``repeats`` runs in ms (this machine's speed drifts; the minimum is the steadiest statistic)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench band", description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    heads, kv_heads, dim = 9, 3, 64
    n_keys = args.window - 1 + args.queries  # every query's window full
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, args.queries, heads, dim, generator=generator).to(dtype).transpose(1, 2)
    keys = torch.randn(1, kv_heads, n_keys, dim, generator=generator).to(dtype)
    values = torch.randn(1, kv_heads, n_keys, dim, generator=generator).to(dtype)
    scale = dim**-0.5
    first, last = n_keys - args.queries, n_keys - 1

    floor_k, floor_v = keys[:, :, : args.window].contiguous(), values[:, :, : args.window].contiguous()
    floor_ms = _time(lambda: attention._flash(query, floor_k, floor_v, 0.0, False, scale=scale), args.repeats)
    rows = [f"| no mask, {args.window} keys per query (floor) | {floor_ms:.1f} | 1.00× |"]
    layouts = {
        "core + inner band": lambda: attention._core_and_inner_band(query, keys, values, args.window, first, scale),
        "blockwise band": lambda: attention._banded_blocks(query, keys, values, args.window, first, last, scale),
    }
    default = attention.BLOCK
    try:
        for name, parts in layouts.items():
            for block in args.blocks:
                attention.BLOCK = block
                ms = _time(lambda parts=parts: attention._combine(parts(), [], dtype), args.repeats)
                used = " (used)" if block == default and name == "core + inner band" else ""
                rows.append(f"| {name}, block {block}{used} | {ms:.1f} | {ms / floor_ms:.2f}× |")
                print(rows[-1], flush=True)
    finally:
        attention.BLOCK = default
    table = "\n".join(
        [
            f"# Λ band kernel time, one layer, {args.queries} queries, window {args.window}, {args.dtype}",
            "",
            f"{machine_line()}. Command: `{' '.join(['python -m bench band', *(argv or [])])}`.",
            "Best of the repeats, each layout with the merge of its parts into the output.",
            "",
            "| layout | ms | vs floor |",
            "|---|---|---|",
            *rows,
        ]
    )
    print(table)
    write_result("band.md", table + "\n")


if __name__ == "__main__":
    main()
