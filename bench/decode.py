"""Decoding tokens/s through ``generate``, eager vs compiled (``Engine(compile_decode=True)``), same process.

LM-Infinite with the window cache: each context is encoded once (the contexts share one growing encoded prefix),
then the same prompt is continued by ``generate``, eagerly and with the compiled decoding step, with the decoding
kernel (``lminf_integrations/ops/decode_kernel.py``) and with PyTorch's flash kernel in its place, with EOS suppressed
so that every run decodes the same number of tokens. Steps are timed by a streamer's timestamps, so the
first step (the last prompt token) and the one-time compile stay out of the rate.

    python -m bench decode                                  # 1K, 4K ... 128K
    python -m bench decode --lengths 8192 --decode-steps 16  # quick look

Writes ``decode.md`` and ``decode.png`` to ``bench/results/`` (``--results DIR`` elsewhere).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from bench.common import (
    StepClock,
    add_dtype,
    add_results,
    command_line,
    decode_kernel_set,
    length_label,
    machine_line,
    make_parser,
    positive_int,
    token_ids,
    write_result,
)
from lminf_integrations.config import LMInfiniteConfig
from lminf_integrations.model_thread import run


def _decode(model: Any, ids: list[int], cache: Any, steps: int, compiled: bool) -> float:
    """Tokens/s of ``steps`` decoding steps after the first one."""
    from lminf_integrations.compiled import generate_kwargs, inductor_settings
    from lminf_integrations.hf_compat import cache_kwargs

    clock = StepClock()
    cache.allow_compiled_steps(compiled)
    with torch.inference_mode(), inductor_settings(compiled):
        model.generate(
            torch.tensor([ids]),
            **cache_kwargs(cache),
            max_new_tokens=steps + 1,
            min_new_tokens=steps + 1,
            do_sample=False,
            streamer=clock,
            **generate_kwargs(compiled),
        )
    # times[0]: the prompt; times[1]: the first new token (the last prompt token's step).
    return steps / (clock.times[-1] - clock.times[1])


Rows = list[dict[str, float]]


def measure(lengths: list[int], dtype: str, n_local: int, steps: int) -> tuple[Rows, dict[str, float]]:
    """Per context: eager and compiled decoding with the decoding kernel (``decode_kernel``), then compiled with
    PyTorch's flash kernel instead (a second compile, after all lengths: a compiled step keeps the kernel it was
    traced with); eager steps alternate between the two kernels."""
    from lminf_integrations.engine import Engine
    from lminf_integrations.models import load_model

    model, tokenizer = load_model(None, dtype)
    engine = Engine(model=model, tokenizer=tokenizer, config=LMInfiniteConfig(n_local=n_local), reuse_prefixes=False)
    ids = token_ids(tokenizer, max(lengths))
    rows: Rows = []
    caches = {}
    state = None
    for n in sorted(lengths):
        state = engine.encode(ids[: n - 1], state=state)
        state.cache.allow_compiled_steps()
        if not state.cache.is_compileable:
            raise SystemExit(f"compiled decoding does not apply to a {n}-token prompt")
        caches[n] = state.cache.clone()
    setup = _warm_up(model, ids, caches[min(lengths)], kernel=True)
    for n, cache in caches.items():
        with decode_kernel_set(True):
            eager = _decode(model, ids[:n], cache.clone(), steps, compiled=False)
            compiled = _decode(model, ids[:n], cache.clone(), steps, compiled=True)
        with decode_kernel_set(False):
            eager_flash = _decode(model, ids[:n], cache.clone(), steps, compiled=False)
        rows.append({"context": n, "eager_tok_s": eager, "compiled_tok_s": compiled, "eager_flash_tok_s": eager_flash})
        print(rows[-1], flush=True)
    torch._dynamo.reset()
    setup["compile_flash_s"] = _warm_up(model, ids, caches[min(lengths)], kernel=False)["compile_s"]
    for row in rows:
        n = int(row["context"])
        with decode_kernel_set(False):
            row["compiled_flash_tok_s"] = _decode(model, ids[:n], caches[n].clone(), steps, compiled=True)
        print(row, flush=True)
    return rows, setup


def _warm_up(model: Any, ids: list[int], cache: Any, kernel: bool) -> dict[str, float]:
    """The one-time compile (and its memory: the frozen weights are a second copy), then one eager generation."""
    n = cache.get_seq_length() + 1
    with decode_kernel_set(kernel):
        rss = psutil.Process().memory_info().rss
        started = time.perf_counter()
        _decode(model, ids[:n], cache.clone(), 2, compiled=True)
        setup = {
            "compile_s": time.perf_counter() - started,
            "compile_rss_gib": (psutil.Process().memory_info().rss - rss) / 2**30,
        }
        _decode(model, ids[:n], cache.clone(), 2, compiled=False)
    return setup


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("decode", __doc__)
    parser.add_argument("--lengths", type=positive_int, nargs="+",
                        default=[1024, 4096, 8192, 16384, 32768, 65536, 131072], help="contexts in tokens")  # fmt: skip
    add_dtype(parser)
    parser.add_argument("--n-local", type=positive_int, default=4096, help="LM-Infinite's window")
    parser.add_argument("--decode-steps", type=positive_int, default=64, help="decoding steps timed per run")
    add_results(parser, "decode.md and decode.png")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # All of it on the engine's model thread, where its encodes run: one OpenMP team (lminf_integrations.model_thread).
    rows, setup = run(lambda _: measure(args.lengths, args.dtype, args.n_local, args.decode_steps))
    text = report(rows, setup, args, command_line("decode", argv))
    print(text)
    write_result("decode.md", text, args.results)
    plot(rows, args.results / "decode.png")


def report(rows: Rows, setup: dict[str, float], args: argparse.Namespace, command: str) -> str:
    """decode.md: the settings, the one-time compile, the command, and a row per context."""
    return (
        f"# Decoding tokens/s, eager vs compiled, SmolLM2-135M-Instruct, {args.dtype}\n\n"
        f"LM-Infinite: n_local={args.n_local}, n_global={LMInfiniteConfig().n_global}, window cache. "
        "`model.generate` (greedy, EOS suppressed) "
        f"continues the same encoded prompt eagerly and with `compile_decode`'s settings; rate over "
        f"{args.decode_steps} steps after the first. Text: pydoc_data.topics. {machine_line()}.\n"
        f"One-time compile (first compiled generation, 2 tokens): {setup['compile_s']:.0f} s; resident memory grew "
        f"by {setup['compile_rss_gib']:.2f} GiB (the frozen, prepacked weights).\n"
        "Attention of a decoding step: our decoding kernel (`lminf_integrations/ops/decode_kernel.py`), or PyTorch's "
        "flash kernel (`LMINF_DECODE_KERNEL=0`; compiled after the kernel's columns, so a few minutes later).\n"
        f"Command: `{command}`\n\n"
        "| context | eager tok/s | compiled tok/s | speed-up | eager, flash kernel | compiled, flash kernel | "
        "kernel vs flash, compiled |\n|---|---|---|---|---|---|---|\n"
        + "".join(
            f"| {length_label(int(r['context']))} | {r['eager_tok_s']:.1f} | {r['compiled_tok_s']:.1f} | "
            f"{r['compiled_tok_s'] / r['eager_tok_s']:.2f}× | {r['eager_flash_tok_s']:.1f} | "
            f"{r['compiled_flash_tok_s']:.1f} | {r['compiled_tok_s'] / r['compiled_flash_tok_s']:.2f}× |\n"
            for r in rows
        )
    )


def plot(rows: Rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 4))
    xs = [r["context"] / 1024 for r in rows]
    for key, label in (
        ("eager_tok_s", "eager"),
        ("compiled_tok_s", "compiled"),
        ("compiled_flash_tok_s", "compiled, flash kernel"),
    ):
        ax.plot(xs, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("context (K tokens)")
    ax.set_title("LM-Infinite decode tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
