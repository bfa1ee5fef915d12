"""Compiled decoding (``Engine(compile_decode=True)``): the same tokens as eager decoding, really compiled, no graph
breaks, and eager decoding wherever the cache is not steady."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations import LMInfiniteConfig, new_cache, patch_model
from lminf_integrations.compiled import generate_kwargs, inductor_settings
from lminf_integrations.engine import Engine, GenerationSettings
from lminf_integrations.hf_compat import cache_kwargs
from lminf_integrations.ops import decode_kernel
from lminf_integrations.strategies.lm_infinite import attention
from tests.tolerances import assert_close, network_bound

CONFIG = LMInfiniteConfig(n_global=2, n_local=16, chunk_size=8)


def _prompt(n: int) -> list[int]:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(100, 5000, (n,), generator=generator).tolist()


@pytest.fixture
def fresh_compiler() -> None:
    torch._dynamo.reset()
    counters.clear()


def test_compiled_steps_give_the_eager_tokens(
    tiny_llama_with_real_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase], fresh_compiler: None
) -> None:
    model, tokenizer = tiny_llama_with_real_tokenizer
    prompt, settings = _prompt(60), GenerationSettings(max_new_tokens=30)
    eager = Engine(model=model, tokenizer=tokenizer, config=CONFIG, reuse_prefixes=False)
    compiled = Engine(model=model, tokenizer=tokenizer, config=CONFIG, reuse_prefixes=False, compile_decode=True)
    expected = eager.stream(prompt, settings)
    expected_text = "".join(expected)
    assert counters["stats"]["unique_graphs"] == 0
    got = compiled.stream(prompt, settings)
    assert "".join(got) == expected_text
    assert got.result is not None and expected.result is not None
    assert got.result.output_tokens == expected.result.output_tokens == 30
    assert counters["stats"]["unique_graphs"] >= 1  # the steps really ran compiled
    assert not counters["graph_break"]  # ... as whole graphs
    # Another document of the same shape reuses the compiled step.
    graphs = counters["stats"]["unique_graphs"]
    other = _prompt(80)[20:]
    assert "".join(compiled.stream(other, settings)) == "".join(eager.stream(other, settings))
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("prompt_length", [60, 8], ids=["window-full", "window-filling-up"])
@torch.no_grad()
def test_compiled_steps_give_the_eager_logits(
    tiny_llama_with_real_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase],
    fresh_compiler: None,
    prompt_length: int,
) -> None:
    """Every step's logits, not just the chosen tokens (a wrong rotation of the global keys moves logits by ~1e-3,
    which greedy tokens on a random model do not show). A short prompt's steps run masked while the window fills
    and the global tokens leave it (positions 8 to 19 here, window 16), against the eager general path."""
    model, _ = tiny_llama_with_real_tokenizer
    patch_model(model, CONFIG)
    ids = torch.tensor([_prompt(prompt_length)])

    def scores(compiled: bool) -> torch.Tensor:
        cache = new_cache(model)
        cache.allow_compiled_steps(compiled)
        model.model(ids[:, :-1], **cache_kwargs(cache))
        with inductor_settings(compiled):
            out = model.generate(
                ids, **cache_kwargs(cache), max_new_tokens=12, do_sample=False, output_scores=True,
                return_dict_in_generate=True, **generate_kwargs(compiled),
            )
        return torch.stack(out.scores)

    eager = scores(False)
    compiled = scores(True)
    assert counters["stats"]["unique_graphs"] >= 1
    # inductor fuses and reorders the float32 sums: equal up to rounding over the model's longest reduction (MLP
    # width 128) through its 2 layers and lm head (tests/tolerances.py); a wrong rotation moves logits by ~1e-3.
    assert_close(compiled, eager, network_bound(eager, torch.float32, reduction=128, layers=3))


@pytest.mark.parametrize(
    "config,prompt_length",
    [(CONFIG, 2), (LMInfiniteConfig(n_global=2, n_local=16, cache_mode="full"), 60)],
    ids=["global-tokens-not-yet-seen", "full-cache"],
)
def test_caches_that_change_shape_decode_eagerly(
    tiny_llama_with_real_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase],
    fresh_compiler: None,
    config: LMInfiniteConfig,
    prompt_length: int,
) -> None:
    model, tokenizer = tiny_llama_with_real_tokenizer
    settings = GenerationSettings(max_new_tokens=8)
    eager = Engine(model=model, tokenizer=tokenizer, config=config, reuse_prefixes=False)
    compiled = Engine(model=model, tokenizer=tokenizer, config=config, reuse_prefixes=False, compile_decode=True)
    prompt = _prompt(prompt_length)
    assert "".join(compiled.stream(prompt, settings)) == "".join(eager.stream(prompt, settings))
    assert counters["stats"]["unique_graphs"] == 0



@torch.no_grad()
def test_compiled_steps_build_the_cpus_decoding_kernel_only_for_a_cache_on_the_cpu(
    tiny_llama_with_real_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compiled step uses the C++ kernel only if it was built before the step was traced, so allowing compiled
    steps builds it; but an empty cache does not know its device yet, and a GPU's cache must not build a CPU kernel
    (a compiler run, and it needs a C++ compiler). It is built when the cache meets its first keys, on the CPU."""
    builds: list[int] = []
    monkeypatch.setattr(decode_kernel, "_state", {})
    monkeypatch.setattr(decode_kernel, "_build", lambda: builds.append(1) or None)
    model, _ = tiny_llama_with_real_tokenizer
    patch_model(model, CONFIG)
    cache = new_cache(model)
    cache.allow_compiled_steps()
    assert not builds  # no device yet
    layer = cache.lambda_layers[0]  # type: ignore[union-attr]
    elsewhere = torch.zeros(1, 2, 3, 16, device="meta")  # stands for a GPU's keys
    layer.lazy_initialization(elsewhere, elsewhere)
    assert not builds
    model.model(torch.tensor([_prompt(4)]), **cache_kwargs(new_cache(model)))  # eager steps: nothing to build
    assert not builds
    cpu_cache = new_cache(model)
    cpu_cache.allow_compiled_steps()
    model.model(torch.tensor([_prompt(4)]), **cache_kwargs(cpu_cache))
    assert builds == [1]

@torch.no_grad()
def test_steady_cache_is_compileable_only_while_shapes_are_fixed_and_allowed(
    tiny_llama_with_real_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    model, _ = tiny_llama_with_real_tokenizer
    patch_model(model, CONFIG)
    cache = new_cache(model)
    ids = torch.tensor([_prompt(40)])
    model.model(ids[:, :1], **cache_kwargs(cache))
    cache.allow_compiled_steps()
    assert not cache.is_compileable  # a global token still to come
    model.model(ids[:, 1:2], **cache_kwargs(cache))
    assert cache.is_compileable and cache.get_seq_length() == 2  # masked fixed-shape steps from here on
    model.model(ids[:, 2:16], **cache_kwargs(cache))
    cache.allow_compiled_steps(False)  # not unless allowed (on a GPU, transformers would compile unasked)
    assert not cache.is_compileable and cache.get_seq_length() == 16
    model.model(ids[:, 16:17], **cache_kwargs(cache))
    assert not cache.is_compileable  # eager steps are steady too from here, but not compileable unless allowed
    cache.allow_compiled_steps()
    model.model(ids[:, 17:18], **cache_kwargs(cache))
    model.model(ids[:, 18:25], **cache_kwargs(cache))  # a chunk after steady steps: the general path again
    assert cache.get_seq_length() == 25 and cache.is_compileable
    assert cache.clone().is_compileable and cache.clone().get_seq_length() == 25


def test_a_graph_break_is_an_error_that_names_the_fix(
    tiny_llama_with_real_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase],
    fresh_compiler: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fullgraph=True: a step dynamo cannot trace whole (a break forced inside the attention here) fails loudly
    instead of running split around the break, and the same engine still answers eagerly."""
    original = attention._decode_op

    def breaking(query: torch.Tensor, keys: torch.Tensor) -> object:
        torch._dynamo.graph_break()
        return original(query, keys)

    monkeypatch.setattr(attention, "_decode_op", breaking)
    model, tokenizer = tiny_llama_with_real_tokenizer
    prompt, settings = _prompt(60), GenerationSettings(max_new_tokens=12)
    compiled_engine = Engine(model=model, tokenizer=tokenizer, config=CONFIG, reuse_prefixes=False, compile_decode=True)
    with pytest.raises(RuntimeError, match="compile_decode=False"):
        "".join(compiled_engine.stream(prompt, settings))
    eager = Engine(model=model, tokenizer=tokenizer, config=CONFIG, reuse_prefixes=False)
    assert len("".join(eager.stream(prompt, settings))) > 0


def test_the_cpu_tuned_compile_settings_stay_off_a_gpu() -> None:
    """Prepacked frozen weights, CPU GEMM autotuning and the C++ wrapper are tuned for CPU decoding; a GPU's compile
    takes transformers' own mode for accelerators (CUDA graphs) and inductor's defaults."""
    import torch._inductor.config as inductor_config

    names = ("freezing", "max_autotune", "cpp_wrapper")
    defaults = {name: getattr(inductor_config, name) for name in names}
    with inductor_settings(True, torch.device("cuda")):
        assert {name: getattr(inductor_config, name) for name in names} == defaults
    with inductor_settings(True, torch.device("cpu")):
        assert all(getattr(inductor_config, name) for name in names)
    assert generate_kwargs(True, torch.device("cuda"))["compile_config"].mode == "reduce-overhead"
    cpu = generate_kwargs(True, torch.device("cpu"))["compile_config"]
    assert cpu.mode == "default" and cpu.fullgraph and cpu._compile_all_devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (python -m bench gpu runs the same check)")
def test_on_cuda_compiled_steps_give_the_eager_logits_for_one_cache_after_another(fresh_compiler: None) -> None:
    """CUDA graphs over the window cache's buffers (marked static, unguarded): a second cache of the same shape
    decodes on its own buffers, not the first one's."""
    from bench import gpu

    for dtype in (torch.float32, torch.bfloat16):
        check = gpu._compiled_decoding_check(torch.device("cuda"), dtype)
        assert check.ok, check


@torch.no_grad()
def test_a_model_offloaded_to_the_cpu_decodes_eagerly_and_says_so(
    tiny_llama_with_real_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """transformers does not compile a model whose device map offloads layers to the CPU or disk: compiled steps
    must not be allowed on its cache then (their eager form waits on the device at every layer), and the user is
    told why compile_decode has no effect. The device map is accelerate's record of where each module went."""
    import logging

    model, tokenizer = tiny_llama_with_real_tokenizer
    monkeypatch.setattr(model, "hf_device_map", {"model.embed_tokens": 0, "model.layers": "cpu"}, raising=False)
    engine = Engine(model=model, tokenizer=tokenizer, config=CONFIG, reuse_prefixes=False, compile_decode=True)
    patch_model(model, CONFIG)
    cache = new_cache(model)
    model.model(torch.tensor([_prompt(20)]), **cache_kwargs(cache))
    with caplog.at_level(logging.WARNING, logger="lminf_integrations"):
        assert not engine._compiles(cache)  # type: ignore[arg-type]
    assert not cache.is_compileable
    assert any("offload" in r.getMessage() for r in caplog.records)
