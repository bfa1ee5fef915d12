"""One declaration of every setting (``lminf_integrations.settings.SETTINGS``): each reaches LangChain's
``LMInfiniteLLM`` and ``ChatLMInfinite``, LlamaIndex's ``LMInfiniteLLM`` and ``lminf``, spelled the same; the
generation settings are accepted per call by both frameworks; ``engine=`` follows one rule everywhere."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations import cli
from lminf_integrations.config import DCAConfig, EngineOptions, GenerationSettings, LMInfiniteConfig, XL3MConfig
from lminf_integrations.engine import Engine
from lminf_integrations.langchain import ChatLMInfinite
from lminf_integrations.langchain import LMInfiniteLLM as LangChainLLM
from lminf_integrations.llama_index import LMInfiniteLLM as LlamaIndexLLM
from lminf_integrations.settings import BY_NAME, ENGINE_GROUPS, SETTINGS, Resolved, markdown_table

ADAPTERS = [LangChainLLM, ChatLMInfinite, LlamaIndexLLM]

# A valid value other than the default for each setting, with any setting it needs alongside. Written out, not
# derived, so a new setting fails test_every_setting_has_a_sample until someone decides what to try.
SAMPLES: dict[str, dict[str, Any]] = {
    "model_id": {"model_id": "org/some-model"},
    "dtype": {"dtype": "fp32"},
    "device": {"device": "cpu"},
    "device_map": {"device_map": {"model.layers.0": 0, "": "cpu"}},
    "max_memory": {"device_map": "auto", "max_memory": {"cpu": "1GiB"}},
    "chat_template_kwargs": {"chat_template_kwargs": {"enable_thinking": False}},
    "strategy": {"strategy": "vanilla"},
    "compile_decode": {"compile_decode": True},
    "n_global": {"n_global": 3},
    "n_local": {"n_local": 100},
    "distance_limit": {"distance_limit": 50},
    "top_k": {"top_k": 2, "cache_mode": "full"},
    "top_k_from_layer": {"top_k": 2, "cache_mode": "full", "top_k_from_layer": 1},
    "cache_mode": {"cache_mode": "full"},
    "chunk_size": {"chunk_size": 64},
    "segment_tokens": {"strategy": "xl3m", "segment_tokens": 512},
    "question_tokens": {"strategy": "xl3m", "question_tokens": 32},
    "context_tokens": {"strategy": "xl3m", "context_tokens": 2048},
    "candidates": {"strategy": "xl3m", "candidates": 12},
    "passage_tokens": {"strategy": "xl3m", "passage_tokens": 24},
    "passage_margin": {"strategy": "xl3m", "passage_margin": 1.5},
    "hop_margin": {"strategy": "xl3m", "hop_margin": 1.0},
    "hop_confidence": {"strategy": "xl3m", "hop_confidence": 0.5},
    "score": {"strategy": "xl3m", "score": "entropy"},
    "dca_chunk_size": {"strategy": "dca", "dca_chunk_size": 4096},
    "dca_local_window": {"strategy": "dca", "dca_local_window": 512},
    "max_new_tokens": {"max_new_tokens": 7},
    "temperature": {"temperature": 0.5},
    "top_p": {"top_p": 0.9},
    "seed": {"seed": 11},
    "stop": {"stop": ("END", "STOP")},
    "progress": {"progress": False},
}
CASES = [(name, values) for name, values in SAMPLES.items()]


def _engine_value(resolved: Resolved, name: str) -> Any:
    """Where a setting lands in the validated settings an entry point builds."""
    setting = BY_NAME[name]
    if setting.group == "display":
        return getattr(resolved, name)
    parts = {
        "attention": resolved.config,
        "encoding": resolved.config,  # the prefill step: an LMInfiniteConfig field, every strategy's setting
        "xl3m": resolved.xl3m,
        "dca": resolved.dca,
        "generation": resolved.generation,
    }
    return getattr(parts.get(setting.group, resolved.options), setting.field_name)


def _cli_args(values: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for name, value in values.items():
        flag = BY_NAME[name].flags[0]
        if isinstance(value, bool):
            args.append(flag if value else flag.replace("--", "--no-", 1))
        elif isinstance(value, tuple):
            args.extend(part for text in value for part in (flag, text))
        elif isinstance(value, dict):
            args.extend([flag, json.dumps(value)])
        else:
            args.extend([flag, str(value)])
    return args


def _cli_settings(values: dict[str, Any], command: str = "ask") -> Resolved:
    parser = cli.build_parser()
    inputs = ["doc.txt", "question"] if command == "ask" else ["doc.txt", "-o", "out.lminf"]
    args = parser.parse_args([command, *inputs, *_cli_args(values)])
    groups = cli.ASK_GROUPS if command == "ask" else cli.ENCODE_GROUPS
    return cli._settings(args, parser, groups)


def test_every_setting_has_a_sample_and_comes_from_the_engines_dataclasses() -> None:
    assert set(SAMPLES) == set(BY_NAME)
    classes = (EngineOptions, LMInfiniteConfig, XL3MConfig, DCAConfig, GenerationSettings)
    declared = [f for cls in classes for f in dataclasses.fields(cls)]
    names = [f.metadata["name"] or f.name for f in declared]
    assert [s.name for s in SETTINGS] == [*names, "progress"]
    assert len(set(names)) == len(names)  # one flat namespace: DCA's chunk_size is dca_chunk_size
    for name, field in zip(names, declared, strict=True):  # defaults and help are the dataclasses' own
        assert (BY_NAME[name].default, BY_NAME[name].help) == (field.default, field.metadata["help"])


@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda c: f"{c.__module__.split('.')[-2]}.{c.__name__}")
@pytest.mark.parametrize(("name", "values"), CASES, ids=[name for name, _ in CASES])
def test_each_adapter_takes_each_setting_by_its_one_name(cls: type, name: str, values: dict[str, Any]) -> None:
    model = cls(**values)  # lazy: nothing is loaded
    for key, value in values.items():
        assert getattr(model, key) == value
        assert _engine_value(model.lminf_settings, key) == value
    defaults = cls()
    assert getattr(defaults, name) == BY_NAME[name].default
    assert name in (cls.__doc__ or "")  # the class docstring lists it (rendered from the declaration)


@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda c: f"{c.__module__.split('.')[-2]}.{c.__name__}")
@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.aliases], ids=lambda s: s.name)
def test_aliases_are_accepted_everywhere(cls: type, setting: Any) -> None:
    value = SAMPLES[setting.name][setting.name]
    for alias in setting.aliases:
        assert getattr(cls(**{alias: value}), setting.name) == value
        with pytest.raises(ValueError, match=f"{alias} or {setting.name}"):
            cls(**{alias: value, setting.name: value})


@pytest.mark.parametrize(("name", "values"), CASES, ids=[name for name, _ in CASES])
def test_the_cli_takes_each_setting_by_its_one_name(name: str, values: dict[str, Any]) -> None:
    resolved = _cli_settings(values)
    for key, value in values.items():
        assert _engine_value(resolved, key) == value
    assert _engine_value(_cli_settings({}), name) == BY_NAME[name].default
    if BY_NAME[name].group in ("model", "strategy", "attention", "display"):  # `encode`'s: the state must match
        assert _engine_value(_cli_settings(values, "encode"), name) == values[name]
    for flag in BY_NAME[name].flags[1:]:  # aliases
        args = cli.build_parser().parse_args(["ask", "doc.txt", "q", flag, str(values[name])])
        assert getattr(args, name) == values[name]
    annotation = BY_NAME[name].annotation
    if any(annotation == kind | None for kind in (int, float, str)):  # "none" says None, whatever the default
        args = cli.build_parser().parse_args(["ask", "doc.txt", "q", BY_NAME[name].flags[0], "none"])
        assert getattr(args, name) is None


def test_bad_values_are_refused_by_every_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    for cls in ADAPTERS:
        with pytest.raises(ValueError, match="top_k > 0 needs cache_mode='full'"):
            cls(top_k=3)
        with pytest.raises(ValueError, match="n_locl.*did you mean 'n_local'"):
            cls(n_locl=5)
        with pytest.raises(ValueError, match="n_local=True: n_local takes"):  # not pydantic's True -> 1
            cls(n_local=True)
        with pytest.raises(ValueError, match="top_p=False: top_p takes"):
            cls(top_p=False)
        with pytest.raises(ValueError, match="seed must be None or an int in"):  # at once, not at generation
            cls(seed=2**70)
    with pytest.raises(SystemExit):
        _cli_settings({"top_k": 3})
    assert "top_k > 0 needs cache_mode='full'" in capsys.readouterr().err


# A setting another setting switches off does nothing; given anyway, it is refused (as a setting of another strategy
# is), so that a run never looks as if it had used it. Each case: the settings, and the one the message must name.
SWITCHED_OFF = [
    ({"top_k_from_layer": 2}, "top_k_from_layer=2 has no effect with top_k=0"),
    ({"compile_decode": True, "cache_mode": "full"}, "compile_decode=True has no effect with cache_mode='full'"),
    ({"distance_limit": 50, "n_global": 0}, "distance_limit=50 has no effect with n_global=0 and top_k=0"),
    ({"strategy": "xl3m", "passage_tokens": None, "passage_margin": 1.0}, "passage_margin=1.0 has no effect with "
     "passage_tokens=None"),
    ({"strategy": "xl3m", "passage_tokens": None, "hop_margin": 1.0}, "hop_margin=1.0 has no effect with "
     "passage_tokens=None"),
    ({"strategy": "xl3m", "hop_margin": None, "hop_confidence": 0.9}, "hop_confidence=0.9 has no effect with "
     "hop_margin=None"),
]  # fmt: skip


@pytest.mark.parametrize(("values", "message"), SWITCHED_OFF, ids=[m.split("=")[0] for _, m in SWITCHED_OFF])
def test_a_setting_switched_off_by_another_is_refused(
    values: dict[str, Any], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for cls in ADAPTERS:
        with pytest.raises(ValueError, match=re.escape(message)):
            cls(**values)
    with pytest.raises(SystemExit):
        _cli_settings(values)
    assert message in capsys.readouterr().err
    # The switch alone is fine, and so is the setting once it is switched on.
    switch = {k: v for k, v in values.items() if k != message.split("=")[0]}
    for cls in ADAPTERS:
        cls(**switch)


def test_an_engine_built_directly_is_wrapped_whatever_its_settings(
    tiny_llama_with_real_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    """The rule above is for settings a person gives an entry point; an Engine built from the dataclasses (which do
    not apply it) is wrapped as it is, and its settings reported."""
    model, tokenizer = tiny_llama_with_real_tokenizer
    engine = Engine(model=model, tokenizer=tokenizer, config=LMInfiniteConfig(n_local=64, top_k_from_layer=1))
    for cls in ADAPTERS:
        assert cls(engine=engine).top_k_from_layer == 1


# ---- with a real (tiny) engine -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_llama_with_real_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> Engine:
    model, tokenizer = tiny_llama_with_real_tokenizer
    return Engine(model=model, tokenizer=tokenizer, config=LMInfiniteConfig(n_global=4, n_local=64, chunk_size=32))


class SettingsSpy:
    """Wraps ``engine.stream`` (the real one runs) and keeps the generation settings each call used."""

    def __init__(self, engine: Engine) -> None:
        self.real, self.seen = engine.stream, []

    def __call__(self, prompt: Any, settings: GenerationSettings, *args: Any, **kwargs: Any) -> Any:
        self.seen.append(settings)
        return self.real(prompt, settings, *args, **kwargs)


def _call(model: Any, prompt: str = "Hello there", **options: Any) -> None:
    if isinstance(model, LlamaIndexLLM):
        model.complete(prompt, **options)
    else:
        model.invoke(prompt, **options)


@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda c: f"{c.__module__.split('.')[-2]}.{c.__name__}")
async def test_on_progress_is_called_while_a_prompt_is_encoded(cls: type, engine: Engine) -> None:
    """``on_progress=`` (a field of every class): called with (done, total) as the prompt is read, ending at the
    whole prompt, in sync and async calls."""
    prompt = "The kettle is kept in the blue cupboard. " * 12  # over chunk_size=32 tokens: several reports
    for run in ("sync", "async"):
        seen: list[tuple[int, int]] = []
        model = cls(engine=engine, max_new_tokens=2, on_progress=lambda d, t, seen=seen: seen.append((d, t)))
        if run == "sync":
            _call(model, prompt=prompt + run)
        elif isinstance(model, LlamaIndexLLM):
            await model.acomplete(prompt + run)
        else:
            await model.ainvoke(prompt + run)
        assert len(seen) >= 2 and seen[-1][0] == seen[-1][1] > 32, (run, seen)
        assert all(a[0] < b[0] for a, b in zip(seen, seen[1:], strict=False)), (run, seen)  # each report once


@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda c: f"{c.__module__.split('.')[-2]}.{c.__name__}")
def test_generation_settings_per_call_in_both_frameworks(
    cls: type, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = SettingsSpy(engine)
    monkeypatch.setattr(engine, "stream", spy)
    model = cls(engine=engine, max_new_tokens=2, stop=["A"])
    per_call = [s for s in SETTINGS if s.per_call]
    for setting in per_call:
        for name in (setting.name, *setting.aliases):
            _call(model, **{name: SAMPLES[setting.name][setting.name]})
            settings = spy.seen[-1]
            expected = SAMPLES[setting.name][setting.name]
            if setting.name == "stop":  # a call's stop strings add to the instance's
                expected = ("A", *expected)
            assert getattr(settings, setting.name) == expected, name
    with pytest.raises(TypeError, match="n_local"):
        _call(model, n_local=5)  # fixed when the model is built


@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda c: f"{c.__module__.split('.')[-2]}.{c.__name__}")
def test_one_rule_for_engine(cls: type, engine: Engine) -> None:
    wrapped = cls(engine=engine, temperature=0.5, progress=False)  # generation and display settings: fine
    assert wrapped.load() is engine and wrapped.temperature == 0.5
    assert (wrapped.n_local, wrapped.chunk_size, wrapped.dtype) == (64, 32, "fp32")  # the engine's own values
    for name, values in SAMPLES.items():
        if BY_NAME[name].group in ENGINE_GROUPS:
            with pytest.raises(ValueError, match=f"either engine= or {name}") as error:
                cls(engine=engine, **{name: values[name]})
            # advice that works: Engine takes its settings as dataclasses, not by name
            assert f"Engine.from_settings(resolve({{'{name}': ...}}))" in str(error.value)




@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda c: f"{c.__module__.split('.')[-2]}.{c.__name__}")
def test_one_stop_string_is_taken_as_at_a_call(cls: type) -> None:
    """A call takes ``stop="###"`` as one stop string; the constructor takes it the same way."""
    assert cls(stop="###").stop == ("###",)

@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda c: f"{c.__module__.split('.')[-2]}.{c.__name__}")
def test_settings_are_checked_when_assigned_and_the_engines_stay_fixed_once_built(cls: type, engine: Engine) -> None:
    """An engine's settings cannot change under it: assigning one after it is built is refused (the field would
    report a value that never ran, in traces and cache keys too). Other settings are checked as they are assigned,
    not at the next call."""
    wrapped = cls(engine=engine)
    with pytest.raises(ValueError, match="n_local is fixed once the engine is built"):
        wrapped.n_local = 2048
    assert wrapped.n_local == 64 and wrapped.lminf_config.n_local == 64
    wrapped.temperature = 0.3
    with pytest.raises(ValueError, match="temperature"):
        wrapped.temperature = -1.0
    assert wrapped.temperature == 0.3
    unbuilt = cls()  # no engine yet: its settings may still change, each checked
    unbuilt.n_local = 2048
    with pytest.raises(ValueError, match="n_local"):
        unbuilt.n_local = -5
    assert unbuilt.n_local == 2048

@pytest.mark.parametrize(
    ("message", "match"),
    [
        (ChatMessage(role=MessageRole.TOOL, content="42"), "role 'tool'"),
        (
            ChatMessage(role=MessageRole.USER, blocks=[TextBlock(text="see"), ImageBlock(url="http://x/y.png")]),
            "'image'",
        ),
        (ChatMessage(role=MessageRole.ASSISTANT, content="", additional_kwargs={"tool_calls": [{"id": "1"}]}), "tool"),
    ],
)
def test_llama_index_refuses_what_the_model_cannot_read(engine: Engine, message: ChatMessage, match: str) -> None:
    """Non-text blocks were silently dropped before: the model answered a question the user did not ask."""
    with pytest.raises(ValueError, match=match):
        LlamaIndexLLM(engine=engine, max_new_tokens=1).chat([ChatMessage(role=MessageRole.USER, content="hi"), message])


def test_usage_and_model_name_are_reported_the_same_way(engine: Engine) -> None:
    message = ChatLMInfinite(engine=engine, max_new_tokens=3).invoke("Hello there")
    response = LlamaIndexLLM(engine=engine, max_new_tokens=3).chat(
        [ChatMessage(role=MessageRole.USER, content="Hello there")]
    )
    assert message.usage_metadata is not None
    assert dict(message.usage_metadata) == response.raw["usage"]  # input/output/total tokens, same names
    assert message.response_metadata["model_name"] == response.raw["model_name"] == engine.model_name
    assert message.response_metadata["finish_reason"] == response.raw["finish_reason"]


def test_readme_lists_every_setting_as_declared() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme  # regenerate README's table with settings.markdown_table() when this fails
