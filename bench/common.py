"""Shared pieces of the benchmarks: the evaluation text, result files, a memory probe."""

from __future__ import annotations

import os
import pydoc_data.topics
import threading
import time
from collections.abc import Iterator
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
