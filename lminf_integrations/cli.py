"""``lminf``: ask a local model about a whole document from the command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from .config import LMInfiniteConfig

DEFAULT_QUESTION_TEMPLATE = "{document}\n\nAnswer the question about the document above.\nQuestion: {question}"


def read_document(path: str) -> str:
    """Read a UTF-8 text file, with errors a person can act on."""
    file = Path(path)
    if not file.exists():
        raise SystemExit(f"lminf: error: no such file: {path}")
    if not file.is_file():
        raise SystemExit(f"lminf: error: not a regular file: {path}")
    data = file.read_bytes()
    if b"\x00" in data[:8192]:
        raise SystemExit(f"lminf: error: {path} looks binary (NUL bytes); give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SystemExit(f"lminf: error: {path} is not valid UTF-8 ({error.reason} at byte {error.start})") from None


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lminf", description="Whole-document answers from a local model with LM-Infinite attention."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    ask = commands.add_parser("ask", help="answer a question about a text file, streamed to stdout")
    ask.add_argument("file", help="UTF-8 text file to read whole")
    ask.add_argument("question", help="the question to answer")
    ask.add_argument("--model", default=None, help="hub id, local model folder or .gguf file (default: embedded)")
    ask.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU/GPU has it, else fp32), bf16, fp32")
    ask.add_argument("--max-new-tokens", type=_positive, default=256, help="answer length limit (default 256)")
    ask.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default), >0 to sample")
    ask.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    ask.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    ask.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ask.add_argument("--n-global", type=_non_negative, default=10, help="global tokens (default 10)")
    ask.add_argument("--n-local", type=_positive, default=4096, help="local window (default 4096)")
    ask.add_argument("--distance-limit", type=_positive, default=None, help="default: --n-local")
    ask.add_argument("--top-k", type=_non_negative, default=0, help="middle keys per head at generation (needs --cache full)")
    ask.add_argument("--top-k-from-layer", type=_non_negative, default=0, help="first layer using top-k")
    ask.add_argument("--cache", choices=["window", "full"], default="window", help="KV cache mode (default window)")
    ask.add_argument("--chunk-size", type=_positive, default=2048, help="prefill chunk (default 2048)")
    ask.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def _config(args: argparse.Namespace) -> LMInfiniteConfig:
    try:
        return LMInfiniteConfig(
            n_global=args.n_global,
            n_local=args.n_local,
            distance_limit=args.distance_limit,
            top_k=args.top_k,
            top_k_from_layer=args.top_k_from_layer,
            cache=args.cache,
            chunk_size=args.chunk_size,
        )
    except ValueError as error:
        raise SystemExit(f"lminf: error: {error}") from None


def cmd_ask(args: argparse.Namespace) -> int:
    document = read_document(args.file)
    config = _config(args)
    from .engine import Engine, GenerationSettings  # heavy imports only once the arguments are good

    try:
        settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    except ValueError as error:
        raise SystemExit(f"lminf: error: {error}") from None
    engine = Engine(args.model, config=config, dtype=args.dtype)
    content = DEFAULT_QUESTION_TEMPLATE.format(document=document, question=args.question)
    prompt = engine.chat_prompt([{"role": "user", "content": content}])
    bar = tqdm(total=None, unit="tok", desc="encoding", disable=args.no_progress, file=sys.stderr, leave=True)

    def on_progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    started = time.perf_counter()
    first_token: float | None = None
    stream = engine.stream(prompt, settings, stop=args.stop, on_progress=on_progress)
    try:
        for delta in stream:
            if first_token is None:
                first_token = time.perf_counter()
                bar.close()
            sys.stdout.write(delta)
            sys.stdout.flush()
    finally:
        stream.close()
        bar.close()
    sys.stdout.write("\n")
    result = stream.result
    if result is not None and not args.no_progress:
        elapsed = time.perf_counter() - started
        ttft = (first_token or time.perf_counter()) - started
        print(
            f"[{result.input_tokens} prompt tokens, {result.output_tokens} generated, first token after {ttft:.1f} s, "
            f"total {elapsed:.1f} s, stop: {result.stop_reason}]",
            file=sys.stderr,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "ask":
        return cmd_ask(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
