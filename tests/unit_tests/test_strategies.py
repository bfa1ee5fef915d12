"""The strategy layer: ``strategy="vanilla"`` is the unpatched model, strategies can share one loaded model, states
record their strategy, and every entry point builds the strategy it is given."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lminf_integrations import cli
from lminf_integrations.config import STRATEGY_NAMES, GenerationSettings, LMInfiniteConfig, StrategyName
from lminf_integrations.engine import Engine
from lminf_integrations.langchain import ChatLMInfinite
from lminf_integrations.langchain import LMInfiniteLLM as LangChainLLM
from lminf_integrations.llama_index import LMInfiniteLLM as LlamaIndexLLM
from lminf_integrations.patch import is_patched
from lminf_integrations.strategies import make_strategy
from tests.tiny_models import tiny_llama

CONFIG = LMInfiniteConfig(n_global=2, n_local=16, chunk_size=8)
GREEDY = GenerationSettings(max_new_tokens=6)


@pytest.fixture(scope="module")
def tiny(default_tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model of this module's own: these tests switch it between strategies."""
    return tiny_llama(default_tokenizer, 1), default_tokenizer


def _prompt(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return list(tokenizer("The quick brown fox jumps over the lazy dog. " * 6, add_special_tokens=False).input_ids)


def test_every_declared_strategy_is_registered() -> None:
    assert STRATEGY_NAMES == typing.get_args(StrategyName) == ("lm-infinite", "xl3m", "dca", "vanilla")
    assert [make_strategy(name, CONFIG).name for name in STRATEGY_NAMES] == list(STRATEGY_NAMES)
    with pytest.raises(ValueError, match="unknown strategy 'infini-attention'"):
        make_strategy("infini-attention", CONFIG)


def test_vanilla_is_the_unpatched_model(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    model, tokenizer = tiny
    ids = _prompt(tokenizer)  # longer than n_local: LM-Infinite would differ
    engine = Engine(model=model, tokenizer=tokenizer, config=CONFIG, strategy="vanilla", reuse_prefixes=False)
    answer = engine.stream(ids, GREEDY)
    text = "".join(answer)
    assert not is_patched(model)
    with torch.inference_mode():
        reference = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, top_k=None)
    assert tokenizer.decode(reference[0, len(ids) :], skip_special_tokens=True) == text
    assert answer.result is not None and answer.result.output_tokens == 6


def test_strategies_share_a_model(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    model, tokenizer = tiny
    ids = _prompt(tokenizer)
    engines = {
        name: Engine(model=model, tokenizer=tokenizer, config=CONFIG, strategy=name, reuse_prefixes=False)
        for name in STRATEGY_NAMES
    }
    alone = {name: engine.generate(ids, GREEDY) for name, engine in engines.items()}
    assert alone["lm-infinite"] != alone["vanilla"]  # the prompt is past the window: Λ attention sees less
    for name in [*STRATEGY_NAMES, *reversed(STRATEGY_NAMES)]:  # each prepares the model it shares
        assert engines[name].generate(ids, GREEDY) == alone[name]


def test_states_record_their_strategy(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase], tmp_path: Path) -> None:
    model, tokenizer = tiny
    ids = _prompt(tokenizer)
    vanilla = Engine(model=model, tokenizer=tokenizer, config=CONFIG, strategy="vanilla", reuse_prefixes=False)
    state = vanilla.encode(ids[:40])
    path = vanilla.save_state(state, tmp_path / "doc.lminf")
    loaded = vanilla.load_state(path)
    assert loaded.token_ids == ids[:40] and loaded.cache.get_seq_length() == 40
    assert vanilla.generate(ids, GREEDY) == "".join(vanilla.stream(ids, GREEDY, state=loaded))
    other = Engine(model=model, tokenizer=tokenizer, config=CONFIG, reuse_prefixes=False)
    with pytest.raises(ValueError, match="strategy: file 'vanilla', now 'lm-infinite'"):
        other.load_state(path)


def test_compiled_decoding_needs_lm_infinite(tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="compile_decode=True needs strategy='lm-infinite'"):
        Engine(model=model, tokenizer=tokenizer, strategy="vanilla", compile_decode=True)
    with pytest.raises(ValueError, match="strategy must be one of lm-infinite, xl3m, dca, vanilla"):
        Engine(model=model, tokenizer=tokenizer, strategy="infini-attention")


@pytest.mark.parametrize("cls", [LangChainLLM, ChatLMInfinite, LlamaIndexLLM], ids=lambda c: c.__module__)
def test_every_adapter_builds_the_strategy_it_is_given(
    cls: type, tiny_model_dir: str, tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase]
) -> None:
    engine = cls(model_id=tiny_model_dir, strategy="vanilla", dtype="fp32").load()
    assert engine.strategy.name == "vanilla" and engine.options.strategy == "vanilla"
    dca = cls(model_id=tiny_model_dir, strategy="dca", dca_chunk_size=1000, dtype="fp32").load()
    assert dca.strategy.name == "dca" and dca.strategy.settings()["dca_chunk_size"] == 1000
    model, tokenizer = tiny
    wrapped = cls(engine=Engine(model=model, tokenizer=tokenizer, config=CONFIG, strategy="vanilla"))
    assert wrapped.strategy == "vanilla" and wrapped.n_local == LMInfiniteConfig().n_local  # no attention settings


def test_attention_settings_with_another_strategy_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for cls in (LangChainLLM, ChatLMInfinite, LlamaIndexLLM):
        with pytest.raises(ValueError, match="n_local=2048: settings of strategy='lm-infinite' have no effect"):
            cls(strategy="vanilla", n_local=2048)
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        cli._settings(
            parser.parse_args(["ask", "d", "q", "--strategy", "vanilla", "--n-local", "9"]), parser, cli.ASK_GROUPS
        )
    assert "n_local=9: settings of strategy='lm-infinite' have no effect" in capsys.readouterr().err


@pytest.mark.parametrize("strategy", ["dca", "xl3m", "vanilla"])
def test_the_prefill_step_is_every_strategys_setting(strategy: str) -> None:
    # chunk_size sets how many prompt tokens go through the model per forward, whatever the strategy.
    for command in ("ask", "encode"):
        parser = cli.build_parser()
        inputs = ["d", "q"] if command == "ask" else ["d", "-o", "s.lminf"]
        args = parser.parse_args([command, *inputs, "--strategy", strategy, "--chunk-size", "512"])
        groups = cli.ASK_GROUPS if command == "ask" else cli.ENCODE_GROUPS
        assert cli._settings(args, parser, groups).config.chunk_size == 512
    for cls in (LangChainLLM, ChatLMInfinite, LlamaIndexLLM):
        assert cls(strategy=strategy, chunk_size=512).chunk_size == 512


def test_the_cli_builds_the_strategy_it_is_given(tiny_model_dir: str) -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["ask", "doc.txt", "q", "--model", tiny_model_dir, "--strategy", "vanilla"])
    assert cli._engine(cli._settings(args, parser, cli.ASK_GROUPS)).strategy.name == "vanilla"


def _tiny(config: PretrainedConfig) -> PreTrainedModel:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _small(**overrides: typing.Any) -> dict[str, typing.Any]:
    return {"vocab_size": 64, "num_hidden_layers": 1, **overrides}


@pytest.mark.parametrize("strategy,label", [("lm-infinite", "LM-Infinite"), ("dca", "Dual Chunk"), ("xl3m", "XL3M")])
def test_every_strategy_refuses_an_architecture_it_cannot_run(strategy: str, label: str) -> None:
    """Each strategy names itself and the architecture, before any setting is checked against the model: GPT-2
    trained to 1024 tokens would otherwise be refused for the default n_local, which is not the reason."""
    gpt2 = _tiny(GPT2Config(**_small(), n_embd=32, n_head=2, n_positions=1024))
    with pytest.raises(ValueError, match=rf"^{label}.* model_type 'gpt2'"):
        make_strategy(strategy, LMInfiniteConfig()).check(gpt2)


@pytest.mark.parametrize("rope", ["dynamic", "longrope"])
@pytest.mark.parametrize("strategy", ["lm-infinite", "dca"])
def test_rope_that_changes_with_the_input_length_is_refused(strategy: str, rope: str) -> None:
    """Dynamic NTK and LongRoPE recompute the rotary frequencies once the input passes the training length, while
    the patched attention rotates global and chunked keys with the frequencies it read when patched: refused."""
    parameters = {"rope_type": rope, "factor": 2.0, "rope_theta": 10000.0}
    if rope == "longrope":
        parameters.update(short_factor=[1.0] * 8, long_factor=[2.0] * 8, original_max_position_embeddings=256)
    config = LlamaConfig(**_small(), hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=512, rope_parameters=parameters)  # fmt: skip
    model = _tiny(config)
    with pytest.raises(ValueError, match=f"rope_type '{rope}'"):
        make_strategy(strategy, LMInfiniteConfig(n_local=256, n_global=4)).check(model)
    with pytest.raises(ValueError, match=f"rope_type '{rope}'"):
        make_strategy(strategy, LMInfiniteConfig(n_local=256, n_global=4)).prepare(model)
    make_strategy("xl3m", LMInfiniteConfig()).check(model)  # reads each segment within the training length


def test_fixed_rope_scaling_is_accepted() -> None:
    parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    config = LlamaConfig(**_small(), hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=512, rope_parameters=parameters)  # fmt: skip
    for strategy in ("lm-infinite", "dca"):
        make_strategy(strategy, LMInfiniteConfig(n_local=256, n_global=4)).check(_tiny(config))


def test_a_window_past_the_training_length_is_refused_saying_what_to_pass() -> None:
    """The default n_local (4096) does not fit a model trained on 2,048 tokens (TinyLlama): the refusal names the
    largest value that fits, in both spellings."""
    config = LlamaConfig(**_small(), hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=2048)  # fmt: skip
    with pytest.raises(ValueError, match=r"n_local=4096 exceeds .* 2048: pass n_local=2048 or less \(--n-local 2048\)"):
        make_strategy("lm-infinite", LMInfiniteConfig()).check(_tiny(config))
    with pytest.raises(ValueError, match=r"distance_limit=3000 .*pass distance_limit=2048 or less"):
        make_strategy("lm-infinite", LMInfiniteConfig(n_local=1024, distance_limit=3000)).check(_tiny(config))
