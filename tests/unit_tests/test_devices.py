"""Where models run: ``device=``, ``device_map=``, ``max_memory=`` through every entry point, and a model whose
weights accelerate keeps offloaded (its hooks bring them in per forward) answering as the plain model does.

CI has no GPU: these tests check the plumbing on the CPU (and that a CUDA request fails clearly without one); the
GPU check (issue 19) runs the same paths on CUDA."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from accelerate import cpu_offload
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations import DCAConfig, LMInfiniteConfig
from lminf_integrations.cli import build_parser
from lminf_integrations.config import EngineOptions
from lminf_integrations.engine import Engine, GenerationSettings
from lminf_integrations.langchain import LMInfiniteLLM
from lminf_integrations.llama_index import LMInfiniteLLM as LlamaIndexLLM
from lminf_integrations.models import Placement, input_device, layer_devices, load_model, resolve_device
from tests.tiny_models import tiny_llama

Tiny = tuple[PreTrainedModel, PreTrainedTokenizerBase]
NO_GPU = not torch.cuda.is_available()


def test_auto_means_the_gpu_when_there_is_one() -> None:
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == expected and resolve_device("auto") == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not NO_GPU, reason="checks the error a machine without a GPU gives")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_cuda_request_without_a_gpu_fails_before_loading(device: str, tiny_model_dir: str) -> None:
    with pytest.raises(RuntimeError, match="sees no GPU.*device='cpu'"):
        resolve_device(device)
    with pytest.raises(RuntimeError, match="sees no GPU"):
        load_model(tiny_model_dir, "fp32", device=device)
    with pytest.raises(RuntimeError, match="sees no GPU"):
        load_model(tiny_model_dir, "fp32", device_map={"": device})


@pytest.mark.skipif(not NO_GPU, reason="checks the error a machine without a GPU gives")
@pytest.mark.parametrize("gpu", [0, "0"])
def test_a_memory_limit_for_a_gpu_without_one_fails_before_loading(gpu: int | str, tiny_model_dir: str) -> None:
    """accelerate would refuse it only once loading has begun (and a GGUF model's cache entry would look broken)."""
    with pytest.raises(RuntimeError, match="max_memory names GPU 0, but this torch .* sees no GPU"):
        load_model(tiny_model_dir, "fp32", device_map="auto", max_memory={gpu: "1GiB", "cpu": "8GiB"})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"device": "gpu"}, "device must be None, 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ({"device": "cuda:x"}, "device must be"),
        ({"device_map": "fastest"}, "device_map must be None, one of auto, balanced"),
        ({"device_map": {"model": 1.5}}, "device_map must be"),
        ({"device": "cpu", "device_map": "auto"}, "pass device or device_map, not both"),
        ({"max_memory": {"cpu": "1GiB"}}, "max_memory needs device_map"),
        ({"device_map": "auto", "max_memory": ["1GiB"]}, "max_memory must be None or a mapping"),
        ({"device_map": "auto", "max_memory": {"cpu": "lots"}}, "max_memory's size for 'cpu' is 'lots'"),
        ({"device_map": "auto", "max_memory": {"cpu": -1}}, "max_memory's size for 'cpu' is -1"),
    ],
)
def test_bad_placements_are_refused_with_the_reason(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineOptions(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=list(kwargs)[-1]):  # pydantic's message or ours, naming the setting
        LMInfiniteLLM(**kwargs)  # type: ignore[arg-type]


def test_the_same_placements_are_accepted_everywhere() -> None:
    EngineOptions(device="cuda:1")
    EngineOptions(device_map={"model.layers.0": 0, "": "cpu"}, max_memory={0: "20GiB", "cpu": "60GiB"})
    llm = LMInfiniteLLM(device="cpu")
    assert llm.device == "cpu"
    assert LlamaIndexLLM(device_map="balanced").device_map == "balanced"



def test_a_memory_limit_over_a_gpu_and_the_cpu_is_one_placement_however_its_keys_are_spelt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """accelerate's own form mixes GPU indices and "cpu" as keys (``{0: ..., "cpu": ...}``); JSON spells the index
    ``"0"``. Both name one placement (one loaded copy), and accelerate gets the index."""
    # As on a machine with one GPU, where GPU 0 may be named: only the keys' spelling is tested, nothing loads.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    as_python = Placement.of(None, "auto", {0: "20GiB", "cpu": "60GiB"})
    as_json = Placement.of(None, "auto", {"0": "20GiB", "cpu": "60GiB"})
    assert as_python.key == as_json.key
    assert as_json.from_pretrained_kwargs()["max_memory"] == {0: "20GiB", "cpu": "60GiB"}

def test_command_line_takes_json_placements() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["ask", "doc.txt", "q", "--device-map", '{"model.layers.0": 0, "": "cpu"}', "--max-memory", '{"0": "2GiB"}']
    )
    assert args.device_map == {"model.layers.0": 0, "": "cpu"} and args.max_memory == {"0": "2GiB"}
    assert parser.parse_args(["ask", "doc.txt", "q", "--device-map", "auto"]).device_map == "auto"
    assert parser.parse_args(["ask", "doc.txt", "q", "--device", "cpu"]).device == "cpu"
    with pytest.raises(SystemExit):
        parser.parse_args(["ask", "doc.txt", "q", "--device-map", "{not json"])


def test_a_device_map_loads_its_own_copy_with_equal_logits(tiny_model_dir: str) -> None:
    plain, _ = load_model(tiny_model_dir, "fp32", device="cpu")
    mapped, _ = load_model(tiny_model_dir, "fp32", device_map={"": "cpu"})
    assert mapped is not plain  # one loaded copy per placement
    assert load_model(tiny_model_dir, "fp32", device_map={"": "cpu"})[0] is mapped
    ids = torch.arange(3, 40)[None]
    assert torch.equal(mapped(ids).logits, plain(ids).logits)
    assert input_device(mapped) == torch.device("cpu")


@pytest.fixture(scope="module")
def offloaded(tiny_llama_with_real_tokenizer: Tiny) -> tuple[PreTrainedModel, PreTrainedModel]:
    """A tiny model trained to 64 tokens, and a copy whose weights accelerate keeps offloaded (on the ``meta``
    device, brought in by hooks for each forward), as ``device_map`` does for layers that do not fit."""
    _, tokenizer = tiny_llama_with_real_tokenizer
    model = tiny_llama(tokenizer, seed=5, training_length=64)
    hooked = cpu_offload(copy.deepcopy(model), execution_device=torch.device("cpu"))
    assert next(hooked.parameters()).device.type == "meta"
    return model, hooked


@pytest.mark.parametrize("strategy", ["lm-infinite", "dca", "vanilla"])
def test_a_hooked_model_answers_as_the_plain_one(
    strategy: str, offloaded: tuple[PreTrainedModel, PreTrainedModel], tiny_llama_with_real_tokenizer: Tiny,
    tmp_path: Path,
) -> None:  # fmt: skip
    model, hooked = offloaded
    tokenizer = tiny_llama_with_real_tokenizer[1]
    assert input_device(hooked) == torch.device("cpu") and set(layer_devices(hooked)) == {torch.device("cpu")}
    config = LMInfiniteConfig(n_global=4, n_local=32, chunk_size=48)
    dca = DCAConfig(chunk_size=40, local_window=8)
    ids = list(range(10, 210))  # past the training length: several chunks, the window well behind
    settings = GenerationSettings(max_new_tokens=12)

    def engine(m: PreTrainedModel) -> Engine:
        return Engine(model=m, tokenizer=tokenizer, config=config, strategy=strategy, dca=dca, reuse_prefixes=False)

    expected = engine(model).generate(ids, settings)
    on_hooks = engine(hooked)
    assert on_hooks.generate(ids, settings) == expected
    # A state saved from the hooked model loads back onto it (each layer's tensors where that layer runs).
    path = on_hooks.save_state(on_hooks.encode(ids[:150]), tmp_path / "state.safetensors")
    assert "".join(on_hooks.stream(ids, settings, state=on_hooks.load_state(path))) == expected
    assert on_hooks.options.device == "cpu"


def test_engine_options_name_where_the_model_is(tiny_llama_with_real_tokenizer: Tiny) -> None:
    model, tokenizer = tiny_llama_with_real_tokenizer
    options = Engine(model=model, tokenizer=tokenizer).options
    assert options.device == "cpu" and options.device_map is None
    json.dumps(options.__dict__)  # plain values, as the adapters report them


def test_rotation_tables_are_made_on_the_layers_device() -> None:
    """In a model split over GPUs the rotary embedding (``inv_freq``) sits with the last layers: the tables that move
    a layer's queries and keys must be made where that layer runs (here ``meta`` stands for the layer's GPU)."""
    from lminf_integrations.strategies.lm_infinite.attention import _far_rotation
    from lminf_integrations.strategies.lm_infinite.cache import _rotation_to

    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)
    layer = torch.device("meta")
    assert {t.device for t in (*_far_rotation(0, 3, 10, inv_freq, layer), *_rotation_to(5, inv_freq, layer))} == {layer}
