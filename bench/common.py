"""Shared pieces of the benchmarks: the evaluation text, the command line (argument types, help, the command written
into the results), result files, a memory probe."""

from __future__ import annotations

import argparse
import json
import math
import os
import pydoc_data.topics
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

RESULTS = Path(__file__).resolve().parent / "results"


def pydoc_text() -> str:
    """Python's own ``pydoc_data.topics`` (in every CPython), topics in sorted order: ~113K SmolLM2 tokens."""
    return "\n\n".join(pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics))


def token_ids(tokenizer: PreTrainedTokenizerBase, n_tokens: int, text: str | None = None) -> list[int]:
    """The first ``n_tokens`` of ``text`` (default: :func:`pydoc_text`), repeated if it is shorter (for the
    pydoc text only needed beyond ~113K tokens)."""
    ids: list[int] = list(tokenizer(text or pydoc_text(), add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError("the text is empty")
    while len(ids) < n_tokens:
        ids = ids + ids
    return ids[:n_tokens]


def write_result(name: str, text: str, folder: Path = RESULTS) -> Path:
    """Write ``text`` to ``folder/name`` (``bench/results`` by default; tests pass a temporary folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def write_json(name: str, payload: object, folder: Path = RESULTS) -> Path:
    """``payload`` as strict JSON in ``folder/name``: a NaN or infinity raises ``ValueError`` before anything is
    written (bare ``NaN`` is not JSON, and other readers refuse it); a value not measured is ``None`` (null)."""
    text = json.dumps(payload, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    return write_result(name, text, folder)


def finite_or_none(value: float | None) -> float | None:
    """``value``, or ``None`` where it is not a finite number (not measured, or no meaningful rate): for JSON."""
    return value if value is not None and math.isfinite(value) else None


def results_payload(command: str, **fields: Any) -> dict[str, Any]:
    """A results JSON object: the command that wrote it and the machine it ran on, then ``fields`` (the rows)."""
    return {"command": command, "machine": machine_line(), **fields}


# ---- the command line -------------------------------------------------------------------------------------------
def command_line(name: str, argv: Sequence[str] | None) -> str:
    """The command that was run, as the results record it: ``python -m bench <name>`` and the arguments given
    (``None``: this process's own, as argparse reads them), quoted so that a shell gives them back unchanged."""
    given = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m bench", name, *([shlex.join(given)] if given else [])])


def length_label(n_tokens: int) -> str:
    """A length as a column label, exact: ``1K``, ``1.5K``, ``128K``; the token count where K would need more than two
    decimals or under 1024 (``100``, ``5000``): ``n // 1024`` labelled 100 tokens "0K" and 1536 "1K"."""
    if n_tokens >= 1024 and n_tokens * 100 % 1024 == 0:
        return f"{n_tokens / 1024:g}K"
    return str(n_tokens)


def _int_at_least(text: str, minimum: int, why: str = "") -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise argparse.ArgumentTypeError(f"must be {kind}{why}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a count, length, number of tokens or steps, repeats (an integer >= 1)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (a layer index, a number of global tokens, top-k, a seed)."""
    return _int_at_least(text, 0)


def int_at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer ``>= minimum``; ``why`` (" (one 2048-token bucket)") ends the refusal."""

    def parse(text: str) -> int:
        return _int_at_least(text, minimum, why)

    return parse


def _number(text: str) -> float:
    """``text`` as a float; NaN (refused by every check below) where it is not a number."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (seconds)."""
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1] (a depth, a probability)."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def existing_file(text: str) -> Path:
    """An argparse type: a file that exists (checked up front, not after the model has loaded)."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def ensure_writable(folder: Path) -> Path:
    """``folder``, created if missing and written to once (a probe file, removed): raises ``OSError`` where results
    could not be written there, so that the run is refused before it starts, not after it has measured everything."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
        pass
    return folder


def first_paragraph(doc: str | None) -> str:
    """A module docstring's first paragraph as one line: a command's ``--help`` description, whole."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default shown once: appended as argparse does, unless the help already says it (a default
    worked out at run time, ``None`` here, is described in words as ``default: ...``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None:
            return text
        return super()._get_help_string(action)


class BenchParser(argparse.ArgumentParser):
    """A command's parser: once the arguments are read, its ``--results`` folder is checked (:func:`ensure_writable`),
    and one that cannot take the results is an argument error like any other. A ``--one`` measurement (a subprocess
    of a run, which writes nothing) is not checked: its parent's folder may not be the default one."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        folder = getattr(parsed, "results", None)
        if folder is not None and not getattr(parsed, "one", None):
            try:
                ensure_writable(Path(folder))
            except OSError as error:
                self.error(f"argument --results: cannot write results to {folder}: {error.strerror or error}")
        return parsed, extras


def make_parser(name: str, doc: str | None) -> BenchParser:
    """The parser of ``python -m bench <name>``: the docstring's first paragraph as its description, defaults shown."""
    return BenchParser(
        prog=f"python -m bench {name}", description=first_paragraph(doc), formatter_class=HelpFormatter
    )


def add_results(parser: argparse.ArgumentParser, what: str) -> None:
    """``--results DIR``, checked up front by :class:`BenchParser`; ``what``: the files written there."""
    parser.add_argument(
        "--results", type=Path, default=RESULTS, metavar="DIR",
        help=f"folder for {what}; created if missing (default: bench/results)",
    )  # fmt: skip


# What load_model takes ("auto": the fastest dtype at float32's quality here): the commands that load a model.
MODEL_DTYPES = ("auto", "bf16", "fp32", "fp16")


def add_dtype(parser: argparse.ArgumentParser, choices: Sequence[str] = MODEL_DTYPES, default: str = "bf16") -> None:
    parser.add_argument("--dtype", default=default, choices=list(choices), help="the model's dtype")


def cpu_line() -> str:
    """The CPU model and its class as PyTorch uses it (AMX, AVX-512 BF16, AVX2...): timings differ ~3x per class."""
    from lminf_integrations.cpu import cpu_info

    return cpu_info().describe()


def machine_line() -> str:
    import torch

    return (
        f"{cpu_line()}, {os.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}"
    )


@contextmanager
def peak_rss() -> Iterator[dict[str, float]]:
    """Sample this process's resident memory every 20 ms; ``result['peak_gib']`` is the rise over the start."""
    process = psutil.Process()
    start = process.memory_info().rss
    result = {"peak_gib": 0.0}
    stop = threading.Event()

    def sample() -> None:
        peak = start
        while not stop.is_set():
            peak = max(peak, process.memory_info().rss)
            stop.wait(0.02)
        result["peak_gib"] = (peak - start) / 2**30

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for ``k`` successes in ``n`` trials (95% with the default ``z``).

    Unlike ``p ± z·sqrt(p(1-p)/n)`` it stays inside [0, 1] and is not empty at 0/n or n/n, which is what small
    benchmark cells give: 0/10 → (0, 0.2775), 5/10 → (0.2366, 0.7634). ``n == 0`` (nothing asked) → (0, 1).
    """
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z / denominator * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5
    # At k = 0 (k = n) the lower (upper) end is exactly 0 (1); rounding would leave it a hair off.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def rate(k: int, n: int) -> str:
    """``k/n (lo–hi%)``: a count with its 95% Wilson interval in whole percent; ``–`` when nothing was asked."""
    if n == 0:
        return "–"
    low, high = wilson(k, n)
    return f"{k}/{n} ({100 * low:.0f}–{100 * high:.0f}%)"


class StepClock(BaseStreamer):
    """A streamer that notes when ``generate`` emitted: the prompt first, then each new token (after the device's
    queued work, where it is a GPU, so each time is when the token was computed)."""

    def __init__(self, device: Any = None) -> None:
        self.device = device
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        if self.device is not None and torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@contextmanager
def decode_kernel_set(enabled: bool) -> Iterator[None]:
    """``LMINF_DECODE_KERNEL`` set for the duration (the C++ CPU decoding kernel on or off), then restored."""
    previous = os.environ.get("LMINF_DECODE_KERNEL")
    os.environ["LMINF_DECODE_KERNEL"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["LMINF_DECODE_KERNEL"]
        else:
            os.environ["LMINF_DECODE_KERNEL"] = previous
