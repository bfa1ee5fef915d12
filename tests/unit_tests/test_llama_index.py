"""LMInfiniteLLM plumbing on a tiny random-weight Llama (real tokenizer and chat template): fast, no quality checks."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from llama_index.core import Document, Settings, SummaryIndex
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.llm import (
    LLMChatEndEvent,
    LLMChatInProgressEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionInProgressEvent,
    LLMCompletionStartEvent,
)
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations.config import LMInfiniteConfig
from lminf_integrations.engine import Engine
from lminf_integrations.llama_index import DEFAULT_CONTEXT_WINDOW, LMInfiniteLLM, whole_document_setup
from lminf_integrations.streaming import TokenStream

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from make_document import python_reference_text  # noqa: E402

# Small window and chunks keep encoding 50K+ tokens through the tiny model to a couple of seconds.
TINY_CONFIG = LMInfiniteConfig(n_global=10, n_local=512, chunk_size=1024)
QUESTION = "What does the else clause of a for loop do?"


class EventRecorder(BaseEventHandler):
    events: list[BaseEvent] = []

    @classmethod
    def class_name(cls) -> str:
        return "EventRecorder"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self.events.append(event)

    def of(self, *kinds: type[BaseEvent]) -> list[BaseEvent]:
        return [e for e in self.events if isinstance(e, kinds)]

    @property
    def llm_calls(self) -> int:
        return len(self.of(LLMChatStartEvent, LLMCompletionStartEvent))


class PromptSpy:
    """Wraps ``engine.stream`` to record the exact prompts and keep the streams it returns."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.real = engine, engine.stream
        self.prompts: list[str] = []
        self.streams: list[TokenStream] = []

    def __call__(self, prompt: str, *args: Any, **kwargs: Any) -> TokenStream:
        self.prompts.append(prompt)
        self.streams.append(self.real(prompt, *args, **kwargs))
        return self.streams[-1]


@pytest.fixture
def engine(tiny_llama_with_real_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> Engine:
    model, tokenizer = tiny_llama_with_real_tokenizer
    return Engine(model=model, tokenizer=tokenizer, config=TINY_CONFIG)


@pytest.fixture
def spy(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> PromptSpy:
    recorder = PromptSpy(engine)
    monkeypatch.setattr(engine, "stream", recorder)
    return recorder


@pytest.fixture
def events() -> Iterator[EventRecorder]:
    recorder = EventRecorder()
    root = get_dispatcher()
    root.add_event_handler(recorder)
    yield recorder
    root.event_handlers.remove(recorder)


@pytest.fixture(scope="module")
def long_text() -> str:
    return python_reference_text(250_000).strip()  # about 61K tokens


def make_llm(engine: Engine, **kwargs: Any) -> LMInfiniteLLM:
    return LMInfiniteLLM(engine=engine, **{"max_new_tokens": 3, **kwargs})


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role=MessageRole.USER, content=text)]


# ---- construction and metadata ---------------------------------------------------------------------------------
def test_metadata(engine: Engine) -> None:
    meta = make_llm(engine, max_new_tokens=7).metadata
    assert meta.context_window == DEFAULT_CONTEXT_WINDOW
    assert meta.context_window > engine.model.config.max_position_embeddings  # not capped at the training length
    assert (meta.num_output, meta.is_chat_model, meta.is_function_calling_model) == (7, True, False)
    assert meta.model_name
    assert make_llm(engine, context_window=2_000_000).metadata.context_window == 2_000_000


def test_wrapped_engine_settings_are_mirrored(engine: Engine) -> None:
    llm = make_llm(engine)
    assert llm.load() is engine and llm.metadata.model_name == engine.model_name
    assert (llm.n_local, llm.chunk_size, llm.cache_mode, llm.compile_decode) == (512, 1024, "window", False)


def test_unknown_settings_are_refused_with_the_known_names(engine: Engine) -> None:
    for kwargs in ({"engine": engine}, {}):  # checked before any model is loaded
        with pytest.raises(ValueError, match="n_locl") as error:
            LMInfiniteLLM(n_locl=5, **kwargs)
        assert "did you mean 'n_local'" in str(error.value) and "known settings:" in str(error.value)
        assert "chunk_size" in str(error.value)


async def test_bad_call_options_fail_at_the_call_even_for_streams(engine: Engine) -> None:
    llm = make_llm(engine)
    with pytest.raises(TypeError, match="tools"):
        llm.complete("hi", tools=[])
    with pytest.raises(TypeError, match="n_local"):
        llm.stream_chat(user("hi"), n_local=5)
    with pytest.raises(ValueError, match="temperature"):
        await llm.astream_complete("hi", temperature=-1.0)
    assert llm.complete("hi", max_tokens=1).raw["usage"]["output_tokens"] == 1  # LangChain's alias, as there


# ---- prompt formatting ---------------------------------------------------------------------------------------
def test_chat_uses_the_chat_template_by_default(engine: Engine, spy: PromptSpy) -> None:
    messages = [ChatMessage(role=MessageRole.SYSTEM, content="Be brief."), *user("Hello")]
    make_llm(engine).chat(messages)
    expected = engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert spy.prompts == [expected]


def test_complete_wraps_unformatted_prompts_only(engine: Engine, spy: PromptSpy) -> None:
    llm = make_llm(engine, system_prompt="Be brief.")
    llm.complete("Hello")
    llm.complete("raw text", formatted=True)
    assert spy.prompts[0] == engine.chat_prompt(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    )
    assert spy.prompts[1] == "raw text"


async def test_custom_messages_to_prompt_is_used_everywhere(engine: Engine, spy: PromptSpy) -> None:
    def to_prompt(messages: Sequence[ChatMessage]) -> str:
        return "CUSTOM " + " | ".join(f"{m.role.value}: {m.content}" for m in messages)

    llm = make_llm(engine, messages_to_prompt=to_prompt)
    llm.chat(user("a"))
    list(llm.stream_chat(user("b")))
    await llm.achat(user("c"))
    async for _ in await llm.astream_chat(user("d")):
        pass
    assert spy.prompts == [f"CUSTOM user: {x}" for x in "abcd"]


async def test_custom_completion_to_prompt_is_used_everywhere(engine: Engine, spy: PromptSpy) -> None:
    llm = make_llm(engine, completion_to_prompt=lambda p: f"Q: {p}\nA:")
    llm.complete("a")
    list(llm.stream_complete("b"))
    await llm.acomplete("c")
    async for _ in await llm.astream_complete("d"):
        pass
    list(llm.stream_complete("Q: e\nA:", formatted=True))  # already formatted: left alone
    assert spy.prompts == [f"Q: {x}\nA:" for x in "abcde"]


# ---- generation ----------------------------------------------------------------------------------------------
def test_stream_deltas_add_up_and_last_chunk_has_usage(engine: Engine) -> None:
    llm = make_llm(engine, max_new_tokens=6)
    chunks = list(llm.stream_complete("Hello"))
    assert chunks[-1].delta == "" and chunks[-1].raw["usage"]["output_tokens"] == 6
    assert "".join(c.delta or "" for c in chunks) == chunks[-1].text == llm.complete("Hello").text
    running_text = ["".join(c.delta or "" for c in chunks[: i + 1]) for i in range(len(chunks))]
    assert [c.text for c in chunks] == running_text  # each chunk's text is everything so far


def test_stop_sequences_field_and_per_call(engine: Engine) -> None:
    llm = make_llm(engine, max_new_tokens=12)
    full = llm.complete("Once upon a time").text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.find(stop)]
    assert llm.complete("Once upon a time", stop=[stop]).text == expected
    assert llm.complete("Once upon a time", stop=stop).text == expected  # a lone string is one stop sequence
    with_field = make_llm(engine, max_new_tokens=12, stop=[stop])
    chunks = list(with_field.stream_complete("Once upon a time"))
    assert "".join(c.delta or "" for c in chunks) == expected
    assert chunks[-1].raw["finish_reason"] == "stop"
    # A call's stop strings add to the field's (as in the LangChain classes).
    assert make_llm(engine, max_new_tokens=12, stop=["\x00"]).complete("Once upon a time", stop=stop).text == expected


def test_leaving_a_stream_early_stops_generation(engine: Engine, spy: PromptSpy) -> None:
    for _ in make_llm(engine, max_new_tokens=50).stream_complete("Hello"):
        break
    assert not spy.streams[0].running


# ---- instrumentation -----------------------------------------------------------------------------------------
def test_stream_complete_fires_start_progress_end(engine: Engine, events: EventRecorder) -> None:
    chunks = list(make_llm(engine, max_new_tokens=4).stream_complete("Hello"))
    assert len(events.of(LLMCompletionStartEvent)) == 1
    assert len(events.of(LLMCompletionInProgressEvent)) == len(chunks)
    (end,) = events.of(LLMCompletionEndEvent)
    assert end.response.text == chunks[-1].text  # type: ignore[attr-defined]


async def test_async_streams_fire_events_and_chat_fires_only_chat_events(engine: Engine, events: EventRecorder) -> None:
    llm = make_llm(engine, max_new_tokens=4)
    chunks = [c async for c in await llm.astream_chat(user("Hello"))]
    await llm.acomplete("Hello")
    assert len(events.of(LLMChatStartEvent)) == len(events.of(LLMChatEndEvent)) == 1
    assert len(events.of(LLMChatInProgressEvent)) == len(chunks)
    assert len(events.of(LLMCompletionStartEvent)) == len(events.of(LLMCompletionEndEvent)) == 1
    assert events.of(LLMChatEndEvent)[0].response.message.content == chunks[-1].message.content  # type: ignore[attr-defined]


# ---- whole-document answering --------------------------------------------------------------------------------
@pytest.mark.parametrize("streaming", [False, True])
def test_query_over_a_long_document_is_one_call_with_the_whole_text(
    engine: Engine, spy: PromptSpy, events: EventRecorder, long_text: str, streaming: bool
) -> None:
    assert engine.count_tokens(long_text) >= 50_000
    llm = make_llm(engine, max_new_tokens=2)
    setup = whole_document_setup(llm)
    index = SummaryIndex.from_documents([Document(text=long_text)], transformations=setup.transformations)
    assert len(index.docstore.docs) == 1  # one node
    response = setup.query_engine(index, response_mode="compact", streaming=streaming).query(QUESTION)
    if streaming:
        response.get_response()  # type: ignore[union-attr]
    assert events.llm_calls == 1
    (start,) = events.of(LLMChatStartEvent)
    assert any(long_text in (m.content or "") for m in start.messages)  # type: ignore[attr-defined]
    assert len(spy.prompts) == 1 and long_text in spy.prompts[0] and QUESTION in spy.prompts[0]



def test_the_query_engine_takes_the_synthesizers_own_options(engine: Engine, spy: PromptSpy) -> None:
    """``text_qa_template`` (and the synthesizer's other options) reach the synthesizer the setup builds:
    ``as_query_engine`` ignores them once it is given a synthesizer. Its own options (``similarity_top_k``...) still
    go to it."""
    from llama_index.core import PromptTemplate

    setup = whole_document_setup(make_llm(engine, max_new_tokens=2))
    index = SummaryIndex.from_documents([Document(text="The ferry leaves at nine.")],
                                        transformations=setup.transformations)  # fmt: skip
    template = PromptTemplate("OUR OWN TEMPLATE\n{context_str}\nQ: {query_str}\nA: ")
    setup.query_engine(index, text_qa_template=template).query(QUESTION)
    assert len(spy.prompts) == 1 and "OUR OWN TEMPLATE" in spy.prompts[0] and "ferry" in spy.prompts[0]

async def test_async_query_is_one_call(engine: Engine, events: EventRecorder, long_text: str) -> None:
    setup = whole_document_setup(make_llm(engine, max_new_tokens=2))
    index = SummaryIndex.from_documents([Document(text=long_text)], transformations=setup.transformations)
    await setup.query_engine(index).aquery(QUESTION)
    assert events.llm_calls == 1


def test_setup_uses_model_tokenizer_and_no_overlap(engine: Engine) -> None:
    setup = whole_document_setup(make_llm(engine, max_new_tokens=5, context_window=100_000))
    assert setup.node_parser.chunk_overlap == 0 and setup.node_parser.chunk_size == 100_000 - 5
    assert setup.prompt_helper.chunk_overlap_ratio == 0 and setup.prompt_helper.context_window == 100_000
    assert setup.tokenizer("hello world") == engine.tokenize("hello world")


def test_global_settings_are_restored(engine: Engine) -> None:
    setup = whole_document_setup(make_llm(engine))
    before = (Settings._llm, Settings._node_parser, Settings._prompt_helper)
    with setup.as_global_settings():
        assert Settings.llm is setup.llm and Settings.node_parser is setup.node_parser
        assert Settings.tokenizer("hello world") == engine.tokenize("hello world")
    assert (Settings._llm, Settings._node_parser, Settings._prompt_helper) == before
    assert Settings.tokenizer("hello world") != engine.tokenize("hello world")  # back to the default (tiktoken)


def test_serialises_without_the_engine(engine: Engine) -> None:
    data = make_llm(engine, stop=["\n\n"]).to_dict()
    assert data["class_name"] == "LMInfiniteLLM" and data["n_local"] == 512 and list(data["stop"]) == ["\n\n"]
    assert "engine" not in data and "on_progress" not in data


def test_core_modules_do_not_import_llama_index() -> None:
    code = (
        "import sys, lminf_integrations, lminf_integrations.engine, lminf_integrations.cli, lminf_integrations.models; "
        "print(sorted(m for m in sys.modules if m.startswith('llama_index')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
