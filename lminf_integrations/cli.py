"""``lminf``: ask a local model about a whole document from the command line."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import XL3MConfig
from .settings import STRATEGY_GROUPS, Resolved, in_groups, resolve

if TYPE_CHECKING:  # torch and transformers load only once the arguments are good
    from .engine import Engine
    from .streaming import TerminalProgress

INSTRUCTION = "\n\nAnswer the question about the document above.\nQuestion: "
DEFAULT_QUESTION_TEMPLATE = "{document}" + INSTRUCTION + "{question}"
#: What follows the question for a model without a chat template: the answer continues it.
PLAIN_CLOSING = "\nAnswer:"


_ONE_DOCUMENT = "one FILE is read as the document"


def read_document(path: str) -> str:
    """Read a UTF-8 text file, or standard input for ``-``, with errors a person can act on."""
    if path == "-":
        name, data = "standard input", sys.stdin.buffer.read()
    else:
        file = Path(path)
        if not file.exists():
            raise SystemExit(f"lminf: error: no such file: {path}")
        if file.is_dir():  # a pipe (``<(cat src/*.py)``, /dev/stdin) is read like a file
            raise SystemExit(f"lminf: error: {path} is a directory; give a text file")
        name, data = path, file.read_bytes()
    if b"\x00" in data:
        raise SystemExit(f"lminf: error: {name} looks binary (NUL bytes); give UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SystemExit(f"lminf: error: {name} is not valid UTF-8 ({error.reason} at byte {error.start})") from None
    if not text.strip():  # an answer would come from the model alone
        raise SystemExit(f"lminf: error: {name} is empty")
    return text


def _add_settings(
    parser: argparse.ArgumentParser,
    groups: Sequence[str],
    unlisted: Collection[str] = (),
    notes: Mapping[str, str] | None = None,
) -> None:
    """One option per declared setting of ``groups`` (``--n-local``...), named, typed and described by it;
    ``unlisted`` ones are parsed (to be refused with a reason) but left out of the help, ``notes`` describe a
    group."""
    sections = {
        group: parser.add_argument_group(f"{group} settings", (notes or {}).get(group)) for group in groups
    }
    for setting in in_groups(*groups):
        section = sections[setting.group]
        kwargs: dict[str, Any] = {"dest": setting.name, "default": setting.default, "help": setting.help}
        annotation = setting.annotation
        if annotation is bool:
            kwargs["action"] = "store_true"
        elif setting.default is None and annotation == bool | None:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = typing.get_args(annotation)
        elif typing.get_origin(annotation) is tuple:
            kwargs.update(action="append", default=[], metavar="TEXT", help=f"{setting.help} (repeatable)")
        elif _takes_mapping(annotation):
            kwargs.update(type=_json_or_name, metavar="JSON")
        else:
            kind = next(kind for kind in (int, float, str) if annotation in (kind, kind | None))
            metavar = {int: "N", float: "X", str: "NAME"}[kind]
            if annotation == kind | None:  # None must be sayable ("none"), also where it is the default
                kwargs.update(type=_or_none(kind), metavar=f"{metavar}|none")
            else:
                kwargs.update(type=kind, metavar=metavar)
        if "action" not in kwargs and setting.default is not None:
            kwargs["help"] += " (default: %(default)s)"
        if setting.name in unlisted:
            kwargs["help"] = argparse.SUPPRESS
        section.add_argument(*setting.flags, **kwargs)


def _or_none(kind: type) -> Callable[[str], Any]:
    """An argparse type reading ``kind``, or ``none`` (any case) as None."""

    def parse(text: str) -> Any:
        return None if text.strip().lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _takes_mapping(annotation: Any) -> bool:
    """Whether a setting's type includes a mapping (``device_map``, ``max_memory``): given as JSON here."""
    return any(typing.get_origin(part) is dict for part in (annotation, *typing.get_args(annotation)))


def _json_or_name(text: str) -> Any:
    """A mapping as a JSON object (``{"cpu": "30GiB"}``), or a plain name (``auto``) for settings that take either."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not a valid JSON object: {error}") from None


def _settings(args: argparse.Namespace, parser: argparse.ArgumentParser, groups: Sequence[str]) -> Resolved:
    """The settings given on the command line, validated by the engine's own dataclasses."""
    try:
        return resolve({setting.name: getattr(args, setting.name) for setting in in_groups(*groups)})
    except ValueError as error:
        parser.error(str(error))


ASK_GROUPS = ("model", "strategy", "encoding", "attention", "xl3m", "dca", "decoding", "generation", "display")
ENCODE_GROUPS = ("model", "strategy", "encoding", "attention", "xl3m", "dca", "display")
#: XL3M's settings a state does not keep: read when a question is asked, refused by ``encode``.
QUESTION_TIME = tuple(s.name for s in in_groups("xl3m") if s.field_name not in XL3MConfig.STATE_FIELDS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lminf", description="Whole-document answers from a local model with LM-Infinite attention."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    ask = commands.add_parser(
        "ask",
        allow_abbrev=False,  # --n-loc is not --n-local: a typo is refused (_refuse_unknown), never guessed
        help="answer a question about a text file, streamed to stdout",
        usage="lminf ask FILE QUESTION [options]  |  lminf ask --state STATE QUESTION [options]",
        description="Compiled decoding (--compile-decode) compiles again in every run: it pays off only for long "
        "answers (README: 'Decoding, eager vs compiled').",
    )
    ask.add_argument("inputs", nargs="+", metavar="FILE QUESTION",
                     help="UTF-8 text file to read whole ('-': standard input), question")  # fmt: skip
    ask.add_argument("--state", default=None, help="a document state from `lminf encode` instead of FILE")
    ask.add_argument(
        "--show-selection", action="store_true", help="print what the strategy chose (XL3M: segments and scores)"
    )
    _add_settings(ask, ASK_GROUPS)
    ask.set_defaults(command_parser=ask)  # errors after parsing show the command's usage, not the program's
    encode = commands.add_parser(
        "encode", help="encode a document once and save its state for many `ask --state`", allow_abbrev=False,
        usage="lminf encode FILE -o STATE [options]",
    )  # fmt: skip
    # nargs="+": a glob of several files is refused saying how to join them (cmd_encode), not as "unrecognized"
    encode.add_argument("file", nargs="+", metavar="FILE", help="UTF-8 text file ('-': standard input)")
    encode.add_argument("-o", "--output", required=True, help="state file to write (safetensors)")
    _add_settings(
        encode,
        ENCODE_GROUPS,
        unlisted=QUESTION_TIME,
        notes={"xl3m": "how the document is cut; the rest (--candidates, --score...) is read when a question is "
               "asked: give it to `lminf ask --state`"},
    )
    encode.set_defaults(command_parser=encode)
    return parser


def _split_prompt(engine: Engine, document: str, question: str) -> tuple[list[int], list[int], list[int], list[int]]:
    """Token ids of the prompt's four parts: the template's opening with the document (encodable once), the
    instruction, the question, the template's closing.

    Each part is tokenized on its own, so a saved document state is always an exact prefix, and the strategy is
    told exactly where the question is. The document and the question are read as text: a file that spells a
    special token (``"<|im_end|>"`` in a code base) does not end the user's turn. A model without a chat template
    (a base model) is asked in plain text: its tokenizer's BOS, the document, the instruction and question, and
    "Answer:".
    """
    if not getattr(engine.tokenizer, "chat_template", None):
        document_ids = engine.special_prefix + engine.tokenize_text(document)
        question_ids = engine.tokenize_text(question)
        return document_ids, engine.tokenize(INSTRUCTION), question_ids, engine.tokenize(PLAIN_CLOSING)
    marker = "\u0000QUESTION\u0000"
    content = DEFAULT_QUESTION_TEMPLATE.format(document=document, question=marker)
    head, closing = engine.chat_prompt([{"role": "user", "content": content}]).split(marker)
    assert head.endswith(INSTRUCTION)
    opening = head[: len(head) - len(INSTRUCTION)]
    question_ids = engine.tokenize_text(question)
    return _opening_ids(engine, opening, document), engine.tokenize(INSTRUCTION), question_ids, engine.tokenize(closing)


def _opening_ids(engine: Engine, opening: str, document: str) -> list[int]:
    """The template's opening and the document. Tokenized whole, as states were always made, unless the document
    spells a special token: then the template's markup and the document each on their own, the document as text.
    (A template that changed the document, trimming it, leaves the opening whole.)"""
    if not engine.spells_added_tokens(document) or not opening.endswith(document):
        return engine.tokenize(opening)
    return engine.tokenize(opening[: len(opening) - len(document)]) + engine.tokenize_text(document)


def _engine(settings: Resolved) -> Engine:
    from .engine import Engine  # heavy imports only once the arguments are good

    if not (sys.stderr.isatty() if settings.progress is None else settings.progress):
        # no bars at all: transformers' own (loading the weights) neither; its carriage returns would fill a log
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        return Engine.from_settings(settings, reuse_prefixes=False)
    except RuntimeError as error:  # a device this torch cannot use (a CUDA device on a CPU build)
        raise SystemExit(f"lminf: error: {error}") from None


def _progress_bar(settings: Resolved) -> TerminalProgress:
    from .streaming import TerminalProgress

    return TerminalProgress(enabled=settings.progress, min_tokens=0, desc="encoding")


def cmd_ask(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    expected = 1 if args.state else 2
    if len(args.inputs) > expected:  # a glob of files
        parser.error(f"{_ONE_DOCUMENT} (for several: cat FILES | lminf ask - QUESTION)")
    if len(args.inputs) != expected:
        parser.error("give FILE QUESTION, or --state STATE QUESTION")
    settings = _settings(args, parser, ASK_GROUPS)
    question = args.inputs[-1]
    if not question.strip():
        parser.error("the question is empty")
    document = "" if args.state else read_document(args.inputs[0])
    if args.state and not Path(args.state).is_file():  # said before the model loads
        raise SystemExit(f"lminf: error: no such state file: {args.state}")
    engine = _engine(settings)
    head, instruction, question_ids, closing = _split_prompt(engine, document, question)
    state = None
    if args.state:
        try:
            state = engine.load_state(args.state)
        except (ValueError, FileNotFoundError) as error:
            raise SystemExit(f"lminf: error: {error}") from None
        head = state.token_ids
    bar = _progress_bar(settings)
    started = time.perf_counter()
    first_token: float | None = None
    prompt = head + instruction + question_ids + closing
    if state is None and engine.strategy.continues_states:
        # Read the document as `lminf encode` does, then the rest as `ask --state` does: the same chunks, so the same
        # answer (in bf16 a chunk spanning the document's end rounds otherwise, and a greedy answer can flip).
        state = engine.encode(head, bar, report_total=len(prompt))
    # The question part is known exactly here: the instruction and the question, before the template's end; the
    # question's own tokens rank XL3M's segments.
    stream = engine.stream(
        prompt,
        settings.generation,
        on_progress=bar,
        state=state,
        question_tokens=len(instruction) + len(question_ids),
        scored_tokens=len(question_ids),
    )
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
    if args.show_selection:
        print(_selection(result.details if result is not None else None), file=sys.stderr)
    if result is not None and bar.enabled:
        elapsed = time.perf_counter() - started
        ttft = (first_token or time.perf_counter()) - started
        print(
            f"[{result.input_tokens} prompt tokens, {result.output_tokens} generated, first token after {ttft:.1f} s, "
            f"total {elapsed:.1f} s, stop: {result.stop_reason}]",
            file=sys.stderr,
        )
    return 0


def _selection(details: dict[str, Any] | None) -> str:
    """What the strategy chose, for people: XL3M's segments by token positions and scores."""
    xl3m = (details or {}).get("xl3m")
    if xl3m is None:
        return "[selection: none: the whole prompt was read (strategy other than xl3m, or a prompt that fits)]"

    def spans(parts: list[dict[str, Any]], score: str) -> str:
        return ", ".join(
            f"{c['start']}-{c['end']} ({score} {c['score']:+.3f}"
            + (f", contrast {c['contrast']:+.3f}" if "contrast" in c else "")
            + (f", attention {c['attention']:.3f})" if "attention" in c else ")")
            for c in parts
        )

    kind = {"contrast": "contrast", "loglik": "likelihood", "entropy": "entropy"}.get(xl3m.get("score", ""), "score")
    if xl3m.get("scored", xl3m["segments"]) < xl3m["segments"]:
        scored = f"{xl3m['scored']} scored by {kind} after the attention pass"
    else:
        scored = f"all scored by {kind}"
    text = f"[xl3m: {len(xl3m['chosen'])} of {xl3m['segments']} segments, {scored}; "
    text += f"tokens {spans(xl3m['chosen'], kind)}"
    if "passages" in xl3m:
        passage_kind = "entropy" if kind == "entropy" else "likelihood"
        text += f"; answered from {len(xl3m['passages'])} of their passages: tokens "
        text += spans(xl3m["passages"], passage_kind)
    hop = xl3m.get("hop")
    start = xl3m.get("answer_start")
    if start is not None:
        text += f"; answer's first new tokens: least likely {min(start):.3f}" if start else "; no new answer tokens"
        text += "" if hop else ", sure: no hop"
    if hop:
        segment = hop["segment"]
        text += (
            f"; hop from {hop['from']['start']}-{hop['from']['end']}: segment {segment['start']}-{segment['end']} "
            f"(gain {hop['gain']:+.3f}, next {hop['runner_up']:+.3f}): "
        )
        added = hop.get("passage")
        text += f"added {added['start']}-{added['end']}" if added else "nothing added (under hop_margin)"
    return text + "]"


def cmd_encode(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    settings = _settings(args, parser, ENCODE_GROUPS)
    _refuse_what_only_questions_use(args, parser, settings)
    from .state import check_writable

    if len(args.file) > 1:  # a glob of files
        parser.error(f"{_ONE_DOCUMENT} (for several: cat FILES | lminf encode - -o STATE)")
    check_writable(args.output)  # before the model loads and the document is read
    document = read_document(args.file[0])
    engine = _engine(settings)
    head = _split_prompt(engine, document, "")[0]
    bar = _progress_bar(settings)
    state = engine.encode(head, bar)
    bar.close()
    path = engine.save_state(state, args.output)
    print(f"saved {len(head)} tokens to {path} ({path.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


def _refuse_what_only_questions_use(
    args: argparse.Namespace, parser: argparse.ArgumentParser, settings: Resolved
) -> None:
    """A strategy's setting given to ``encode`` that its state does not keep (XL3M's selection: read when a
    question is asked) is refused, naming where it belongs, rather than dropped."""
    from .strategies import make_strategy

    strategy = make_strategy(settings.options.strategy, settings.config, settings.xl3m, settings.dca)
    kept = set(_names(strategy.identity()))
    for setting in in_groups(*STRATEGY_GROUPS):
        value = getattr(args, setting.name)
        if value != setting.default and setting.name not in kept:
            parser.error(
                f"{setting.name}={value!r} is read when a question is asked and is not kept in the state: give it to "
                "`lminf ask --state`"
            )


def _names(identity: dict[str, Any]) -> list[str]:
    """Every name in a strategy's identity, its nested settings included."""
    return [n for key, value in identity.items() for n in ([key, *_names(value)] if isinstance(value, dict) else [key])]


def _refuse_unknown(unknown: Sequence[str], parser: argparse.ArgumentParser) -> typing.NoReturn:
    """argparse's "unrecognized arguments" error, naming the closest option to each unknown one (as the Python
    classes name the closest setting)."""
    options = [option for option in parser._option_string_actions if option.startswith("--")]
    hints = [
        f"did you mean {close[0]}?"
        for typed in unknown
        if typed.startswith("--") and (close := difflib.get_close_matches(typed.split("=")[0], options, n=1))
    ]
    parser.error(" ".join([f"unrecognized arguments: {' '.join(unknown)}", *hints]))


def out_of_memory_message(error: RuntimeError) -> str | None:
    """One line for an allocation that failed (torch's CPU allocator, or a GPU's out-of-memory error), saying what
    to change; ``None`` for any other error."""
    text = str(error)
    if type(error).__name__ != "OutOfMemoryError" and "can't allocate memory" not in text:
        return None
    detail = text.split("DefaultCPUAllocator: ")[-1].splitlines()[0]
    return (
        f"out of memory ({detail}); use --cache-mode window (LM-Infinite), a smaller document, a smaller "
        "--chunk-size, or a machine (or limit) with more memory"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _refuse_unknown(unknown, args.command_parser)
    command = cmd_ask if args.command == "ask" else cmd_encode
    try:
        return command(args, args.command_parser)
    except BrokenPipeError:  # the reader left (`lminf ask ... | head`): nothing more to write, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush fails silently
        return 1
    except (OSError, ValueError, MemoryError) as error:  # a model that does not load, settings it refuses, no room
        raise SystemExit(f"lminf: error: {error}") from None
    except RuntimeError as error:  # torch's allocators fail with RuntimeErrors
        message = out_of_memory_message(error)
        if message is None:
            raise
        raise SystemExit(f"lminf: error: {message}") from None
    except KeyboardInterrupt:  # Ctrl-C: the work has stopped (at its next chunk); no traceback for it
        print("\nlminf: interrupted", file=sys.stderr)
        return 130  # what a shell reports for a command ended by SIGINT


if __name__ == "__main__":
    sys.exit(main())
