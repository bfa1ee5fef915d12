"""ChatLMInfinite and LMInfiniteLLM with the real default model (SmolLM2-135M-Instruct), greedy decoding."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations import model_thread
from lminf_integrations.engine import Engine
from lminf_integrations.langchain import ChatLMInfinite, LMInfiniteLLM

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QUESTION = [SystemMessage("You are a helpful assistant."), HumanMessage("Name three colours of the rainbow.")]


@pytest.fixture(scope="module")
def engine(default_model: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> Engine:
    model, tokenizer = default_model
    return Engine(model=model, tokenizer=tokenizer)


def generating() -> bool:
    """Whether the model thread still has work (a generation left running after its consumer stopped)."""
    return model_thread.busy()


def test_default_model_id_reuses_the_loaded_copy(default_model: tuple[PreTrainedModel, Any]) -> None:
    assert ChatLMInfinite().load().model is default_model[0]  # model_id=None: the same copy, nothing reloaded


def test_greedy_chat_stream_concatenates_to_invoke(engine: Engine) -> None:
    chat = ChatLMInfinite(engine=engine, max_new_tokens=24)
    chunks = list(chat.stream(QUESTION))
    message = chat.invoke(QUESTION)
    assert len([c for c in chunks if c.content]) > 1  # really streamed, not one lump
    assert "".join(str(c.content) for c in chunks) == message.content != ""
    assert not str(message.content).startswith("<|im_start|>") and "Name three colours" not in str(message.content)
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    assert isinstance(full, AIMessageChunk) and full.usage_metadata == message.usage_metadata


def test_greedy_llm_stream_concatenates_to_invoke(engine: Engine) -> None:
    llm = LMInfiniteLLM(engine=engine, max_new_tokens=24)
    prompt = "The three primary colours are"
    chunks = list(llm.stream(prompt))
    text = llm.invoke(prompt)
    assert len(chunks) > 1 and "".join(chunks) == text != ""
    assert not text.startswith(prompt)


def test_stop_sequences(engine: Engine) -> None:
    chat = ChatLMInfinite(engine=engine, max_new_tokens=24)
    full = str(chat.invoke(QUESTION).content)
    words = full.split()
    stop = " ".join(words[2:4])  # two words from the middle: several tokens
    assert engine.count_tokens(stop) > 1 and stop in full
    expected = full[: full.index(stop)]
    message = chat.invoke(QUESTION, stop=[stop])
    assert message.content == expected and stop not in str(message.content)
    assert message.response_metadata["finish_reason"] == "stop"
    assert "".join(str(c.content) for c in chat.stream(QUESTION, stop=["never appears", stop])) == expected
    assert ChatLMInfinite(engine=engine, max_new_tokens=24, stop=[stop]).invoke(QUESTION).content == expected


async def test_async_stream_interleaves_with_other_coroutines(engine: Engine) -> None:
    chat = ChatLMInfinite(engine=engine, max_new_tokens=16)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.002)

    task = asyncio.create_task(ticker())
    seen: list[int] = []
    pieces: list[str] = []
    try:
        async for chunk in chat.astream(QUESTION):
            seen.append(ticks)
            pieces.append(str(chunk.content))
    finally:
        task.cancel()
    assert "".join(pieces) == (await chat.ainvoke(QUESTION)).content
    # The ticker kept running while the model worked: it advanced between most consecutive tokens.
    advanced = sum(later > earlier for earlier, later in zip(seen, seen[1:], strict=False))
    assert advanced >= len(seen) // 2 and seen[-1] > seen[0]


def test_breaking_out_of_a_stream_stops_generation(engine: Engine) -> None:
    chat = ChatLMInfinite(engine=engine, max_new_tokens=400)
    started = time.perf_counter()
    for chunk in chat.stream([HumanMessage("Write a very long story about a cat.")]):
        if chunk.content:
            break
    assert not generating()
    assert time.perf_counter() - started < 15  # nowhere near 400 tokens


async def test_closing_an_async_stream_stops_generation(engine: Engine) -> None:
    llm = LMInfiniteLLM(engine=engine, max_new_tokens=400)
    async with aclosing(llm.astream("Once upon a time")) as chunks:  # type: ignore[type-var]
        async for _ in chunks:
            break
    assert not generating()


def test_example_runs(tmp_path: Path) -> None:
    book = tmp_path / "book.txt"
    book.write_text("The lighthouse keeper's cat was called Marmalade. She liked fish.\n", encoding="utf-8")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "langchain_whole_book_qa.py"),
            "--file",
            str(book),
            "--question",
            "What was the cat called?",
            "--max-new-tokens",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "book.txt:" in result.stderr and "tokens in one prompt" in result.stderr
    assert result.stdout.strip()


# ---- langchain-tests standard integration suite --------------------------------------------------------------------
class TestChatLMInfiniteIntegration(ChatModelIntegrationTests):
    """The standard chat-model integration tests on the real default model, with short answers.

    Tool calling, structured output, JSON mode and image/audio/PDF inputs are switched off through the suite's
    capability flags (``has_tool_calling`` etc., all False for this text-only local model without tools), so
    those tests skip themselves with the suite's reason.
    """

    _engine: Engine | None = None

    @pytest.fixture(autouse=True)
    def _real_engine(self, engine: Engine) -> None:
        type(self)._engine = engine

    @property
    def chat_model_class(self) -> type[ChatLMInfinite]:
        return ChatLMInfinite

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": self._engine, "max_new_tokens": 10}

    @property
    def supports_model_override(self) -> bool:
        return False  # one local model per instance; a per-call ``model`` only names the trace
