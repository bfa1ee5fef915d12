"""LangChain classes on a tiny random-weight Llama with the real tokenizer: plumbing and behaviour, not quality."""

from __future__ import annotations

import asyncio
import io
from contextlib import aclosing
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_tests.unit_tests import ChatModelUnitTests
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations import model_thread
from lminf_integrations.config import LMInfiniteConfig, merge_stop
from lminf_integrations.engine import Engine, GenerationSettings
from lminf_integrations.langchain import PROGRESS_EVENT, ChatLMInfinite, LMInfiniteLLM, messages_to_chat
from lminf_integrations.models import DEFAULT_MODEL_NAME
from lminf_integrations.streaming import StreamResult, TerminalProgress, TokenStream

# A small window and chunks: prompts of a few hundred tokens already go through LM-Infinite's band and several
# prefill chunks (so several progress reports).
TINY_CONFIG = LMInfiniteConfig(n_global=4, n_local=64, chunk_size=32)
PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def engine(tiny_llama_with_real_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> Engine:
    model, tokenizer = tiny_llama_with_real_tokenizer
    return Engine(model=model, tokenizer=tokenizer, config=TINY_CONFIG)


class Recorder(BaseCallbackHandler):
    """Records token and progress callbacks; optionally raises on the n-th token."""

    def __init__(self, fail_on_token: int | None = None) -> None:
        self.tokens: list[str] = []
        self.progress: list[dict[str, Any]] = []
        self.fail_on_token = fail_on_token
        self.raise_error = fail_on_token is not None

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)
        if self.fail_on_token is not None and len(self.tokens) >= self.fail_on_token:
            raise RuntimeError("callback failed")

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        if name == PROGRESS_EVENT:
            self.progress.append(data)


def generating() -> bool:
    """Whether the model thread still has work (a generation left running after its consumer stopped)."""
    return model_thread.busy()


def llm(engine: Engine, **kwargs: Any) -> LMInfiniteLLM:
    return LMInfiniteLLM(engine=engine, **{"max_new_tokens": 12, **kwargs})


def chat(engine: Engine, **kwargs: Any) -> ChatLMInfinite:
    return ChatLMInfinite(engine=engine, **{"max_new_tokens": 12, **kwargs})


_prompt_serial = iter(range(1_000_000))


# A real chat template with the common "roles must alternate" rule (raise_exception is transformers' helper).
ALTERNATING_TEMPLATE = (
    "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}{{ m['content'] }}"
    "{% endfor %}"
)


def long_prompt(engine: Engine, n_tokens: int) -> str:
    """About ``n_tokens`` tokens, starting differently each time: never a prefix the engine has encoded before,
    so progress always starts from zero (engines may reuse encoded prefixes)."""
    words = f"Document {next(_prompt_serial)}. " + " ".join(f"word{i}" for i in range(n_tokens))
    ids = engine.tokenize(words)[:n_tokens]
    return str(engine.tokenizer.decode(ids))


# ---- construction ------------------------------------------------------------------------------------------------
def test_construction_is_lazy_and_aliases_work() -> None:
    model = ChatLMInfinite(model="/no/such/model.gguf", max_tokens=5)  # nothing is loaded yet
    assert (model.model_id, model.max_new_tokens, model.model_name) == ("/no/such/model.gguf", 5, "model.gguf")
    with pytest.raises(FileNotFoundError):
        model.load()
    assert LMInfiniteLLM().model_name == DEFAULT_MODEL_NAME


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 4}, "cache_mode='full'"),
        ({"n_local": 0}, "n_local"),
        ({"temperature": -1.0}, "temperature"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"n_locl": 5}, "n_locl"),  # typos are refused, not ignored
    ],
)
def test_bad_settings_fail_at_construction(kwargs: dict[str, Any], message: str) -> None:
    for cls in (LMInfiniteLLM, ChatLMInfinite):
        with pytest.raises(ValueError, match=message):
            cls(**kwargs)


def test_unknown_settings_name_the_known_ones() -> None:
    for cls in (LMInfiniteLLM, ChatLMInfinite):
        with pytest.raises(ValueError, match="n_locl") as error:
            cls(n_locl=5)
        assert "did you mean 'n_local'" in str(error.value) and "known settings:" in str(error.value)
        assert "chunk_size" in str(error.value)


def test_remote_provider_params_are_accepted_and_ignored() -> None:
    model = ChatLMInfinite(api_key="x", timeout=5, max_retries=2)
    assert not hasattr(model, "api_key")


def test_both_spellings_of_a_field_are_refused() -> None:
    with pytest.raises(ValueError, match="max_tokens or max_new_tokens"):
        ChatLMInfinite(max_tokens=3, max_new_tokens=4)
    with pytest.raises(ValueError, match="model or model_id"):
        LMInfiniteLLM(model="a/b", model_id="a/b")


def test_wrapping_an_engine(engine: Engine) -> None:
    plain = chat(engine)
    assert plain.load() is engine and plain.model_name == engine.model_name
    assert (plain.n_local, plain.chunk_size, plain.cache_mode) == (64, 32, "window")  # mirrors the engine


def test_same_model_id_shares_one_loaded_copy() -> None:
    first, second = LMInfiniteLLM(n_local=1024), ChatLMInfinite(n_local=2048)
    assert first.load().model is second.load().model  # the embedded default, loaded once (from the model cache)


def test_identifying_and_langsmith_params(engine: Engine) -> None:
    model = chat(engine, stop=["END"], temperature=0.5, seed=3)
    params = model._identifying_params
    assert params["model_name"] == engine.model_name
    assert (params["n_local"], params["cache_mode"], params["max_new_tokens"], params["seed"]) == (64, "window", 12, 3)
    ls = model._get_ls_params(stop=["STOP"])
    assert ls == {
        "ls_provider": "lminf",
        "ls_model_name": engine.model_name,
        "ls_model_type": "chat",
        "ls_temperature": 0.5,
        "ls_max_tokens": 12,
        "ls_stop": ["END", "STOP"],
    }
    assert llm(engine)._get_ls_params(max_tokens=3)["ls_model_type"] == "llm"
    assert llm(engine)._get_ls_params(max_tokens=3)["ls_max_tokens"] == 3
    assert (model._llm_type, llm(engine)._llm_type) == ("lminf-chat", "lminf-llm")


def test_token_counts_use_the_model_tokenizer(engine: Engine) -> None:
    text = "Tokenizers split words like antidisestablishmentarianism."
    expected = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    for model in (llm(engine), chat(engine)):
        assert model.get_num_tokens(text) == expected
        assert len(model.get_token_ids(text)) == expected
    messages = [SystemMessage("Be brief."), HumanMessage(text)]
    templated = engine.chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}])
    assert chat(engine).get_num_tokens_from_messages(messages) == engine.count_tokens(templated)


# ---- messages ----------------------------------------------------------------------------------------------------
def test_message_conversion() -> None:
    messages = [
        SystemMessage("sys"),
        HumanMessage([{"type": "text", "text": "a"}, "b"]),
        AIMessage("c"),
        AIMessageChunk(content="d"),
        ChatMessage(role="user", content="e"),
        ChatMessage(role="assistant", content="f"),
    ]
    assert messages_to_chat(messages) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"},
        {"role": "assistant", "content": "f"},
    ]


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (ToolMessage("42", tool_call_id="1"), "ToolMessage"),
        (FunctionMessage(content="42", name="f"), "FunctionMessage"),
        (ChatMessage(role="critic", content="x"), "role 'critic'"),
        (AIMessage("", tool_calls=[{"name": "f", "args": {}, "id": "1"}]), "tool calls"),
        (HumanMessage([{"type": "image_url", "image_url": {"url": "data:,"}}]), "image_url"),
    ],
)
def test_unsupported_messages_are_refused_clearly(engine: Engine, message: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        chat(engine).invoke([HumanMessage("hi"), message])


def test_template_errors_become_value_errors(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.tokenizer, "chat_template", ALTERNATING_TEMPLATE)
    with pytest.raises(ValueError, match="rejected these messages \\(user, user\\).*alternate"):
        chat(engine).invoke([HumanMessage("a"), HumanMessage("b")])


def test_messages_in_any_order_the_template_accepts(engine: Engine) -> None:
    messages = [AIMessage("first"), HumanMessage("q"), SystemMessage("late system"), HumanMessage("again")]
    assert isinstance(chat(engine, max_new_tokens=2).invoke(messages), AIMessage)


# ---- generation --------------------------------------------------------------------------------------------------
def test_llm_output_is_the_continuation_only(engine: Engine) -> None:
    text = llm(engine).invoke(PROMPT)
    assert text == engine.generate(PROMPT, GenerationSettings(max_new_tokens=12))
    assert PROMPT not in text


def test_llm_stream_matches_invoke_and_reports_each_chunk_once(engine: Engine) -> None:
    model, recorder = llm(engine), Recorder()
    chunks = list(model.stream(PROMPT, config={"callbacks": [recorder]}))
    assert len(chunks) > 1
    assert "".join(chunks) == model.invoke(PROMPT)
    assert recorder.tokens == chunks  # exactly one on_llm_new_token per chunk


async def test_llm_generate_reports_finish_reason_and_usage(engine: Engine) -> None:
    """Without streaming too: ``generate``'s generation carries what the stream's last chunk does."""
    model = llm(engine, max_new_tokens=3)
    for result in (model.generate([PROMPT]), await model.agenerate([PROMPT])):
        generation = result.generations[0][0]
        assert generation.text == model.invoke(PROMPT)
        info = generation.generation_info or {}
        assert info.get("finish_reason") in ("length", "eos") and info.get("model_name") == engine.model_name
        assert info["usage"]["input_tokens"] == engine.count_tokens(PROMPT) and 1 <= info["usage"]["output_tokens"] <= 3


def test_chat_stream_matches_invoke_without_duplicate_tokens(engine: Engine) -> None:
    model, recorder = chat(engine), Recorder()
    chunks = list(model.stream(PROMPT, config={"callbacks": [recorder]}))
    message = model.invoke(PROMPT)
    assert "".join(str(c.content) for c in chunks) == message.content
    assert recorder.tokens == [c.content for c in chunks]  # the base class's one per chunk, none from us
    last = chunks[-1]
    assert last.chunk_position == "last" and last.content == ""
    assert last.usage_metadata == message.usage_metadata
    assert sum(1 for c in chunks if c.usage_metadata) == 1  # merged usage counts the input once


def test_chat_usage_and_response_metadata(engine: Engine) -> None:
    message = chat(engine, max_new_tokens=5).invoke([SystemMessage("Be brief."), HumanMessage(PROMPT)])
    prompt = engine.chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}])
    usage = message.usage_metadata
    assert usage is not None
    assert usage["input_tokens"] == engine.count_tokens(prompt)
    assert 1 <= usage["output_tokens"] <= 5
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert message.response_metadata["model_name"] == engine.model_name
    assert message.response_metadata["finish_reason"] in ("length", "eos")


def test_per_call_settings_override_fields(engine: Engine) -> None:
    message = chat(engine, max_new_tokens=20).invoke(PROMPT, max_tokens=3)
    assert message.usage_metadata is not None and message.usage_metadata["output_tokens"] <= 3
    assert len(engine.tokenize(llm(engine).invoke(PROMPT, max_new_tokens=2))) <= 3


def test_unsupported_call_options_are_refused(engine: Engine) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    with pytest.raises(TypeError, match="tools"):
        chat(engine).bind(tools=[tool]).invoke(PROMPT)
    with pytest.raises(TypeError, match="response_format"):
        list(chat(engine).stream(PROMPT, response_format={"type": "json_object"}))
    with pytest.raises(TypeError, match="top_kk"):
        llm(engine).invoke(PROMPT, top_kk=3)
    with pytest.raises(TypeError, match="model_id"):  # one loaded model per instance
        chat(engine).invoke(PROMPT, model="other")


def _multi_token_stop(engine: Engine, text: str) -> str:
    """A piece from the middle of ``text`` that is more than one token long."""
    start = len(text) // 3
    for size in range(4, len(text) - start):
        stop = text[start : start + size]
        if engine.count_tokens(stop) > 1 and stop.strip():
            return stop
    raise AssertionError(f"no multi-token stop string in {text!r}")


def test_stop_strings_are_trimmed_and_merged(engine: Engine) -> None:
    model = llm(engine, max_new_tokens=24)
    full = model.invoke(PROMPT)
    stop = _multi_token_stop(engine, full)
    expected = full[: full.index(stop)]
    assert model.invoke(PROMPT, stop=[stop]) == expected
    assert "".join(model.stream(PROMPT, stop=[stop])) == expected
    # The instance's stop strings and the call's both apply.
    assert llm(engine, max_new_tokens=24, stop=[stop]).invoke(PROMPT, stop=["\x00never"]) == expected
    chat_model = chat(engine, max_new_tokens=24)
    reply = str(chat_model.invoke(PROMPT).content)
    stop = _multi_token_stop(engine, reply)
    message = chat(engine, max_new_tokens=24, stop=[stop]).invoke(PROMPT)
    assert message.content == reply[: reply.index(stop)]
    assert message.response_metadata["finish_reason"] == "stop"


def test_empty_answers_still_stream_one_chunk(engine: Engine) -> None:
    model = llm(engine)
    first = model.invoke(PROMPT)[:1]
    assert first
    assert model.invoke(PROMPT, stop=[first]) == ""
    assert list(model.stream(PROMPT, stop=[first])) == [""]  # the closing chunk (finish reason and usage)
    chunks = list(chat(engine).stream(PROMPT, stop=[str(chat(engine).invoke(PROMPT).content)[:1]]))
    assert [c.content for c in chunks] == [""] and chunks[0].chunk_position == "last"


def test_batch(engine: Engine) -> None:
    prompts = [PROMPT, "Another prompt"]
    assert llm(engine).batch(prompts) == [llm(engine).invoke(p) for p in prompts]
    assert [m.content for m in chat(engine).batch(prompts)] == [chat(engine).invoke(p).content for p in prompts]


# ---- async -------------------------------------------------------------------------------------------------------
async def test_async_methods_match_sync(engine: Engine) -> None:
    text_llm, chat_model = llm(engine), chat(engine)
    assert await text_llm.ainvoke(PROMPT) == text_llm.invoke(PROMPT)
    recorder = Recorder()
    chunks = [c async for c in text_llm.astream(PROMPT, config={"callbacks": [recorder]})]
    assert "".join(chunks) == text_llm.invoke(PROMPT) and recorder.tokens == chunks
    expected = chat_model.invoke(PROMPT).content
    assert (await chat_model.ainvoke(PROMPT)).content == expected
    message_chunks = [c async for c in chat_model.astream(PROMPT)]
    assert "".join(str(c.content) for c in message_chunks) == expected
    assert message_chunks[-1].usage_metadata is not None
    assert await text_llm.abatch([PROMPT, PROMPT]) == [text_llm.invoke(PROMPT)] * 2


async def test_astream_leaves_the_event_loop_free(engine: Engine) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    try:
        seen = [ticks async for _ in chat(engine, max_new_tokens=30).astream(long_prompt(engine, 600))]
    finally:
        task.cancel()
    assert seen[-1] > seen[0] > 0  # the ticker ran while the prompt was encoded and tokens came


# ---- progress ----------------------------------------------------------------------------------------------------
def _check_progress(events: list[dict[str, Any]], n_prompt: int) -> None:
    assert len(events) >= 3
    done = [e["done"] for e in events]
    assert done == sorted(done)
    assert events[-1]["done"] == events[-1]["total"] == n_prompt


async def test_progress_reaches_callbacks_on_every_path(engine: Engine) -> None:
    def n_llm(prompt: str) -> int:
        return engine.count_tokens(prompt)

    def n_chat(prompt: str) -> int:
        return engine.count_tokens(engine.chat_prompt([{"role": "user", "content": prompt}]))

    runs = [
        (lambda p, cfg: llm(engine, max_new_tokens=2).invoke(p, config=cfg), n_llm),
        (lambda p, cfg: list(llm(engine, max_new_tokens=2).stream(p, config=cfg)), n_llm),
        (lambda p, cfg: chat(engine, max_new_tokens=2).invoke(p, config=cfg), n_chat),
        (lambda p, cfg: list(chat(engine, max_new_tokens=2).stream(p, config=cfg)), n_chat),
    ]
    for run, count in runs:
        recorder, prompt = Recorder(), long_prompt(engine, 200)
        run(prompt, {"callbacks": [recorder]})
        _check_progress(recorder.progress, count(prompt))
    for make, count in ((llm, n_llm), (chat, n_chat)):
        recorder, prompt = Recorder(), long_prompt(engine, 200)
        await make(engine, max_new_tokens=2).ainvoke(prompt, config={"callbacks": [recorder]})
        _check_progress(recorder.progress, count(prompt))
        recorder, prompt = Recorder(), long_prompt(engine, 200)
        async for _ in make(engine, max_new_tokens=2).astream(prompt, config={"callbacks": [recorder]}):
            pass
        _check_progress(recorder.progress, count(prompt))


async def test_progress_in_astream_events(engine: Engine) -> None:
    prompt = long_prompt(engine, 200)
    events = [e async for e in chat(engine, max_new_tokens=2).astream_events(prompt, version="v2")]
    kinds = [e["event"] for e in events]
    progress = [e for e in events if e["event"] == "on_custom_event" and e["name"] == PROGRESS_EVENT]
    assert progress and progress[-1]["data"]["done"] == progress[-1]["data"]["total"]
    assert kinds.index("on_custom_event") < kinds.index("on_chat_model_stream")  # encoding comes first
    start = next(e for e in events if e["event"] == "on_chat_model_start")
    assert all(e["run_id"] == start["run_id"] for e in progress)  # attached to the model's own run


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_progress_only_on_a_terminal() -> None:
    terminal, pipe = FakeTerminal(), io.StringIO()
    for out in (terminal, pipe):
        bar = TerminalProgress(file=out, min_tokens=100)
        for done in (0, 64, 128, 150):
            bar(done, 150)
        TerminalProgress(file=out, min_tokens=1000)(50, 150)  # short prompt: no bar
    assert "encoding prompt" in terminal.getvalue() and "/150" in terminal.getvalue()
    assert pipe.getvalue() == ""
    forced = io.StringIO()
    TerminalProgress(enabled=True, file=forced, min_tokens=10)(10, 10)
    assert "encoding prompt" in forced.getvalue()


def test_progress_bar_on_stderr_when_asked(engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    prompt = long_prompt(engine, 2100)  # above TerminalProgress's default threshold
    llm(engine, max_new_tokens=1, progress=True).invoke(prompt)
    llm(engine, max_new_tokens=1).invoke(prompt)  # auto: captured stderr is not a terminal
    err = capsys.readouterr().err
    assert err.count("encoding prompt") >= 1
    assert "tok" in err and err.count("encoding prompt: 100%") <= 1


def test_merge_stop() -> None:
    assert merge_stop(["a", "b"], None, ["b", "", "c"]) == ["a", "b", "c"]


# ---- closing early and errors ------------------------------------------------------------------------------------
def test_breaking_out_of_streams_stops_generation(engine: Engine) -> None:
    for model in (llm(engine, max_new_tokens=2000), chat(engine, max_new_tokens=2000)):
        for _ in model.stream(PROMPT):
            break
        assert not generating()


async def test_closing_async_streams_stops_generation(engine: Engine) -> None:
    for model in (llm(engine, max_new_tokens=2000), chat(engine, max_new_tokens=2000)):
        async with aclosing(model.astream(PROMPT)) as chunks:  # type: ignore[type-var]
            async for _ in chunks:
                break
        assert not generating()


def test_callback_errors_stop_generation(engine: Engine) -> None:
    for model in (llm(engine, max_new_tokens=2000), chat(engine, max_new_tokens=2000)):
        with pytest.raises(RuntimeError, match="callback failed"):
            list(model.stream(PROMPT, config={"callbacks": [Recorder(fail_on_token=2)]}))
        assert not generating()


async def test_generation_errors_reach_the_caller(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> StreamResult:
        raise RuntimeError("model exploded")

    monkeypatch.setattr(engine, "_generate", broken)
    for model in (llm(engine), chat(engine)):
        with pytest.raises(RuntimeError, match="model exploded"):
            model.invoke(PROMPT)
        with pytest.raises(RuntimeError, match="model exploded"):
            list(model.stream(PROMPT))
        with pytest.raises(RuntimeError, match="model exploded"):
            await model.ainvoke(PROMPT)
    assert not generating()


def test_token_stream_events_and_iteration_agree(engine: Engine) -> None:
    prompt, settings = long_prompt(engine, 100), GenerationSettings(max_new_tokens=5)
    events = list(engine.stream(prompt, settings).events())
    progress = [(e.done, e.total) for e in events if not isinstance(e, str)]
    n = engine.count_tokens(prompt)
    assert progress[0] == (0, n) and progress[-1] == (n, n) and progress == sorted(progress)
    seen: list[tuple[int, int]] = []
    stream = engine.stream(prompt, settings, on_progress=lambda d, t: seen.append((d, t)))
    assert "".join(stream) == "".join(e for e in events if isinstance(e, str))
    assert seen and seen[-1] == (n, n)  # on_progress gets what events() yields (a reused prefix may skip some)
    assert isinstance(stream, TokenStream) and stream.result is not None and stream.result.output_tokens == 5


# ---- langchain-tests standard unit suite ---------------------------------------------------------------------------
class TestChatLMInfiniteStandard(ChatModelUnitTests):
    """The standard chat-model unit tests, on the tiny engine (no model download, fast)."""

    _engine: Engine | None = None

    @pytest.fixture(autouse=True)
    def _tiny_engine(self, engine: Engine) -> None:
        type(self)._engine = engine

    @property
    def chat_model_class(self) -> type[ChatLMInfinite]:
        return ChatLMInfinite

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": self._engine}

    @property
    def supports_model_override(self) -> bool:
        return False  # one local model per instance; a per-call ``model`` only names the trace
