"""The GPU check (issue 19), one command, no download: every strategy exact on the device, a model split over GPU
and CPU, then speed and memory of a large model's shape.

    python -m bench gpu                              # on a CUDA machine (make gpu-check does the same)
    python -m bench gpu --device cpu --quick         # the same steps on a CPU, tiny shapes (the suite runs this)

1. **Exactness**: tiny random Llama, Mistral, Qwen2 and Qwen3 models (grouped-query attention) on the device, in
   float32 and bfloat16 (float32 only on a CPU): LM-Infinite (window cache; full cache with top-k) and Dual Chunk
   Attention against the independent dense references of ``tests/unit_tests`` (run on the device too), prefill in
   chunks then decoding; XL3M's answer on the device against the same engine's on the CPU; with compiled decoding
   (``--compiled-decode``, default on a GPU), LM-Infinite's compiled steps (CUDA graphs on a GPU) against eager ones
   fed the same tokens, for two caches in turn. Tolerances: ``tests.tolerances.network_bound`` for the dtype.
2. **Split**: the model shape with ``--split-layers`` layers saved to a temporary folder, loaded whole on the device
   and with ``device_map="auto"`` and a ``max_memory`` that leaves about half the layers to the CPU; logits of both,
   unpatched and with LM-Infinite (one forward, and through the window cache), must agree within the dtype's
   tolerance.
3. **Speed and memory**: a random-weight model with a real large model's shape (default: Llama-3-8B's, 32 layers,
   hidden 4096, 32 query and 8 key/value heads, bf16 — weights do not change speed), vanilla (transformers' SDPA,
   one forward, DynamicCache) against LM-Infinite (window cache, prefill in ``--chunk`` steps): prefill tokens/s,
   decoding tokens/s and peak device memory beyond the weights. Decoding is timed eager, and with
   ``--compiled-decode`` compiled too, each mode its fastest way in transformers: LM-Infinite's
   ``compile_decode=True`` steps, vanilla's from a ``StaticCache`` (at the compared lengths; each length compiles
   anew). Rows run in the order :func:`speed_plan` gives: the compared ``--lengths`` and LM-Infinite at
   ``--max-tokens``, which the targets read and which always run, then the doublings between while ``--time-limit``
   (the whole check's) and the device's memory last.

The short steps come before the open-ended one, and the report is written after each step and speed row, so a run
stopped by a time limit keeps what it did. A step that raises is reported with its error and the others still run
(one run on a lent GPU should bring back all it can); the command then exits with status 1, as it does when a check
fails. Writes ``gpu.md`` and ``gpu.json`` to ``bench/results/`` (``--results DIR`` elsewhere).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedModel, StaticCache

from bench.common import (
    StepClock,
    add_results,
    command_line,
    decode_kernel_set,
    finite_or_none,
    int_at_least,
    machine_line,
    make_parser,
    positive_float,
    positive_int,
    results_payload,
    write_json,
    write_result,
)
from lminf_integrations import DCAConfig, LMInfiniteConfig, models, new_cache, patch_model, unpatch_model
from lminf_integrations.config import GenerationSettings, XL3MConfig
from lminf_integrations.engine import Engine
from lminf_integrations.hf_compat import cache_kwargs
from lminf_integrations.models import load_model, load_tokenizer
from lminf_integrations.ops import flex
from tests.tolerances import network_bound
from tests.unit_tests import dca_reference, reference
from tests.unit_tests.test_attention import ARCHITECTURES, LAYERS, REDUCTION, _ids, _tiny

LLAMA3_8B: dict[str, Any] = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
)  # fmt: skip
TINY_SHAPE: dict[str, Any] = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512,
)  # fmt: skip
SHAPES: dict[str, dict[str, Any]] = {"llama3-8b": LLAMA3_8B, "tiny": TINY_SHAPE}
# How a mode's prefill time grows with the number of tokens: vanilla's attention is quadratic, LM-Infinite's linear.
GROWTH = {"vanilla": 2.0, "lm-infinite": 1.0}
T = TypeVar("T")


@dataclass
class Check:
    """One exactness comparison: the largest error against its bound."""

    what: str
    dtype: str
    error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound


@dataclass
class SpeedRow:
    mode: str
    tokens: int
    prefill_s: float
    prefill_tok_s: float
    decode_tok_s: float
    peak_gib: float  # device memory beyond the weights (CPU: resident memory rise)
    compiled_decode_tok_s: float | None = None  # compiled steps through generate (vanilla's: on a StaticCache)
    compiled_error: str | None = None  # why the compiled steps failed ("Error: message"); the eager numbers stand


@dataclass
class Report:
    device: str
    checks: list[Check] = field(default_factory=list)
    speed: list[SpeedRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    split: list[Check] = field(default_factory=list)
    split_layout: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # steps that raised: "what: Error: message"
    ended: dict[str, float] = field(default_factory=dict)  # seconds from the start at which each step ended

    @property
    def ok(self) -> bool:
        return not self.errors and all(c.ok for c in self.checks + self.split)

    def note_flex_attention(self) -> None:
        """FlexAttention that did not compile counts as a failure: attention was exact, but not the kernel meant."""
        failure = f"FlexAttention did not compile: {flex.COMPILE_FAILURE}"
        if flex.COMPILE_FAILURE and failure not in self.errors:
            self.errors.append(failure)


class RecompileLimitWatch(logging.Handler):
    """Keeps dynamo's "hit config.recompile_limit" warnings while in use (``with``). Past the limit a compiled
    function runs uncompiled for new shapes and dtypes with only that log line: FlexAttention would then compute
    every logit, and its times would no longer be the kernel's."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.hits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "recompile_limit" in message:
            self.hits.append(" ".join(line.strip() for line in message.splitlines()[:2]))  # the limit, the function

    def __enter__(self) -> RecompileLimitWatch:
        logging.getLogger("torch._dynamo").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("torch._dynamo").removeHandler(self)


def guarded(
    report: Report, what: str, step: Callable[[], T], let_through: tuple[type[Exception], ...] = ()
) -> T | None:
    """``step()``, or None with its error in ``report.errors`` (traceback on stderr): one failing step of a run on a
    lent GPU must not cost the others. Interrupts (a time limit) and ``let_through`` still propagate."""
    try:
        return step()
    except let_through:
        raise
    except Exception as error:
        traceback.print_exc()
        report.errors.append(f"{what}: {type(error).__name__}: {error}")
        return None


# ---- 1. exactness ---------------------------------------------------------------------------------------------
def _logits_through_cache(
    model: PreTrainedModel, ids: torch.Tensor, cache: Any, chunk: int, prompt: int
) -> torch.Tensor:
    """Logits of ``ids``: the prompt ``chunk`` tokens at a time through ``cache``, then one token at a time."""
    pieces = [model(ids[:, s : min(s + chunk, prompt)], **cache_kwargs(cache)).logits for s in range(0, prompt, chunk)]
    for position in range(prompt, ids.shape[1]):
        pieces.append(model(ids[:, position : position + 1], **cache_kwargs(cache)).logits)
    return torch.cat(pieces, dim=1)


def _with_attention(model: PreTrainedModel, name: str, ids: torch.Tensor) -> torch.Tensor:
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        return model(ids).logits
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def exactness(
    device: torch.device, dtypes: list[torch.dtype], tokenizer: Any, compiled: bool, report: Report
) -> None:
    """Appends to ``report.checks`` each strategy's comparison per architecture and dtype; a group that raises is
    reported and the others run."""
    for dtype in dtypes:
        for arch in ARCHITECTURES:
            what = f"{arch} ({_dtype_name(dtype)})"
            checks = guarded(report, what, partial(_architecture_checks, arch, device, dtype))
            report.checks += checks or []
    xl3m = guarded(report, "xl3m", partial(_xl3m_check, device, tokenizer))
    report.checks += [xl3m] if xl3m else []
    for dtype in dtypes if compiled else []:
        what = f"compiled decoding ({_dtype_name(dtype)})"
        check = guarded(report, what, partial(_compiled_decoding_check, device, dtype))
        report.checks += [check] if check else []


@torch.no_grad()
def _architecture_checks(arch: str, device: torch.device, dtype: torch.dtype) -> list[Check]:
    """LM-Infinite (window cache; full cache with top-k) and Dual Chunk Attention on a tiny ``arch`` model on
    ``device`` against the dense references run there."""
    checks = []
    model = _tiny(arch).to(device=device, dtype=dtype)  # type: ignore[call-arg]
    ids = _ids(36, seed=1).to(device)
    cases: list[tuple[str, LMInfiniteConfig | DCAConfig]] = [
        ("lm-infinite window", LMInfiniteConfig(n_global=3, n_local=8)),
        ("dca", DCAConfig(chunk_size=12, local_window=4)),
    ]
    try:
        for what, config in cases:
            patch_model(model, config)
            name = dca_reference.DCA_REFERENCE_NAME if isinstance(config, DCAConfig) else reference.REFERENCE_NAME
            reference.TOP_K_FROM_POSITION[0] = None
            expected = _with_attention(model, name, ids)
            got = _logits_through_cache(model, ids, new_cache(model), chunk=5, prompt=30)
            bound = network_bound(expected.float(), dtype, REDUCTION, LAYERS)
            checks.append(Check(f"{arch}: {what}", _dtype_name(dtype), _error(got, expected), bound))
        # Top-k middle keys (full cache): generation-time queries only, each against a fresh reference run.
        patch_model(model, LMInfiniteConfig(n_global=3, n_local=8, top_k=2, top_k_from_layer=1, cache_mode="full"))
        cache = new_cache(model)
        cache.set_prompt_length(30)  # type: ignore[union-attr]
        got = _logits_through_cache(model, ids, cache, chunk=5, prompt=30)
        reference.TOP_K_FROM_POSITION[0] = 29
        errors, bounds = [], []
        for position in range(30, ids.shape[1]):
            expected = _with_attention(model, reference.REFERENCE_NAME, ids[:, : position + 1])[:, -1]
            errors.append(_error(got[:, position], expected))
            bounds.append(network_bound(expected.float(), dtype, REDUCTION, LAYERS))
        checks.append(Check(f"{arch}: lm-infinite full + top-k", _dtype_name(dtype), max(errors), min(bounds)))
    finally:
        reference.TOP_K_FROM_POSITION[0] = None
        unpatch_model(model)
    return checks


@torch.no_grad()
def _compiled_decoding_check(device: torch.device, dtype: torch.dtype) -> Check:
    """LM-Infinite's compiled decoding steps (``compile_decode=True``: CUDA graphs on a GPU) give the eager steps'
    logits, for two caches one after the other (the second question reuses the compiled step on other buffers), on a
    tiny Llama whose window fills up during the steps. The eager steps are fed the tokens the compiled ones chose:
    a near-tie in bf16 must not send the two down different tokens, which would compare unlike steps."""
    from torch._dynamo.utils import counters

    from lminf_integrations.compiled import compiled_step_errors, generate_kwargs, inductor_settings

    model = _tiny("llama").to(device=device, dtype=dtype)  # type: ignore[call-arg]
    patch_model(model, LMInfiniteConfig(n_global=2, n_local=16, chunk_size=8))

    graphs = [0]  # graphs compiled by the steps (not the prefill's: on CUDA, FlexAttention compiles too)

    def compiled_steps(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = new_cache(model)
        cache.allow_compiled_steps(True)  # type: ignore[union-attr]
        model.model(ids[:, :-1], **cache_kwargs(cache))
        before = counters["stats"]["unique_graphs"]
        with inductor_settings(True, device), compiled_step_errors(True, "the tiny Llama"):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=24,
                                 min_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=0, **generate_kwargs(True, device))  # fmt: skip
        graphs[0] += counters["stats"]["unique_graphs"] - before
        return torch.stack(out.logits).float(), out.sequences  # raw logits: scores carry min_new_tokens' -inf

    def eager_steps(sequence: torch.Tensor, prompt: int) -> torch.Tensor:
        cache = new_cache(model)
        model.model(sequence[:, : prompt - 1], **cache_kwargs(cache))
        steps = range(prompt - 1, sequence.shape[1] - 1)
        return torch.stack([model(sequence[:, p : p + 1], **cache_kwargs(cache)).logits[:, -1] for p in steps]).float()

    errors, bounds = [], []
    for seed in (1, 2):
        ids = _ids(10, seed=seed).to(device)
        compiled, sequence = compiled_steps(ids)
        eager = eager_steps(sequence, ids.shape[1])
        errors.append(_error(compiled, eager))
        bounds.append(network_bound(eager, dtype, REDUCTION, LAYERS))
    unpatch_model(model)
    if not graphs[0]:  # the steps ran eagerly: nothing was checked
        errors.append(float("inf"))
    return Check("llama: lm-infinite compiled decoding vs eager", _dtype_name(dtype), max(errors), min(bounds))


def _xl3m_check(device: torch.device, tokenizer: Any) -> Check:
    """XL3M's answer and choice on the device equal the CPU's (float32, a tiny model trained to 256 tokens)."""
    from tests.tiny_models import tiny_llama

    text = "\n\n".join(f"Room {i} is on floor {i % 7}. Its code is {1000 + i}." for i in range(60))
    prompt = text + "\n\nQuestion: what is the code of room 17?\nAnswer:"
    answers = []
    for where in (torch.device("cpu"), device):
        model = tiny_llama(tokenizer, 2, 256).to(where)  # type: ignore[arg-type]
        engine = Engine(model=model, tokenizer=tokenizer, strategy="xl3m", xl3m=XL3MConfig(segment_tokens=64),
                        reuse_prefixes=False)  # fmt: skip
        with engine.stream(prompt, GenerationSettings(max_new_tokens=8), question_tokens=12) as stream:
            answer = "".join(stream)
        chosen = stream.result.details["xl3m"]["chosen"] if stream.result and stream.result.details else []
        answers.append((answer, [c["start"] for c in chosen]))
    return Check("xl3m: answer and chosen segments as on the CPU", "fp32", float(answers[0] != answers[1]), 0.0)


def _error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected.double()).abs().max())


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# ---- 2. speed and memory --------------------------------------------------------------------------------------
def random_model(shape: dict[str, Any], device: torch.device, dtype: torch.dtype, layers: int | None = None) -> Any:
    """A model of ``shape`` with random weights, built on ``device`` in ``dtype`` (no float32 copy on the way)."""
    config = LlamaConfig(**{**shape, **({"num_hidden_layers": layers} if layers else {})})
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    return model


def _memory_now(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(model: Any, mode: str, ids: torch.Tensor, chunk: int) -> None:
    """The same kind of prefill and a decoding step on a throwaway cache, untimed: on CUDA the band's FlexAttention
    kernels compile for each shape on first use (the window filling up, then full), and the libraries initialise."""
    cache: Any = DynamicCache(config=model.config) if mode == "vanilla" else new_cache(model)
    step = ids.shape[1] if mode == "vanilla" else chunk
    for s in range(0, ids.shape[1], step):
        model.get_decoder()(input_ids=ids[:, s : s + step], **cache_kwargs(cache))
    model(input_ids=ids[:, -1:], **cache_kwargs(cache), logits_to_keep=1)
    del cache


def _compiled_decode(model: Any, cache: Any, steps: int, device: torch.device) -> float:
    """Tokens/s of ``steps`` decoding steps through ``generate`` with the package's compile settings for the device
    (CUDA graphs on a GPU), continuing ``cache``: LM-Infinite's steady window cache (``compile_decode=True``), or
    vanilla's :func:`static_copy`. A first, untimed call compiles (and on CUDA records the graphs); the window cache
    has one shape, so later lengths reuse its compile, while each static cache's length compiles anew."""
    from lminf_integrations.compiled import compiled_step_errors, generate_kwargs, inductor_settings

    rate = 0.0
    for new_tokens in (3, steps + 1):
        # generate reads only the prompt's tokens past the cache: their values do not matter for speed.
        prompt = torch.randint(0, model.config.vocab_size, (1, int(cache.get_seq_length()) + 1), device=device)
        clock = StepClock(device)
        with inductor_settings(True, device), compiled_step_errors(True, "the speed model"):
            model.generate(prompt, attention_mask=torch.ones_like(prompt), **cache_kwargs(cache),
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                           pad_token_id=0, **generate_kwargs(True, device))  # fmt: skip
        rate = (new_tokens - 1) / (clock.times[-1] - clock.times[1])  # times[1]: the first new token
    return rate


def static_copy(cache: DynamicCache, config: Any, room: int) -> StaticCache:
    """``cache``'s keys and values in a :class:`~transformers.StaticCache` with ``room`` free positions: vanilla's own
    way to compiled decoding in transformers (fixed shapes, so ``generate`` compiles its steps, with CUDA graphs on a
    GPU). Each step then attends over the whole static length, so ``room`` is kept to what the steps need."""
    static = StaticCache(config=config, max_cache_len=int(cache.get_seq_length()) + room)
    for layer, source in zip(static.layers, cache.layers, strict=True):
        layer.update(source.keys, source.values)
    return static


@torch.inference_mode()
def measure(
    model: Any,
    mode: str,
    n_tokens: int,
    chunk: int,
    decode_steps: int,
    device: torch.device,
    n_local: int = 4096,
    compiled: bool = False,
) -> SpeedRow:
    decoder = model.get_decoder()
    ids = torch.randint(0, model.config.vocab_size, (1, n_tokens), device=device)
    if mode == "vanilla":
        unpatch_model(model)
        cache: Any = DynamicCache(config=model.config)
    else:
        patch_model(model, LMInfiniteConfig(n_local=n_local, cache_mode="window", chunk_size=chunk))
        cache = new_cache(model)
    _warm_up(model, mode, ids[:, : min(n_tokens, n_local + 2 * chunk)], chunk)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else _memory_now(device)
    _sync(device)
    started = time.perf_counter()
    if mode == "vanilla":
        decoder(input_ids=ids, **cache_kwargs(cache))
    else:
        for s in range(0, n_tokens, chunk):
            decoder(input_ids=ids[:, s : s + chunk], **cache_kwargs(cache))
    _sync(device)
    prefill_s = time.perf_counter() - started
    token = ids[:, -1:]
    model(input_ids=token, **cache_kwargs(cache), logits_to_keep=1)  # first step outside the timing
    _sync(device)
    started = time.perf_counter()
    for _ in range(decode_steps):
        token = model(input_ids=token, **cache_kwargs(cache), logits_to_keep=1).logits[:, -1:].argmax(-1)
    _sync(device)
    decode_s = time.perf_counter() - started
    peak = _memory_now(device) - base
    row = SpeedRow(mode, n_tokens, prefill_s, n_tokens / prefill_s, decode_steps / decode_s, peak)
    if compiled:  # the compiled steps after the peak: CUDA graphs keep a memory pool of their own
        try:
            if mode == "vanilla":
                cache = static_copy(cache, model.config, room=decode_steps + 8)  # two generate calls: 3 + steps + 1
            else:
                cache.allow_compiled_steps(True)
            row.compiled_decode_tok_s = _compiled_decode(model, cache, decode_steps, device)
        except Exception as error:  # the numbers above stand: speed() reports this one as the row's error
            traceback.print_exc()
            row.compiled_error = f"{type(error).__name__}: {error}"
    del cache
    return row


def speed_plan(lengths: list[int], max_tokens: int) -> list[tuple[str, int]]:
    """The timed rows in the order they run: both modes at each compared length, then LM-Infinite at ``max_tokens``
    (its longest) — the rows the targets read, the first :func:`n_target_rows` — then the doublings past the last
    compared length, both modes at each, shortest first, up to ``max_tokens``."""
    if not lengths or min(lengths) < 1 or max_tokens < 1:  # doubling from 0 (or below) never reaches max_tokens
        raise ValueError(f"lengths and max_tokens must be positive, got {lengths} and {max_tokens}")
    plan = [(mode, n) for n in lengths for mode in GROWTH]
    plan += [("lm-infinite", max_tokens)] if max_tokens > max(lengths) else []
    n = max(lengths) * 2
    while n <= max_tokens:
        plan += [(mode, n) for mode in GROWTH if (mode, n) not in plan]
        n *= 2
    return plan


def n_target_rows(lengths: list[int], max_tokens: int) -> int:
    """How many of :func:`speed_plan`'s first rows the targets read (they run whatever the time limit)."""
    return len(lengths) * len(GROWTH) + (max_tokens > max(lengths))


def speed(
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    report: Report,
    deadline: float,
    progress: Callable[[], None] = lambda: None,
) -> None:
    """Runs :func:`speed_plan`'s rows into ``report.speed`` (``progress()`` after each). The rows the targets read
    always run; another is skipped where its prefill, predicted from its mode's last row by :data:`GROWTH`, would
    end past ``deadline`` (a ``time.perf_counter()`` value). A mode that ran out of device memory runs no longer
    rows."""
    # The exactness step compiled FlexAttention for many small shapes and dtypes; past dynamo's recompile limit a new
    # shape would run uncompiled (every logit materialised), so the timed shapes start from an empty compile cache.
    torch._dynamo.reset()
    model = random_model(SHAPES[args.shape], device, dtype)
    last: dict[str, SpeedRow] = {}
    out_of_memory: dict[str, int] = {}
    targets = n_target_rows(args.lengths, args.max_tokens)
    for index, (mode, n) in enumerate(speed_plan(args.lengths, args.max_tokens)):
        if n >= out_of_memory.get(mode, n + 1):
            continue
        if index >= targets and mode in last:
            predicted = last[mode].prefill_s * (n / last[mode].tokens) ** GROWTH[mode]
            left = deadline - time.perf_counter()
            if predicted > left:
                report.skipped.append(
                    f"{mode} at {n} tokens (predicted {predicted:.0f} s, {max(left, 0):.0f} s of the time limit left)"
                )
                continue
        # Vanilla's compiled steps compile anew for each length (its static cache's): only at the compared lengths.
        compiled = args.compiled_decode and (mode != "vanilla" or n in args.lengths)
        try:
            row = guarded(report, f"{mode} at {n} tokens", partial(
                measure, model, mode, n, args.chunk, args.decode_steps, device, args.n_local, compiled),
                let_through=(torch.OutOfMemoryError,))  # fmt: skip
        except torch.OutOfMemoryError:  # a finding here (the longest that fits), not a failure
            report.skipped.append(f"{mode} at {n} tokens (out of device memory)")
            out_of_memory[mode] = n
            row = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if row is not None:
            report.speed.append(row)
            if row.compiled_error:
                report.errors.append(f"{mode} at {n} tokens, compiled decoding: {row.compiled_error}")
            last[mode] = row
            print(f"{mode:12s} {n:8d} tokens: {asdict(row)}", flush=True)
        progress()
    unpatch_model(model)
    del model


# ---- 3. split over devices ------------------------------------------------------------------------------------
@torch.no_grad()
def split_budget(model: PreTrainedModel) -> int:
    """GPU bytes for a ``device_map="auto"`` load that puts the embedding and half the layers on the GPU, the rest on
    the CPU. accelerate keeps room on the GPU for the largest module that may be offloaded (the output head) and a
    little more, so the budget holds the head and half a layer besides."""
    def size(module: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    layers = model.model.layers  # type: ignore[union-attr]
    layer = size(layers[0])
    head = size(model.get_output_embeddings())  # type: ignore[arg-type]
    return size(model.get_input_embeddings()) + head + layer * (len(layers) // 2) + layer // 2


def split(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, report: Report, tokenizer: Any) -> None:
    model = random_model(SHAPES[args.shape], torch.device("cpu"), dtype, layers=args.split_layers)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        vocab_size = model.config.vocab_size
        del model
        try:
            _compare_split(args, folder, device, dtype, report, torch.randint(0, vocab_size, (1, args.split_tokens)))
        finally:  # load_model keeps what it loaded: the two copies would hold the GPU's memory through the speed step
            for key in [key for key in models._loaded if key[0].startswith(str(Path(folder).resolve()))]:
                del models._loaded[key]


def _compare_split(
    args: argparse.Namespace, folder: str, device: torch.device, dtype: torch.dtype, report: Report, ids: torch.Tensor
) -> None:
    """Logits of the model in ``folder`` loaded whole on ``device`` vs split by a device map."""
    whole, _ = load_model(folder, _dtype_name(dtype), device=str(device))
    if device.type == "cuda":
        placed, _ = load_model(folder, _dtype_name(dtype), device_map="auto",
                               max_memory={0: split_budget(whole), "cpu": "64GiB"})  # fmt: skip
    else:  # one device: every layer named, the device_map path still taken
        names = ["model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"]
        names += [f"model.layers.{i}" for i in range(args.split_layers)]
        placed, _ = load_model(folder, _dtype_name(dtype), device_map=dict.fromkeys(names, "cpu"))
    layout = getattr(placed, "hf_device_map", {}) or {}
    report.split_layout = {str(d): sum(1 for v in layout.values() if v == d) for d in set(layout.values())}
    if device.type == "cuda" and len(report.split_layout) < 2:
        raise RuntimeError(f"max_memory did not split the model: {layout}")
    # The window cache's layers live where their attention runs: prefill in chunks, then decoding steps.
    window = max(16, args.split_tokens // 4)
    cases: list[tuple[str, LMInfiniteConfig | None, bool]] = [
        ("unpatched", None, False),
        ("lm-infinite", LMInfiniteConfig(n_global=4, n_local=256), False),
        ("lm-infinite, window cache", LMInfiniteConfig(n_global=4, n_local=window), True),
    ]
    for what, config, cached in cases:
        logits = []
        for m, inputs in ((whole, ids.to(device)), (placed, ids)):
            patch_model(m, config) if config else unpatch_model(m)
            if cached:  # the CPU's decoding kernel would be built for the CPU's layers: not what this checks
                with decode_kernel_set(False):
                    logits.append(_logits_through_cache(m, inputs, new_cache(m), window // 2, ids.shape[1] - 8))
            else:
                logits.append(m(inputs).logits)
            unpatch_model(m)
        expected, got = (x.float().cpu() for x in logits)
        bound = network_bound(expected, dtype, SHAPES[args.shape]["intermediate_size"], args.split_layers + 1)
        report.split.append(Check(f"split vs whole: {what}", _dtype_name(dtype), _error(got, expected), bound))


# ---- report ---------------------------------------------------------------------------------------------------
def markdown(report: Report, args: argparse.Namespace) -> str:
    lines = [
        f"# GPU check ({report.device}), `{command_line('gpu', args.argv)}`",
        "",
        f"{machine_line()}; device: {report.device}; float32 matrix products: "
        f"{torch.get_float32_matmul_precision()} precision"
        + (", TF32 forced by TORCH_ALLOW_TF32_CUBLAS_OVERRIDE" if os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")
           else "") + ".",  # fp32 bounds assume full precision
        "",
        "Steps ended at: " + (", ".join(f"{step} {t:.0f} s" for step, t in report.ended.items()) or "–")
        + f" (time limit {args.time_limit:.0f} s).",
        "",
        "## Exactness (tiny random models, against the dense references)",
        "",
        "| model: strategy | dtype | max error | bound | |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {c.what} | {c.dtype} | {c.error:.3g} | {c.bound:.3g} | {'ok' if c.ok else 'FAIL'} |"
              for c in report.checks]  # fmt: skip
    lines += [
        "",
        f"## Speed and memory ({args.shape} shape, random weights, {args.dtype}; LM-Infinite prefill in "
        f"{args.chunk}-token steps, n_local={args.n_local}, window cache; {args.decode_steps} decoding steps)",
        "",
        f"LM-Infinite's band on {args.device}: "
        + ("FlexAttention, compiled (`ops/flex.py`)" if flex.applies(torch.device(args.device)) else
           "PyTorch's CPU flash kernel" if args.device == "cpu" else
           f"exact unfused kernels, FlexAttention did not compile ({flex.COMPILE_FAILURE})")
        + ". Each row follows an untimed warm-up of the same kind (kernel compiles happen there).",
        "",
        "Decode tok/s: eager forward calls, one token each. Compiled: steps through `generate` with the package's "
        "compile settings for the device (CUDA graphs on a GPU), after an untimed compile; LM-Infinite's "
        "`compile_decode=True` steps on its window cache, vanilla's on a `StaticCache` copy of its cache with room "
        "for the steps (transformers' own compiled decoding; at the compared lengths only).",
        "",
        "| mode | tokens | prefill s | prefill tok/s | decode tok/s | compiled decode tok/s | peak memory beyond "
        "weights GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.mode} | {r.tokens} | {r.prefill_s:.3g} | {r.prefill_tok_s:.0f} | {r.decode_tok_s:.1f} | "
        f"{_compiled_cell(r)} | {r.peak_gib:.2f} |"
        for r in sorted(report.speed, key=lambda r: (r.mode != "vanilla", r.tokens))
    ]
    lines += [f"- not run: {s}" for s in report.skipped]
    lines += ["", "## Split over devices", "", f"Layers per device: {report.split_layout}", ""]
    lines += [f"- {c.what} ({c.dtype}): max error {c.error:.3g}, bound {c.bound:.3g}: {'ok' if c.ok else 'FAIL'}"
              for c in report.split]  # fmt: skip
    if not report.split:
        lines.append("- not run")
    if report.errors:
        lines += ["", "## Steps that raised", ""] + [f"- {e}" for e in report.errors]
    return "\n".join(lines) + "\n"


def _compiled_cell(row: SpeedRow) -> str:
    if row.compiled_error:
        return "failed (see errors)"
    return "–" if row.compiled_decode_tok_s is None else f"{row.compiled_decode_tok_s:.1f}"


def _check_json(check: Check) -> dict[str, Any]:
    # An error of inf marks a check that checked nothing (compiled steps that ran eagerly): null, and "ok" says so.
    return {**asdict(check), "error": finite_or_none(check.error), "ok": check.ok}


def _write(report: Report, args: argparse.Namespace) -> None:
    write_result("gpu.md", markdown(report, args), args.results)
    payload = results_payload(
        command_line("gpu", args.argv),
        checks=[_check_json(c) for c in report.checks],
        speed=[{k: finite_or_none(v) if isinstance(v, float) else v for k, v in asdict(r).items()}
               for r in report.speed],
        skipped=report.skipped,
        split=[_check_json(c) for c in report.split],
        layout=report.split_layout,
        errors=report.errors,
        ended=report.ended,
    )  # fmt: skip
    write_json("gpu.json", payload, args.results)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("gpu", __doc__)
    parser.add_argument("--device", default="cuda", help="where to run: cuda, cuda:N, or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and lengths (to test the check on a CPU)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="the timed model's shape (default: llama3-8b; tiny with --quick)")  # fmt: skip
    parser.add_argument(
        "--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
        help="the exactness step's second dtype (on a GPU), and the split and timed models'",
    )  # fmt: skip
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=None,
                        help="the lengths vanilla and LM-Infinite are compared at (default: 32768 131072; "
                        "quick: 256 512)")  # fmt: skip
    parser.add_argument(
        "--max-tokens", type=positive_int, default=None,
        help="LM-Infinite's longest row; doublings stop here (default: 1048576; quick: 1024)",
    )  # fmt: skip
    parser.add_argument("--chunk", type=positive_int, default=None,
                        help="LM-Infinite prefill step (default: 4096; quick: 128)")  # fmt: skip
    parser.add_argument("--decode-steps", type=positive_int, default=None,
                        help="decoding steps timed per row (default: 32; quick: 4)")  # fmt: skip
    parser.add_argument("--n-local", type=positive_int, default=None,
                        help="LM-Infinite window (default: 4096; quick: 128)")  # fmt: skip
    parser.add_argument(
        "--time-limit", type=positive_float, default=None,
        help="seconds for the whole check: timed rows predicted to end later are skipped (default: 360; quick: 120)",
    )  # fmt: skip
    parser.add_argument(
        "--compiled-decode", action=argparse.BooleanOptionalAction, default=None,
        help="also check LM-Infinite's compiled decoding (compile_decode=True) against eager steps, and time it and "
        "vanilla's (a StaticCache, at the compared lengths) (default: on a GPU)",
    )  # fmt: skip
    parser.add_argument(
        "--split-layers", type=positive_int, default=4, help="layers of the split model (the timed shape's width)"
    )
    # The split check decodes the last 8 tokens one at a time after a prefill of the rest.
    parser.add_argument("--split-tokens", type=int_at_least(16, " (a prefill and 8 decoding steps)"), default=None,
                        help="tokens of the split check (default: 512; quick: 64)")  # fmt: skip
    parser.add_argument(
        "--tokenizer", default=None,
        help="tokenizer folder or model id for the XL3M and split checks (default: the embedded default model's; "
        "a machine without it gets a folder from `make gpu-bundle`)",
    )  # fmt: skip
    add_results(parser, "gpu.md and gpu.json")
    return parser


def _or(value: T | None, default: T) -> T:
    """``value`` unless it was not given: ``x or default`` would also replace a 0 that was given."""
    return default if value is None else value


def main(argv: list[str] | None = None) -> Report:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else None  # None: this process's own arguments (command_line)
    quick = args.quick
    args.shape = _or(args.shape, "tiny" if quick else "llama3-8b")
    args.lengths = _or(args.lengths, [256, 512] if quick else [32768, 131072])
    args.max_tokens = _or(args.max_tokens, 1024 if quick else 1 << 20)
    args.chunk = _or(args.chunk, 128 if quick else 4096)
    args.decode_steps = _or(args.decode_steps, 4 if quick else 32)
    args.n_local = _or(args.n_local, 128 if quick else 4096)
    args.time_limit = _or(args.time_limit, 120.0 if quick else 360.0)
    args.split_tokens = _or(args.split_tokens, 64 if quick else 512)
    if args.compiled_decode is None:
        args.compiled_decode = args.device.startswith("cuda")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; run with --device cpu --quick to check the steps on a CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = Report(name)
    # The report is written after each step: a run stopped by a time limit (a lent GPU's) still leaves what it did.
    started = time.perf_counter()

    with RecompileLimitWatch() as watch:  # its hits are reported as errors of the step they came in

        def done(step: str) -> None:
            report.errors += [f"{step}: {hit}" for hit in watch.hits]
            watch.hits.clear()
            report.ended[step] = time.perf_counter() - started
            _write(report, args)
            print(f"{step} done ({report.ended[step]:.0f} s)", flush=True)

        tokenizer = load_tokenizer(args.tokenizer)
        dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, dtype]
        exactness(device, dtypes, tokenizer, args.compiled_decode, report)
        failed = [c.what for c in report.checks if not c.ok]
        print(f"exactness: {len(report.checks) - len(failed)}/{len(report.checks)} ok {failed or ''}", flush=True)
        report.note_flex_attention()
        done("exactness")
        guarded(report, "split", lambda: split(args, device, dtype, report, tokenizer))
        done("split")
        # The timed rows compile as a fresh process would: the exactness step's many tiny shapes and two dtypes count
        # against dynamo's recompile limit per function, past which FlexAttention would run uncompiled.
        torch._dynamo.reset()
        guarded(report, "speed", lambda: speed(args, device, dtype, report, started + args.time_limit,
                                               lambda: _write(report, args)))  # fmt: skip
        report.note_flex_attention()
        done("speed and memory")
    print(markdown(report, args))
    if not report.ok:
        print("FAILED: " + "; ".join([c.what for c in report.checks + report.split if not c.ok] + report.errors))
    return report


if __name__ == "__main__":
    main()
