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

``--queries`` must leave the core at least the largest ``--blocks`` keys (``window - queries >= block``, the
attention's own condition for this layout): with fewer the attention would not use it, and with none (``queries >=
window``) the kernel would divide by zero. Writes ``band.md`` to ``bench/results/`` (``--results DIR`` elsewhere).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from bench.common import add_dtype, add_results, command_line, machine_line, make_parser, positive_int, write_result
from lminf_integrations.ops.partial import combine, flash
from lminf_integrations.strategies.lm_infinite import attention


def _interleaved_best(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best time in ms of each run over ``repeats`` rounds, the runs taking turns within each round: this machine's
    speed drifts by up to ~20% over minutes, so runs timed one after the other compare drift, not layouts."""
    for fn in runs.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: min(spent) * 1000 for name, spent in times.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("band", __doc__)
    parser.add_argument("--blocks", type=positive_int, nargs="+", default=[128, 256, 512],
                        help="query-block sizes (the attention's BLOCK) to time")  # fmt: skip
    parser.add_argument("--window", type=positive_int, default=4096, help="the band's width (n_local)")
    parser.add_argument("--queries", type=positive_int, default=2048,
                        help="queries of the prefill chunk; at most --window minus the largest block")  # fmt: skip
    add_dtype(parser, ["bf16", "fp32"])
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed rounds (best of them reported)")
    add_results(parser, "band.md")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The core + inner band layout (attention._core_and_inner_band) takes the window - queries keys every query sees
    # in one unmasked call; the attention uses it only where window - queries >= BLOCK. With no such keys the
    # kernel dies of SIGFPE, taking the process with it: refuse that before anything runs.
    most = args.window - max(args.blocks)
    if args.queries > most:
        parser.error(
            f"argument --queries: at most --window - the largest --blocks ({args.window} - {max(args.blocks)} = "
            f"{most}) for the core + inner band layout, got {args.queries}"
            + ("; use a wider --window or smaller --blocks" if most < 1 else "")
        )
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
    floor = f"no mask, {args.window} keys per query (floor)"
    runs: dict[str, Callable[[], object]] = {
        floor: lambda: flash(query, floor_k, floor_v, 0.0, False, scale=scale)
    }
    default_block = attention.BLOCK

    def configured(block: int, parts: Callable[[], list[attention.Part]]) -> Callable[[], object]:
        def run() -> torch.Tensor:
            attention.BLOCK = block
            try:
                return combine(parts(), [], dtype)  # each layout with the merge the model pays
            finally:
                attention.BLOCK = default_block

        return run

    for block in args.blocks:
        used = " (used)" if block == default_block else ""
        runs[f"core + inner band, block {block}{used}"] = configured(
            block, lambda: attention._core_and_inner_band(query, keys, values, args.window, first, scale)
        )
        runs[f"blockwise band, block {block}"] = configured(
            block, lambda: attention._banded_blocks(query, keys, values, args.window, first, last, scale)
        )
    best = _interleaved_best(runs, args.repeats)
    rows = [f"| {name} | {ms:.1f} | {ms / best[floor]:.2f}× |" for name, ms in best.items()]
    table = "\n".join(
        [
            f"# Λ band kernel time, one layer, {args.queries} queries, window {args.window}, {args.dtype}",
            "",
            f"{machine_line()}. Command: `{command_line('band', argv)}`.",
            "Best of the repeats, all layouts taking turns in each round; each layout with the merge of its parts.",
            "",
            "| layout | ms | vs floor |",
            "|---|---|---|",
            *rows,
        ]
    )
    print(table)
    write_result("band.md", table + "\n", args.results)


if __name__ == "__main__":
    main()
