"""The engine's settings, each declared once with its default, its help text and any alias.

Three frozen dataclasses, validated at construction: :class:`EngineOptions` (which model, how it runs),
:class:`LMInfiniteConfig` (the attention) and :class:`GenerationSettings` (one answer). Their fields are the single
declaration of every setting: :mod:`lminf_integrations.settings` builds the LangChain and LlamaIndex fields and the
``lminf`` options from them, so a setting is added, renamed or re-defaulted here and nowhere else. This module
imports nothing heavy, so the CLI can build its parser before torch loads.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

CacheMode = Literal["window", "full"]
StrategyName = Literal["lm-infinite", "xl3m", "dca", "vanilla"]
XL3MScore = Literal["contrast", "loglik", "entropy"]
#: What ``strategy=`` takes (each is a subpackage of ``lminf_integrations.strategies``).
STRATEGY_NAMES: tuple[str, ...] = typing.get_args(StrategyName)

#: Names ``dtype=`` accepts (``"auto"``: bf16 where the hardware computes it fast, else fp32).
DTYPE_NAMES = ("auto", "bf16", "bfloat16", "fp32", "float32", "fp16", "float16")
#: The strategies accelerate places a model by when ``device_map=`` is one of these names.
DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")
#: ``device_map=`` as a mapping: a module name (``""``: the whole model) to a device (``"cpu"``, ``"cuda:0"``, ``0``).
DeviceMap = dict[str, str | int]
#: ``max_memory=``: a device (``0`` or ``"0"`` for ``cuda:0``, ``"cpu"``) to what it may hold (``"20GiB"`` or bytes).
MaxMemory = dict[str | int, str | int]
_DEVICE = re.compile(r"(auto|cpu|cuda(:[0-9]+)?)")


def setting(
    default: Any, help: str, *, aliases: Sequence[str] = (), group: str | None = None, name: str | None = None
) -> Any:
    """A dataclass field that is also a user-facing setting: ``help`` is its one description everywhere,
    ``aliases`` other accepted names (never shown as the name), ``group`` overrides the class's group, ``name``
    the setting's name where the field's would clash with another class's (``DCAConfig.chunk_size`` is the setting
    ``dca_chunk_size``: ``chunk_size`` is LM-Infinite's)."""
    return field(default=default, metadata={"help": help, "aliases": tuple(aliases), "group": group, "name": name})


@dataclass(frozen=True)
class EngineOptions:
    """Which model the engine loads and how it runs it (fixed once an engine is built)."""

    model_id: str | None = setting(
        None,
        "None for the embedded default (SmolLM2-135M-Instruct), a .gguf file, a model folder or a hub id ('org/name')",
        aliases=("model",),
    )
    dtype: str = setting("auto", "auto (bf16 where the CPU/GPU computes it fast, else fp32), bf16, fp32 or fp16")
    device: str | None = setting(
        None,
        "where the model runs: 'cpu', 'cuda', 'cuda:1'; None or 'auto': the GPU when there is one, else the CPU (a "
        "model passed in stays where it is)",
    )
    device_map: str | DeviceMap | None = setting(
        None,
        "spread the model over devices (accelerate): 'auto', 'balanced', 'balanced_low_0', 'sequential', or "
        "{module: device} (JSON on the command line); None: all of it on `device`",
    )
    max_memory: MaxMemory | None = setting(
        None,
        "with device_map: the most each device may hold, e.g. {\"0\": \"20GiB\", \"cpu\": \"60GiB\"} (JSON on the "
        "command line); None: what accelerate finds free",
    )
    chat_template_kwargs: dict[str, Any] | None = setting(
        None,
        "switches of the model's chat template, e.g. {\"enable_thinking\": false} for Qwen3 (JSON on the command "
        "line); None: the template's defaults",
    )
    strategy: StrategyName = setting(
        "lm-infinite",
        "how the model reads a long prompt: 'lm-infinite' (Λ attention: the leading tokens and a local window), "
        "'xl3m' (segments scored by the model against the question, the best answered from), 'dca' (Dual Chunk "
        "Attention: every key, positions remapped within the training length), 'vanilla' (the "
        "unpatched model, every key: for comparisons)",
        group="strategy",
    )
    compile_decode: bool = setting(
        False,
        "compile the decoding step with torch.compile (window cache): faster steps after a one-time compile, "
        "worth it for long or many answers (README: 'Decoding, eager vs compiled')",
        group="decoding",
    )

    def __post_init__(self) -> None:
        _require(self.model_id is None or isinstance(self.model_id, str), "model_id must be None or a string")
        _require(self.dtype in DTYPE_NAMES, f"dtype must be one of {', '.join(DTYPE_NAMES)}; got {self.dtype!r}")
        _require(self.strategy in STRATEGY_NAMES, f"strategy must be one of {', '.join(STRATEGY_NAMES)}")
        _require(
            self.device is None or (isinstance(self.device, str) and _DEVICE.fullmatch(self.device) is not None),
            f"device must be None, 'auto', 'cpu', 'cuda' or 'cuda:N'; got {self.device!r}",
        )
        _check_device_map(self.device_map)
        _require(self.device is None or self.device_map is None, "pass device or device_map, not both")
        _require(
            self.max_memory is None
            or (isinstance(self.max_memory, Mapping) and all(isinstance(k, str | int) for k in self.max_memory)),
            "max_memory must be None or a mapping of devices to sizes, e.g. {0: '20GiB', 'cpu': '60GiB'}",
        )
        _require(self.max_memory is None or self.device_map is not None, "max_memory needs device_map (e.g. 'auto')")
        for where, size in (self.max_memory or {}).items():
            _require(
                _is_size(size),
                f"max_memory's size for {where!r} is {size!r}: give bytes (an int) or a size like '20GiB'",
            )
        _require(
            self.chat_template_kwargs is None
            or (
                isinstance(self.chat_template_kwargs, Mapping)
                and all(isinstance(k, str) for k in self.chat_template_kwargs)
            ),
            "chat_template_kwargs must be None or a mapping of names to values, e.g. {'enable_thinking': False}",
        )
        _require(isinstance(self.compile_decode, bool), "compile_decode must be True or False")
        _require(
            not (self.compile_decode and self.strategy != "lm-infinite"),
            "compile_decode=True needs strategy='lm-infinite' (its window cache keeps every step's shapes)",
        )


@dataclass(frozen=True)
class LMInfiniteConfig:
    """Settings of the Λ-shaped attention (Han et al., 2024, arXiv 2308.16137).

    A query at position ``i`` sees a key at position ``j <= i``:

    * ordinarily when ``i - j < n_local`` (the local window);
    * at relative distance exactly ``distance_limit`` when ``j < n_global`` (the global "sink" tokens);
    * otherwise not at all, except that with ``top_k > 0`` the last prompt token and every generated token
      also attend, in layers ``>= top_k_from_layer``, to the ``top_k`` middle keys with the highest logits
      (computed at distance ``distance_limit``).

    Each field's ``help`` (``dataclasses.fields(LMInfiniteConfig)[i].metadata["help"]``) describes it.
    """

    n_global: int = setting(10, "leading (global) tokens every query may attend to")
    n_local: int = setting(4096, "local attention window; at most the model's training length")
    distance_limit: int | None = setting(
        None, "relative distance at which global (and top-k) keys are seen; None means n_local"
    )
    top_k: int = setting(0, "middle keys each query head attends to at generation time (0: off; needs full cache)")
    top_k_from_layer: int = setting(0, "first layer (0-based) using top-k middle attention")
    cache_mode: CacheMode = setting(
        "window", "key/value cache: 'window' keeps n_global + n_local keys (constant memory), 'full' keeps all"
    )
    # Every strategy's prefill step (kept here, where the engine has always read it): its own settings group, so
    # that it is not refused with strategies other than LM-Infinite.
    chunk_size: int = setting(
        2048, "prompt tokens per forward call while encoding (LM-Infinite, DCA, vanilla; XL3M reads its segments in "
        "rows of its own); bounds activation memory",
        group="encoding",
    )  # fmt: skip

    def __post_init__(self) -> None:
        _require(_is_int(self.n_global) and self.n_global >= 0, "n_global must be an int >= 0")
        _require(_is_int(self.n_local) and self.n_local >= 1, "n_local must be an int >= 1")
        if self.distance_limit is not None:
            _require(
                _is_int(self.distance_limit) and self.distance_limit >= 1,
                "distance_limit must be None or an int >= 1",
            )
        _require(_is_int(self.top_k) and self.top_k >= 0, "top_k must be an int >= 0")
        _require(_is_int(self.top_k_from_layer) and self.top_k_from_layer >= 0, "top_k_from_layer must be an int >= 0")
        _require(
            self.cache_mode in ("window", "full"), f"cache_mode must be 'window' or 'full', got {self.cache_mode!r}"
        )
        _require(
            not (self.top_k > 0 and self.cache_mode != "full"),
            "top_k > 0 needs cache_mode='full' (the middle keys must be kept)",
        )
        _require(_is_int(self.chunk_size) and self.chunk_size >= 1, "chunk_size must be an int >= 1")

    @property
    def effective_distance_limit(self) -> int:
        return self.n_local if self.distance_limit is None else self.distance_limit

    def check_against_model(self, max_position_embeddings: int | None, num_layers: int) -> None:
        """Refuse settings that put the model outside the distances it was trained on."""
        if max_position_embeddings is not None:
            for name, value in (("n_local", self.n_local), ("distance_limit", self.effective_distance_limit)):
                _require(
                    value <= max_position_embeddings,
                    f"{name}={value} exceeds the model's training length {max_position_embeddings}: pass "
                    f"{name}={max_position_embeddings} or less (--{name.replace('_', '-')} {max_position_embeddings})",
                )
        if self.top_k > 0:
            _require(
                self.top_k_from_layer < num_layers,
                f"top_k_from_layer={self.top_k_from_layer} but the model has {num_layers} layers",
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DCAConfig:
    """Settings of Dual Chunk Attention (An et al., ICML 2024, arXiv 2402.17463), training-free.

    The sequence is cut into chunks of ``chunk_size``; every key is seen, at a position within its chunk. A query
    sees keys of its own chunk at their ordinary distance; keys of the chunk before at their ordinary distance when
    it is among the first ``local_window`` of its chunk, else as if it stood at the training length's last position;
    keys of older chunks always from that last position. No distance reaches the training length.
    """

    chunk_size: int | None = setting(
        None, "tokens per chunk; None: three quarters of the model's training length", name="dca_chunk_size"
    )
    local_window: int | None = setting(
        None,
        "a chunk's first tokens that see the previous chunk at ordinary distances; None: the training length less "
        "the chunk size",
        name="dca_local_window",
    )

    def __post_init__(self) -> None:
        if self.chunk_size is not None:
            _require(_is_int(self.chunk_size) and self.chunk_size >= 1,
                     "dca_chunk_size (DCAConfig.chunk_size) must be None or an int >= 1")  # fmt: skip
        if self.local_window is not None:
            _require(_is_int(self.local_window) and self.local_window >= 0,
                     "dca_local_window (DCAConfig.local_window) must be None or an int >= 0")  # fmt: skip

    def settings(self) -> dict[str, Any]:
        """The fields by their setting names (``dca_chunk_size``, ``dca_local_window``)."""
        return {"dca_chunk_size": self.chunk_size, "dca_local_window": self.local_window}

    def resolve(self, training_length: int) -> tuple[int, int]:
        """``(chunk_size, local_window)`` for a model trained on ``training_length`` tokens (defaults filled in)."""
        chunk = self.chunk_size if self.chunk_size is not None else max(1, 3 * training_length // 4)
        local = self.local_window if self.local_window is not None else max(0, training_length - chunk)
        _require(
            chunk + local <= training_length,
            f"dca_chunk_size + dca_local_window = {chunk} + {local} exceeds the model's training length "
            f"{training_length}",
        )
        return chunk, local

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class XL3MConfig:
    """Settings of XL3M segment selection (Wang et al., 2024, arXiv 2405.17755).

    The prompt's body is cut into segments at natural boundaries; the model reads each segment on its own. For a
    question, the ``candidates`` segments its attention favours most are read with the question after each, and the
    segments the model is most certain about the question with are kept, in document order, within
    ``context_tokens``. Those segments are cut again into passages (sentences, at most ``passage_tokens`` long),
    chosen the same way; the answer is generated from the passages scoring within ``passage_margin`` of the best,
    and the question.
    """

    #: What a saved document depends on: how it was cut. Every other setting is read when a question is asked, so
    #: a state does not keep it (``lminf encode`` refuses it and leaves it out of its help).
    STATE_FIELDS: ClassVar[tuple[str, ...]] = ("segment_tokens",)

    segment_tokens: int = setting(512, "most tokens per segment (cut at paragraph, then sentence boundaries)")
    question_tokens: int = setting(
        64,
        "for a prompt given as one text: its last tokens before the chat template's closing part are taken as the "
        "question (the command line knows the question and uses it exactly)",
    )
    context_tokens: int | None = setting(
        None,
        "most segment tokens kept for the answer (never more than fit in the training length with the question and "
        "answer); None: an eighth of the model's training length, and at least two segments (README: 'Choosing a "
        "strategy')",
    )
    candidates: int | None = setting(
        6,
        "segments ranked best by where the question's attention falls (a cheap first pass) that are then scored by "
        "likelihood, at least twice as many as fit in the answer's context (and as many of the chosen segments' "
        "passages and of the hop's sentences); None: every segment, passage and sentence is scored by likelihood "
        "(slower on long documents)",
    )
    score: XL3MScore = setting(
        "contrast",
        "how segments are ranked: 'contrast' (the question tokens a segment makes likelier than the other "
        "candidates do: the mean gain of its 3 best), 'loglik' (mean log-likelihood of the question's tokens after "
        "the segment), 'entropy' (certainty of the next token after the question); passages are ranked by 'loglik' "
        "unless 'entropy' is set",
    )
    passage_tokens: int | None = setting(
        40,
        "the chosen segments are cut again into passages, a sentence or line each (shorter ones joined to the next, "
        "longer ones cut at this many tokens), narrowed by the attention pass as segments are, and the answer is read "
        "from the passages kept by passage_margin; None: from the chosen segments whole (README: 'Choosing a "
        "strategy')",
    )
    passage_margin: float = setting(
        0.6,
        "how far below the best passage's mean log-likelihood per question token (in nats) a passage may score and "
        "still be kept; with score='contrast', the passage contrast ranks first is kept too",
    )
    hop_margin: float | None = setting(
        0.5,
        "one hop from the best kept passage (by contrast, else likelihood): the segment that makes its tokens not in "
        "the question likeliest, when it beats the next by this many nats per token, adds its sentence doing the "
        "same best (a question about 'the place where the kettle is kept' needs the sentence giving that place's "
        "code); None: no hop (needs passage_tokens)",
    )

    hop_confidence: float | None = setting(
        None,
        "the hop runs only when the model is unsure of its answer from the kept passages: when one of the answer's "
        "first 4 tokens that are not the question's own words (greedy) is less likely than this (say 0.9: faster "
        "single-fact answers, slower multi-fact ones, README: 'Choosing a strategy'); None: the hop always runs",
    )

    def __post_init__(self) -> None:
        _require(_is_int(self.segment_tokens) and self.segment_tokens >= 16, "segment_tokens must be an int >= 16")
        _require(_is_int(self.question_tokens) and self.question_tokens >= 1, "question_tokens must be an int >= 1")
        if self.context_tokens is not None:
            _require(
                _is_int(self.context_tokens) and self.context_tokens >= 1, "context_tokens must be None or an int >= 1"
            )
        if self.candidates is not None:
            _require(_is_int(self.candidates) and self.candidates >= 1, "candidates must be None or an int >= 1")
        _require(
            self.score in ("contrast", "loglik", "entropy"),
            f"score must be 'contrast', 'loglik' or 'entropy', got {self.score!r}",
        )
        if self.passage_tokens is not None:
            _require(
                _is_int(self.passage_tokens) and self.passage_tokens >= 8, "passage_tokens must be None or an int >= 8"
            )
        if self.hop_margin is not None:
            _require(
                isinstance(self.hop_margin, int | float) and not isinstance(self.hop_margin, bool)
                and self.hop_margin >= 0,
                "hop_margin must be None or a number >= 0",
            )  # fmt: skip
        if self.hop_confidence is not None:
            _require(
                isinstance(self.hop_confidence, int | float) and not isinstance(self.hop_confidence, bool)
                and 0 < self.hop_confidence <= 1,
                "hop_confidence must be None or a number in (0, 1]",
            )  # fmt: skip
        _require(
            isinstance(self.passage_margin, int | float) and not isinstance(self.passage_margin, bool)
            and self.passage_margin >= 0,
            "passage_margin must be a number >= 0",
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GenerationSettings:
    """How one answer is generated; every field may also be given per call."""

    max_new_tokens: int = setting(256, "most tokens to generate", aliases=("max_tokens",))
    temperature: float = setting(0.0, "0 for greedy decoding, else the sampling temperature")
    top_p: float = setting(1.0, "nucleus sampling mass (when temperature > 0)")
    seed: int | None = setting(None, "random seed for repeatable sampling")
    stop: tuple[str, ...] = setting(
        (), "stop strings of any length: the answer ends before the first (a call's are added to these)"
    )

    def __post_init__(self) -> None:
        _require(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens must be an int >= 1")
        _require(isinstance(self.temperature, int | float) and self.temperature >= 0, "temperature must be >= 0")
        _require(isinstance(self.top_p, int | float) and 0 < self.top_p <= 1, "top_p must be in (0, 1]")
        _require(
            self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**64),
            "seed must be None or an int in [-2**63, 2**64) (what torch.manual_seed takes)",
        )
        if isinstance(self.stop, str) or not all(isinstance(text, str) for text in self.stop):
            raise ValueError("stop must be a list of strings")
        object.__setattr__(self, "stop", tuple(self.stop))


def merge_stop(*groups: str | Sequence[str] | None) -> list[str]:
    """Stop strings from several sources (say an instance's and a call's): in order, without repeats or blanks.

    A lone string counts as one stop string, not as its characters."""
    merged: list[str] = []
    for group in groups:
        for text in [group] if isinstance(group, str) else group or ():
            if text and text not in merged:
                merged.append(text)
    return merged


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_size(size: object) -> bool:
    """Whether accelerate reads ``size`` as a memory size (checked here, not once loading has begun)."""
    if isinstance(size, bool) or not isinstance(size, int | str):
        return False
    from accelerate.utils import convert_file_size_to_int

    try:
        convert_file_size_to_int(size)
    except ValueError:
        return False
    return True


def _check_device_map(device_map: object) -> None:
    if device_map is None or device_map in DEVICE_MAP_NAMES:
        return
    _require(
        isinstance(device_map, Mapping)
        and all(isinstance(k, str) and isinstance(v, str | int) for k, v in device_map.items()),
        f"device_map must be None, one of {', '.join(DEVICE_MAP_NAMES)}, or a mapping of module names to devices; "
        f"got {device_map!r}",
    )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
