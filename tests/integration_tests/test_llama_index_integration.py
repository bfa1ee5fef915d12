"""LMInfiniteLLM with the real default model (SmolLM2-135M-Instruct): streaming consistency, async, the example."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations.llama_index import LMInfiniteLLM

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [ChatMessage(role=MessageRole.USER, content="Name three colours of the rainbow.")]


@pytest.fixture(scope="module")
def llm(default_model: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> LMInfiniteLLM:
    # Loads through model_id=None: the copy the default_model fixture already loaded is reused.
    llm = LMInfiniteLLM(max_new_tokens=24)
    assert llm.load().model is default_model[0]
    return llm


def test_greedy_stream_complete_matches_complete(llm: LMInfiniteLLM) -> None:
    prompt = "Write one sentence about the sea."
    deltas = [r.delta or "" for r in llm.stream_complete(prompt)]
    assert len([d for d in deltas if d]) > 1  # really streamed, not one lump
    assert "".join(deltas) == llm.complete(prompt).text != ""


def test_greedy_stream_chat_matches_chat(llm: LMInfiniteLLM) -> None:
    chunks = list(llm.stream_chat(MESSAGES))
    answer = llm.chat(MESSAGES).message.content
    assert "".join(c.delta or "" for c in chunks) == answer == chunks[-1].message.content
    assert answer and chunks[-1].raw["usage"]["output_tokens"] > 0


async def _ticker(counter: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        counter[0] += 1
        await asyncio.sleep(0.005)


async def test_async_stream_chat_leaves_the_event_loop_free(llm: LMInfiniteLLM) -> None:
    counter, stop = [0], asyncio.Event()
    ticker = asyncio.create_task(_ticker(counter, stop))
    ticks_at_delta, text = [], ""
    async for chunk in await llm.astream_chat(MESSAGES):
        ticks_at_delta.append(counter[0])
        text += chunk.delta or ""
    stop.set()
    await ticker
    # The ticker kept running between tokens: the loop was never blocked for a whole generation.
    assert ticks_at_delta[-1] - ticks_at_delta[0] >= len(ticks_at_delta) // 2
    assert len(set(ticks_at_delta)) > len(ticks_at_delta) // 2
    assert text == llm.chat(MESSAGES).message.content  # greedy: same answer as the sync path


async def test_async_complete_runs_alongside_another_coroutine(llm: LMInfiniteLLM) -> None:
    counter, stop = [0], asyncio.Event()
    ticker = asyncio.create_task(_ticker(counter, stop))
    await asyncio.sleep(0)
    response = await llm.acomplete("Write one sentence about the sea.")
    ticks = counter[0]
    stop.set()
    await ticker
    assert response.text == llm.complete("Write one sentence about the sea.").text
    assert ticks > 10  # a 24-token generation takes far longer than 10 ticks of 5 ms


def test_example_runs(tmp_path: Path) -> None:
    document = tmp_path / "notes.txt"
    document.write_text(
        "The lighthouse keeper, Marta, lived on the island of Vell for thirty years. "
        "Every evening she lit the lamp at seven o'clock and wrote the weather in a blue notebook.\n",
        encoding="utf-8",
    )
    command = [sys.executable, str(ROOT / "examples" / "llama_index_whole_book.py"), "--file", str(document)]
    command += ["--question", "What was the keeper's name?", "--max-new-tokens", "8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip()
    assert "LLM calls: 1" in done.stderr
