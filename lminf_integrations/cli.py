"""``lminf``: ask a local model about a whole document from the command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from .config import LMInfiniteConfig

if TYPE_CHECKING:  # torch and transformers load only once the arguments are good
    from .engine import Engine
    from .streaming import ProgressCallback

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


def _model_options() -> argparse.ArgumentParser:
    """Options shared by every subcommand that loads a model (a saved state must match them)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None, help="hub id, local model folder or .gguf file (default: embedded)")
    common.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU/GPU has it, else fp32), bf16, fp32")
    common.add_argument("--n-global", type=_non_negative, default=10, help="global tokens (default 10)")
    common.add_argument("--n-local", type=_positive, default=4096, help="local window (default 4096)")
    common.add_argument("--distance-limit", type=_positive, default=None, help="default: --n-local")
    common.add_argument(
        "--top-k", type=_non_negative, default=0, help="middle keys per head at generation (needs --cache full)"
    )
    common.add_argument("--top-k-from-layer", type=_non_negative, default=0, help="first layer using top-k")
    common.add_argument("--cache", choices=["window", "full"], default="window", help="KV cache mode (default window)")
    common.add_argument("--chunk-size", type=_positive, default=2048, help="prefill chunk (default 2048)")
    common.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lminf", description="Whole-document answers from a local model with LM-Infinite attention."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    common = _model_options()
    ask = commands.add_parser(
        "ask",
        parents=[common],
        help="answer a question about a text file, streamed to stdout",
        usage="lminf ask FILE QUESTION [options]  |  lminf ask --state STATE QUESTION [options]",
    )
    ask.add_argument("inputs", nargs="+", metavar="FILE QUESTION", help="UTF-8 text file to read whole, question")
    ask.add_argument("--state", default=None, help="a document state from `lminf encode` instead of FILE")
    ask.add_argument("--max-new-tokens", type=_positive, default=256, help="answer length limit (default 256)")
    ask.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default), >0 to sample")
    ask.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    ask.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    ask.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ask.add_argument(
        "--compile",
        action="store_true",
        help="compile the decoding step: faster steps after a compile that every run repeats, so it pays off only "
        "for long answers (README: 'Decoding, eager vs compiled'; the Python API and framework classes compile "
        "once per process)",
    )
    encode = commands.add_parser(
        "encode", parents=[common], help="encode a document once and save its state for many `ask --state`"
    )
    encode.add_argument("file", help="UTF-8 text file")
    encode.add_argument("-o", "--output", required=True, help="state file to write (safetensors)")
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


def _split_prompt(engine: Engine, document: str, question: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt before the question (the document part, encodable once) and from it on.

    Both halves are tokenized separately, so a saved document state is always an exact prefix.
    """
    marker = "\u0000QUESTION\u0000"
    content = DEFAULT_QUESTION_TEMPLATE.format(document=document, question=marker)
    head, tail = engine.chat_prompt([{"role": "user", "content": content}]).split(marker)
    return engine.tokenize(head), engine.tokenize(question + tail)


def _engine(args: argparse.Namespace) -> Engine:
    config = _config(args)
    from .engine import Engine  # heavy imports only once the arguments are good

    compile_decode = getattr(args, "compile", False)  # `ask` only: `encode` does not generate
    return Engine(args.model, config=config, dtype=args.dtype, reuse_prefixes=False, compile_decode=compile_decode)


def _progress_bar(args: argparse.Namespace, description: str) -> tuple[tqdm, ProgressCallback]:
    bar = tqdm(total=None, unit="tok", desc=description, disable=args.no_progress, file=sys.stderr, leave=True)

    def on_progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return bar, on_progress


def cmd_ask(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    expected = 1 if args.state else 2
    if len(args.inputs) != expected:
        parser.error("give FILE QUESTION, or --state STATE QUESTION")
    document = "" if args.state else read_document(args.inputs[0])
    question = args.inputs[-1]
    from .engine import GenerationSettings
    from .state import load_state

    try:
        settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    except ValueError as error:
        raise SystemExit(f"lminf: error: {error}") from None
    engine = _engine(args)
    head, tail = _split_prompt(engine, document, question)
    state = None
    if args.state:
        try:
            state = load_state(args.state, engine)
        except (ValueError, FileNotFoundError) as error:
            raise SystemExit(f"lminf: error: {error}") from None
        head = state.token_ids
    bar, on_progress = _progress_bar(args, "encoding")
    started = time.perf_counter()
    first_token: float | None = None
    stream = engine.stream(head + tail, settings, stop=args.stop, on_progress=on_progress, state=state)
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


def cmd_encode(args: argparse.Namespace) -> int:
    document = read_document(args.file)
    from .state import save_state

    engine = _engine(args)
    head, _ = _split_prompt(engine, document, "")
    bar, on_progress = _progress_bar(args, "encoding")
    state = engine.encode(head, on_progress)
    bar.close()
    path = save_state(state, args.output, engine)
    print(f"saved {len(head)} tokens to {path} ({path.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "ask":
        return cmd_ask(args, parser)
    return cmd_encode(args)


if __name__ == "__main__":
    sys.exit(main())
