"""The engine: chunked O(n) prefill into an LM-Infinite cache, then streamed generation with transformers.

Framework-free; the LangChain and LlamaIndex classes, the CLI and the benchmarks all go through it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import torch
from jinja2 import TemplateError
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from . import model_thread
from .compiled import compiled_step_errors, generate_kwargs, inductor_settings
from .config import (
    DCAConfig,
    DeviceMap,
    EngineOptions,
    GenerationSettings,
    LMInfiniteConfig,
    MaxMemory,
    XL3MConfig,
    merge_stop,
)
from .cpu import decodes_faster_without_onednn, onednn_off
from .hf_compat import cache_kwargs
from .models import dtype_name, eos_ids, input_device, layer_devices, load_model, model_name
from .settings import Resolved
from .state import DocumentState, StateStore, read_state, state_identity, write_state
from .strategies import DocumentCache, make_strategy
from .streaming import DeltaStreamer, ProgressCallback, StreamResult, TokenStream


class _DropLengthReminder(logging.Filter):
    """transformers warns once a generation passes max_position_embeddings: that is the point of LM-Infinite."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "predefined maximum length" not in record.getMessage()


logging.getLogger("transformers.generation.stopping_criteria").addFilter(_DropLengthReminder())

# Generation on one model copy is serialised: settings live on the modules, and CPU threads are shared anyway.
_model_locks: weakref.WeakKeyDictionary[PreTrainedModel, threading.RLock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def _lock_for(model: PreTrainedModel) -> threading.RLock:
    with _locks_guard:
        return _model_locks.setdefault(model, threading.RLock())


logger = logging.getLogger(__name__)
# Models and settings whose compiled decoding step has been announced (it takes a while, once).
_announced_compiles: weakref.WeakKeyDictionary[PreTrainedModel, set[LMInfiniteConfig]] = weakref.WeakKeyDictionary()
# Offloaded models told that compile_decode has no effect on them (once each).
_told_offloaded: weakref.WeakSet[PreTrainedModel] = weakref.WeakSet()


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The tokenizer's pad id for ``generate``, EOS where it has none (a pad id of 0 is a real id)."""
    pad = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad is None else int(pad)


def offloads(model: PreTrainedModel) -> bool:
    """Whether accelerate's device map keeps some weights on the CPU (beside a GPU) or on disk: transformers then
    never compiles the decoding step (``GenerationMixin._valid_auto_compile_criteria``; its rule, restated here
    because the method is private)."""
    devices = set(getattr(model, "hf_device_map", {}).values())
    return "disk" in devices or ("cpu" in devices and len(devices) > 1)


def free_bytes(device: torch.device) -> int:
    """Memory a new cache can take on ``device``: on a GPU, the free memory plus what PyTorch holds cached but
    unused (an earlier long prompt's blocks, which it hands out again). transformers' ``get_max_memory`` counts it
    so too (accelerate's does not), but it first touches every visible GPU, making a CUDA context on each.

    On the CPU, the least of the machine's available memory, what a container's memory limit leaves
    (:func:`cgroup_free_bytes`) and what an address-space limit (``ulimit -v``) leaves: past either, the process is
    killed or its allocations fail, whatever the machine has free."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    limits = [int(psutil.virtual_memory().available), cgroup_free_bytes(), address_space_free_bytes()]
    return min(limit for limit in limits if limit is not None)


def address_space_free_bytes() -> int | None:
    """What an address-space limit (``ulimit -v``) leaves this process, or ``None`` without one."""
    try:
        import resource  # Unix only
    except ImportError:
        return None
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    return max(0, limit - psutil.Process().memory_info().vms)


class _CgroupFiles(NamedTuple):
    folder: str  # under /sys/fs/cgroup
    limit: str
    usage: str
    stat: str
    inactive: str  # the page cache the kernel can drop, in ``stat``


_CGROUP_V2 = _CgroupFiles("", "memory.max", "memory.current", "memory.stat", "inactive_file")
_CGROUP_V1 = _CgroupFiles(
    "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file"
)


def cgroup_free_bytes(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """What this process's memory cgroups leave it (a container's or a job scheduler's limit), or ``None`` without
    a limit: the least, over its cgroup and each one above it, of the limit less the usage. ``membership`` names
    its cgroup (``/`` inside a container with its own cgroup namespace); cgroup v2 and v1 are read. Page cache the
    kernel can drop (``inactive_file``) is not counted as used, as ``docker stats`` does not count it."""
    own = {_CGROUP_V2: "/", _CGROUP_V1: "/"}
    try:
        for line in membership.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                own[_CGROUP_V2] = path
            elif "memory" in controllers.split(","):
                own[_CGROUP_V1] = path
    except (OSError, ValueError):
        pass
    for files, path in own.items():
        parts = [part for part in path.split("/") if part]
        levels = [root / files.folder / "/".join(parts[:n]) for n in range(len(parts), -1, -1)]  # own cgroup first
        readable = [level for level in levels if (level / files.limit).is_file()]
        if readable:
            frees = [_cgroup_free_at(level, files) for level in readable]
            return min((free for free in frees if free is not None), default=None)
    return None


def _cgroup_free_at(level: Path, files: _CgroupFiles) -> int | None:
    """One cgroup's limit less its usage; ``None`` when it has no limit (or cannot be read)."""
    try:
        limit_text = (level / files.limit).read_text().strip()
        usage = int((level / files.usage).read_text())
        if limit_text == "max" or int(limit_text) >= 2**60:  # v1 writes "no limit" as a number near 2**63
            return None
    except (OSError, ValueError):
        return None
    try:
        stat = dict(line.split() for line in (level / files.stat).read_text().splitlines() if line.strip())
        usage -= int(stat.get(files.inactive, 0))
    except (OSError, ValueError):
        pass
    return max(0, int(limit_text) - usage)


class StopWhen(StoppingCriteria):
    """Stops every sequence of a ``generate`` call once ``stop()`` says so (a reader gone, an answer complete)."""

    def __init__(self, stop: Callable[[], bool]) -> None:
        self.stop = stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        # On the tokens' device: transformers ORs every criterion's answer into a tensor there (a GPU's, say).
        done = torch.full((input_ids.shape[0],), self.stop(), dtype=torch.bool, device=input_ids.device)
        return done  # type: ignore[return-value]


class Engine:
    """A loaded model and its tokenizer, run by one long-context strategy.

    Args:
        model_id: see :func:`~lminf_integrations.models.load_model` (``None`` → embedded default).
        config: LM-Infinite settings (default ``LMInfiniteConfig()``).
        strategy: ``"lm-infinite"``, ``"xl3m"``, ``"dca"`` or ``"vanilla"`` (``EngineOptions.strategy``;
            :mod:`lminf_integrations.strategies`); ``xl3m`` and ``dca`` are those strategies' settings.
            Engines with different strategies may share one loaded model: each prepares it before use.
        dtype: ``"auto"`` (bf16 where the hardware has it, else fp32), ``"bf16"``, ``"fp32"``...
        model, tokenizer: an already-loaded model/tokenizer to use instead of loading (it stays where it is; the
            engine's tensors follow the layers they feed, so a model split by accelerate works).
        device, device_map, max_memory: where a model loaded here goes (:func:`~lminf_integrations.models.load_model`;
            default: the GPU when there is one).
        state_store: where encoded prompt prefixes are kept for reuse (default: a 2 GiB LRU of its own).
        reuse_prefixes: ``False`` turns automatic prefix reuse off (explicit ``state=`` still works).
        compile_decode: compile the decoding step with ``torch.compile`` (inductor), with ``cache_mode="window"`` and
            prompts of more than ``n_global`` tokens (every step then has the same shapes, a mask hiding what the
            window does not show yet). The first such generation per model and settings pauses to compile, and
            the frozen weights take another copy of the weights' memory; later steps run faster on CPU (README,
            "Decoding, eager vs compiled"). Off by default: worth it for many or long answers, not for one short one.
        chat_template_kwargs: switches of the model's chat template, passed to every rendering
            (``{"enable_thinking": False}`` for Qwen3).
    """

    def __init__(
        self,
        model_id: str | os.PathLike[str] | None = None,
        config: LMInfiniteConfig | None = None,
        dtype: str | torch.dtype | None = None,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        state_store: StateStore | None = None,
        reuse_prefixes: bool = True,
        compile_decode: bool = EngineOptions.compile_decode,
        strategy: str = EngineOptions.strategy,
        xl3m: XL3MConfig | None = None,
        dca: DCAConfig | None = None,
        device: str | None = EngineOptions.device,
        device_map: str | DeviceMap | None = EngineOptions.device_map,
        max_memory: MaxMemory | None = EngineOptions.max_memory,
        chat_template_kwargs: Mapping[str, Any] | None = EngineOptions.chat_template_kwargs,
    ) -> None:
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither")
        # Validated before anything loads (an unknown strategy, compiled decoding it cannot do, a bad device).
        EngineOptions(
            strategy=strategy,  # type: ignore[arg-type]
            compile_decode=compile_decode,
            device=device,
            device_map=device_map,
            max_memory=max_memory,
            chat_template_kwargs=chat_template_kwargs,  # type: ignore[arg-type]
        )
        if model is None:
            model, tokenizer = load_model(model_id, dtype, device, device_map, max_memory)
        assert tokenizer is not None
        self.model, self.tokenizer = model, tokenizer
        # What loaded it, when it was loaded here (reported by the adapters; None for a model passed in).
        self.model_id = None if model_id is None else os.fspath(model_id)
        self.config = config or LMInfiniteConfig()
        self.strategy = make_strategy(strategy, self.config, xl3m, dca)
        self.strategy.check(model)
        self._lock = _lock_for(model)
        self.compile_decode = compile_decode
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        # Prompts sharing a long prefix (the same document, another question) reuse its encoded state.
        self.state_store = state_store if state_store is not None else (StateStore() if reuse_prefixes else None)

    @property
    def model_name(self) -> str:
        return model_name(self.model)

    @property
    def options(self) -> EngineOptions:
        """The :class:`~lminf_integrations.config.EngineOptions` this engine runs with: dtype and placement as the
        model is now (a device, or accelerate's device map when its layers are on several)."""
        name = self.strategy.name
        split = getattr(self.model, "hf_device_map", None)
        placed = len(set(split.values())) > 1 if isinstance(split, dict) else False
        return EngineOptions(
            model_id=self.model_id,
            dtype=dtype_name(self.model.dtype),
            device=None if placed else str(input_device(self.model)),
            device_map=dict(split) if placed else None,  # type: ignore[arg-type]
            strategy=name,  # type: ignore[arg-type]
            compile_decode=self.compile_decode,
            chat_template_kwargs=dict(self.chat_template_kwargs) or None,
        )

    @classmethod
    def from_settings(cls, settings: Resolved, **kwargs: Any) -> Engine:
        """An engine for validated settings (what the adapters and the CLI build); ``kwargs`` go to the engine."""
        options = settings.options
        return cls(
            options.model_id,
            settings.config,
            options.dtype,
            strategy=options.strategy,
            compile_decode=options.compile_decode,
            device=options.device,
            device_map=options.device_map,
            max_memory=options.max_memory,
            chat_template_kwargs=options.chat_template_kwargs,
            xl3m=settings.xl3m,
            dca=settings.dca,
            **kwargs,
        )

    # ---- text helpers -------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """The tokens of ``text`` alone (no BOS: a piece of a prompt)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokenize_text(self, text: str) -> list[int]:
        """The tokens of ``text`` read as text throughout: a string that spells one of the tokenizer's added tokens
        (``"<|im_end|>"`` in a code base about chat models) stays text instead of becoming that control token. For
        what a user gave (a file, a question), not for a chat template's markup. Text that spells none gets the
        tokens of :meth:`tokenize`."""
        if not self.spells_added_tokens(text):
            return self.tokenize(text)
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def spells_added_tokens(self, text: str) -> bool:
        """Whether ``text`` holds the string of one of the tokenizer's added tokens (its control tokens)."""
        return any(token in text for token in self._added_token_strings)

    @functools.cached_property
    def _added_token_strings(self) -> tuple[str, ...]:
        return tuple(token.content for token in self.tokenizer.added_tokens_decoder.values())

    @functools.cached_property
    def special_prefix(self) -> list[int]:
        """The tokens the tokenizer starts a whole text with (a BOS for Llama and Mistral tokenizers; none for
        most chat models', whose templates write their own)."""
        plain = self.tokenize("x")
        full = list(self.tokenizer("x", add_special_tokens=True)["input_ids"])
        starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
        return full[: starts[0]] if starts else []

    def text_ids(self, text: str) -> list[int]:
        """The tokens of a whole prompt given as text, as transformers' pipelines read it: led by
        :attr:`special_prefix` unless the text brings it (a chat template that writes ``{{ bos_token }}``)."""
        ids, prefix = self.tokenize(text), self.special_prefix
        return ids if ids[: len(prefix)] == prefix else prefix + ids

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        """The model's chat template applied to ``[{"role": ..., "content": ...}]``, ready for the answer."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.model_name} has no chat template; use plain-text prompts instead")
        try:
            prompt = self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=True, **self.chat_template_kwargs
            )
        except TemplateError as error:  # e.g. "roles must alternate": the template's own rules
            roles = ", ".join(message["role"] for message in messages)
            raise ValueError(
                f"the chat template of {self.model_name} rejected these messages ({roles}): {error}"
            ) from error
        return str(prompt)

    # ---- encoding -----------------------------------------------------------------------------------------
    def cache_bytes_needed(self, n_tokens: int) -> int:
        """Bytes the strategy's cache takes for ``n_tokens``."""
        return self.strategy.cache_bytes(self.model, n_tokens)

    def check_memory(self, n_tokens: int) -> None:
        needed = self.cache_bytes_needed(n_tokens)
        device = input_device(self.model)
        # The cache grows where the layers are: on a GPU, its free memory is what counts (a split model: the first
        # device's, a conservative reading since the layers spread the cache).
        available = free_bytes(device)
        if needed > 0.8 * available:
            raise MemoryError(
                f"encoding {n_tokens} tokens with strategy={self.strategy.name!r} needs about "
                f"{needed / 2**30:.1f} GiB for keys/values, more than 80% of the {available / 2**30:.1f} GiB free "
                "here (the machine's, a container's or `ulimit -v`'s limit, whichever is least); use "
                f"{self.strategy.memory_hint()}, a smaller document, or a machine with more memory"
            )

    def _prepared(self) -> None:
        """The model running this engine's strategy (engines sharing a model may use others); under the lock."""
        self.strategy.prepare(self.model)

    def encode(
        self,
        token_ids: Sequence[int],
        on_progress: ProgressCallback | None = None,
        cancelled: threading.Event | None = None,
        state: DocumentState | None = None,
        report_total: int | None = None,
        remember: bool = False,
    ) -> DocumentState:
        """Read ``token_ids`` (a prompt's beginning: template opening and document) into a document state that
        prompts continuing them answer from (``stream(..., state=...)``, ``save_state``).

        For strategies that continue prefixes (LM-Infinite, vanilla): the tokens run through the model in chunks,
        filling its cache, continuing ``state`` if given (in place — pass ``state.copy()`` to keep it). Chunk
        boundaries fall on multiples of ``chunk_size`` (absolute positions), whatever the state's length, so a
        text split at a state's end is read in the chunks of the whole text but for that one extra boundary (equal
        up to rounding: in bf16 a greedy answer can differ; ``lminf ask`` encodes the document first for that
        reason, as ``lminf encode`` does); with ``remember`` the state at the last chunk
        boundary is kept in the engine's state store for later prompts that share it. For XL3M: every segment is
        read and kept (``state`` cannot be continued). ``on_progress(done, total)`` is called, in the calling
        thread, before the first chunk and after each; ``report_total`` overrides the total it reports. The work
        runs on the model thread (:mod:`.model_thread`); an interrupt (or ``on_progress`` raising) stops it.
        """
        return model_thread.run(
            lambda report: self._encode(token_ids, report, cancelled, state, report_total, remember), on_progress
        )

    def _encode(
        self,
        token_ids: Sequence[int],
        on_progress: ProgressCallback,
        cancelled: threading.Event | None,
        state: DocumentState | None,
        report_total: int | None,
        remember: bool,
    ) -> DocumentState:
        if self.strategy.continues_states:
            return self._prefill(token_ids, on_progress, cancelled, state, report_total, remember)
        if state is not None:
            raise ValueError(
                f"strategy={self.strategy.name!r} reads a document in segments: a state cannot be continued; "
                "encode the whole beginning of the prompt at once"
            )
        ids = list(token_ids)
        self.check_memory(len(ids))
        with self._lock:
            self._prepared()
            cache = self.strategy.read_document(self.model, self.tokenizer, ids, on_progress)
        return DocumentState(ids, cache)

    def _prefill(
        self,
        token_ids: Sequence[int],
        on_progress: ProgressCallback | None = None,
        cancelled: threading.Event | None = None,
        state: DocumentState | None = None,
        report_total: int | None = None,
        remember: bool = False,
    ) -> DocumentState:
        """The chunked prefill behind :meth:`encode` (strategies that continue prefixes), and every prompt's."""
        with self._lock:
            self._prepared()
            if state is None:
                state = DocumentState([], self.strategy.new_cache(self.model))
            elif list(token_ids[: len(state.token_ids)]) != state.token_ids:
                raise ValueError("token_ids do not start with the state's tokens")
            if len(token_ids) > len(state.token_ids):
                state.text = None  # the state now holds more than its text
            total = report_total or len(token_ids)
            self.check_memory(total)
            # Every token encoded here is a prompt token: top-k middle attention (generation-time queries only)
            # must not start inside the prefill; generation sets the real prompt length afterwards.
            self.strategy.set_prompt_length(state.cache, len(token_ids) + 1)
            step = self.config.chunk_size
            if on_progress:
                on_progress(len(state.token_ids), total)
            decoder = self.model.get_decoder()
            with torch.inference_mode():
                while len(state.token_ids) < len(token_ids):
                    if cancelled is not None and cancelled.is_set():
                        break
                    done = len(state.token_ids)
                    end = min(len(token_ids), (done // step + 1) * step)
                    chunk = torch.tensor([list(token_ids[done:end])], device=input_device(self.model))
                    # The base model only: no logits for prefill positions (they would cost as much again).
                    decoder(input_ids=chunk, use_cache=True, **cache_kwargs(state.cache))
                    state.token_ids.extend(token_ids[done:end])
                    if remember and self.state_store is not None and end % step == 0 and end + step > len(token_ids):
                        self.state_store.put(state.copy())
                    if on_progress:
                        on_progress(len(state.token_ids), total)
            return state

    def encode_document(self, text: str, on_progress: ProgressCallback | None = None) -> DocumentState:
        """Encode ``text`` once; then ``stream(text + question, state=...)`` reads only the question (tokenized
        on its own, so the document's tokens are an exact prefix whatever the question starts with)."""
        state = self.encode(self.text_ids(text), on_progress)
        state.text = text
        return state

    def prompt_ids(self, prompt: str | Sequence[int], state: DocumentState | None = None) -> list[int]:
        """The token ids of ``prompt``; with a ``state``, checked to start with the state's tokens."""
        if isinstance(prompt, str) and state is not None and state.text is not None:
            if not prompt.startswith(state.text):
                raise ValueError(
                    "the prompt does not start with the encoded document's text (state=); give the document's text "
                    "followed by the question, or token ids"
                )
            ids = list(state.token_ids) + self.tokenize(prompt[len(state.text) :])
        else:
            ids = self.text_ids(prompt) if isinstance(prompt, str) else list(prompt)
        if state is not None and ids[: len(state.token_ids)] != state.token_ids:
            raise ValueError(
                "the prompt's tokens do not start with the state's tokens; pass token ids "
                "(state.token_ids + engine.tokenize(question)) for a state without its text"
            )
        return ids

    # ---- generation ---------------------------------------------------------------------------------------
    def stream(
        self,
        prompt: str | Sequence[int],
        settings: GenerationSettings | None = None,
        stop: Sequence[str] = (),
        on_progress: ProgressCallback | None = None,
        state: DocumentState | None = None,
        question_tokens: int | None = None,
        scored_tokens: int | None = None,
    ) -> TokenStream:
        """Start generating a continuation of ``prompt``; iterate the result for text deltas.

        ``question_tokens``: how many tokens before the chat template's closing part are the question (with any
        instruction before it), for strategies that read the question apart (XL3M; otherwise its
        ``question_tokens`` setting is assumed); ``scored_tokens``: how many of those, at the end, are the question
        itself, whose likelihood ranks the segments (default: all of them).
        """
        settings = settings or GenerationSettings()
        ids = self.prompt_ids(prompt, state)
        if not ids:
            raise ValueError("the prompt is empty")
        stop = merge_stop(settings.stop, stop)

        def work(emit: Any, report: ProgressCallback, cancelled: threading.Event) -> StreamResult:
            return self._generate(ids, settings, emit, report, cancelled, state, question_tokens, scored_tokens)

        return TokenStream(work, stop=stop, on_progress=on_progress)

    def generate(
        self,
        prompt: str | Sequence[int],
        settings: GenerationSettings | None = None,
        stop: Sequence[str] = (),
        on_progress: ProgressCallback | None = None,
    ) -> str:
        """The whole continuation as one string (stop text excluded)."""
        stream = self.stream(prompt, settings, stop=stop, on_progress=on_progress)
        return "".join(stream)

    def _compiles(self, cache: DocumentCache) -> bool:
        """Allow compiled steps on this generation's cache (or not, per ``compile_decode``) and say whether they will
        run compiled: transformers decides from the cache it gets."""
        offloaded = self.compile_decode and offloads(self.model)
        if offloaded and self.model not in _told_offloaded:
            _told_offloaded.add(self.model)
            logger.warning(
                "%s has layers offloaded to the CPU or disk: transformers does not compile its decoding step, so "
                "compile_decode has no effect (decoding runs eagerly)", self.model_name,
            )  # fmt: skip
        if not self.strategy.allow_compiled_steps(cache, self.compile_decode and not offloaded):
            return False
        if not getattr(cache, "is_compileable", False):
            return False
        announced = _announced_compiles.setdefault(self.model, set())
        if self.config not in announced:
            announced.add(self.config)
            logger.info("compiling the decoding step for %s (once per model and settings)", self.model_name)
        return True

    def _generate(
        self,
        ids: list[int],
        settings: GenerationSettings,
        emit: Any,
        report: ProgressCallback,
        cancelled: threading.Event,
        state: DocumentState | None,
        question_tokens: int | None = None,
        scored_tokens: int | None = None,
    ) -> StreamResult:
        # Wait for the model (another generation may hold it) without missing a cancellation meanwhile.
        while not self._lock.acquire(timeout=0.05):
            if cancelled.is_set():
                return StreamResult(len(ids), 0, "cancelled")
        try:
            if cancelled.is_set():
                return StreamResult(len(ids), 0, "cancelled")
            plan = None
            if state is None or not self.strategy.continues_states:
                # A prompt-level strategy (XL3M) may answer from another prompt.
                self._prepared()
                try:
                    plan = self.strategy.plan(
                        self.model,
                        self.tokenizer,
                        ids,
                        settings.max_new_tokens,
                        report,
                        question_tokens,
                        state.cache if state is not None else None,
                        scored_tokens,
                        stop=cancelled,
                    )
                except model_thread.Cancelled:  # the stream was closed while a document was being read
                    return StreamResult(len(ids), 0, "cancelled")
                if not self.strategy.continues_states:
                    state = None  # its state is not a prefix the prompt continues
            if plan is not None and plan.prefix_cache is not None:
                state = DocumentState(plan.ids[: plan.prefix_length], plan.prefix_cache)
            result = self._generate_locked(
                plan.ids if plan else ids, settings, emit, report, cancelled, state, plan is None
            )
            if plan is not None:
                result.input_tokens = len(ids)  # the model read the whole prompt, in segments
                result.details = {self.strategy.name: plan.details}
            return result
        finally:
            self._lock.release()

    def _generate_locked(
        self,
        ids: list[int],
        settings: GenerationSettings,
        emit: Any,
        report: ProgressCallback,
        cancelled: threading.Event,
        state: DocumentState | None,
        reuse: bool = True,
    ) -> StreamResult:
        if state is None and self.state_store is not None and reuse:
            state = self.state_store.lookup(ids[:-1])
        # Generation writes into the cache: work on a copy so that a stored state never changes.
        prefix = state.copy() if state is not None else None
        # Everything but the last prompt token is prefilled here; generate() runs the last one, so top-k
        # middle attention (generation-time queries) starts exactly at the last prompt token.
        encoded = self._prefill(ids[:-1], report, cancelled, prefix, report_total=len(ids), remember=reuse)
        if cancelled.is_set():
            return StreamResult(len(ids), 0, "cancelled")
        self.strategy.set_prompt_length(encoded.cache, len(ids))
        report(len(ids), len(ids))  # the last prompt token goes with the first generation step
        streamer = DeltaStreamer(self.tokenizer, emit)
        sampling: dict[str, Any] = {"do_sample": False}
        if settings.temperature > 0:
            sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
        input_ids = torch.tensor([ids], device=input_device(self.model))
        compiled = self._compiles(encoded.cache)
        faster_without_onednn = not compiled and decodes_faster_without_onednn(self.model.dtype, self.model.device)
        with (
            torch.inference_mode(),
            inductor_settings(compiled, input_ids.device),
            compiled_step_errors(compiled, self.model_name),
            onednn_off() if faster_without_onednn else contextlib.nullcontext(),
        ):
            output = self.model.generate(  # type: ignore[operator]
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                **cache_kwargs(encoded.cache),
                max_new_tokens=settings.max_new_tokens,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([StopWhen(cancelled.is_set)]),
                pad_token_id=pad_token_id(self.tokenizer),
                top_k=None,
                **generate_kwargs(compiled, input_ids.device),
                **sampling,
            )
        new_tokens = output[0, len(ids) :].tolist()
        reason = "cancelled" if cancelled.is_set() else "length"
        if new_tokens and new_tokens[-1] in eos_ids(self.model):
            reason = "eos"
        text = str(self.tokenizer.decode(new_tokens, skip_special_tokens=True))
        return StreamResult(len(ids), len(new_tokens), reason, text)

    # ---- saved states -------------------------------------------------------------------------------------
    def save_state(self, state: DocumentState, path: str | os.PathLike[str]) -> Path:
        """Write ``state`` to ``path`` (safetensors; the header names the model, tokenizer, settings and
        checksums, so :meth:`load_state` can refuse a file that does not fit this engine). Returns the path."""
        return model_thread.run(lambda _: write_state(path, state, self._state_identity()))

    def load_state(self, path: str | os.PathLike[str]) -> DocumentState:
        """Read a state written by :meth:`save_state` with the same model, tokenizer and settings; refuses other
        ones, files of another format and damaged files (``ValueError``)."""
        return model_thread.run(lambda _: self._load_state(path))

    def _load_state(self, path: str | os.PathLike[str]) -> DocumentState:
        with self._lock:
            self._prepared()
            cache = self.strategy.new_document_cache(self.model)
        return read_state(path, self._state_identity(), cache, layer_devices(self.model))

    def _state_identity(self) -> dict[str, Any]:
        return state_identity(self.model_name, self.model, self.tokenizer, self.strategy.identity())
