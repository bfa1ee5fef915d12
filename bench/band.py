"""The Λ band's kernel time by query-block size: the measurement behind ``attention.BLOCK``.

    python -m bench band                       # SmolLM2's head shapes, 2048-query chunk, 4K window
    python -m bench band --dtype fp32 --window 8192

One layer's band attention for one prefill chunk (queries whose window is full), random tensors with the default
model's head layout (9 query heads, 3 key/value heads, head size 64), for each block size; next to it the same
kernel with no mask over exactly ``window`` keys per query (2048 queries × 4096 keys: the same useful work, the
floor a banded layout can approach). Writes ``bench/results/band.md``.
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
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench band", description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    heads, kv_heads, dim, n_keys = 9, 3, 64, args.window + args.queries
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, heads, args.queries, dim, generator=generator).to(dtype)
    keys = torch.randn(1, kv_heads, n_keys, dim, generator=generator).to(dtype)
    values = torch.randn(1, kv_heads, n_keys, dim, generator=generator).to(dtype)
    scale = dim**-0.5
    first, last = n_keys - args.queries, n_keys - 1

    floor_k = keys[:, :, : args.window].repeat_interleave(heads // kv_heads, dim=1)
    floor_v = values[:, :, : args.window].repeat_interleave(heads // kv_heads, dim=1)
    floor_ms = _time(lambda: attention._flash(query, floor_k, floor_v, 0.0, False, scale=scale), args.repeats)
    rows = [f"| no mask, {args.window} keys per query (floor) | {floor_ms:.1f} | 1.00× |"]
    default = attention.BLOCK
    try:
        for block in args.blocks:
            attention.BLOCK = block
            ms = _time(
                lambda: attention._banded_blocks(query, keys, values, args.window, first, last, scale), args.repeats
            )
            marker = " (default)" if block == default else ""
            rows.append(f"| band, block {block}{marker} | {ms:.1f} | {ms / floor_ms:.2f}× |")
            print(rows[-1], flush=True)
    finally:
        attention.BLOCK = default
    table = "\n".join(
        [
            f"# Λ band kernel time, one layer, {args.queries} queries, window {args.window}, {args.dtype}",
            "",
            f"{machine_line()}. Command: `{' '.join(['python -m bench band', *(argv or [])])}`.",
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
