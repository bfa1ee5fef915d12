"""Ask LlamaIndex a question about a whole long document: one LLM call with LM-Infinite, answer streamed.

A ``SummaryIndex`` hands every node to the response synthesizer; with ``response_mode="compact"`` LlamaIndex packs
as much text per call as ``llm.metadata.context_window`` allows. LMInfiniteLLM reports a window far beyond the
model's training length, so the whole document goes into a single prompt instead of a chain of refine calls.

    python examples/llama_index_whole_book.py --question "What does the else clause of a for loop do?"
    python examples/llama_index_whole_book.py --file book.txt --question "Who is the narrator?" --max-new-tokens 300

Without ``--file`` the document is Python's own language reference (about 115,000 characters, 28K tokens), made
by ``make_document.py`` from the running interpreter.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from llama_index.core import Document, SummaryIndex
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatStartEvent, LLMCompletionStartEvent
from make_document import python_reference_text

from lminf_integrations.llama_index import LMInfiniteLLM, whole_document_setup

DEFAULT_QUESTION = "What does the else clause of a for loop do, and when does it run?"


class LLMCallCounter(BaseEventHandler):
    """Counts LLM calls (chat or completion) by their start events."""

    calls: int = 0

    @classmethod
    def class_name(cls) -> str:
        return "LLMCallCounter"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, (LLMChatStartEvent, LLMCompletionStartEvent)):
            self.calls += 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--file", type=Path, help="UTF-8 text file (default: Python's language reference)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--model", default=None, help="model id or path (default: the embedded SmolLM2-135M)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    text = args.file.read_text(encoding="utf-8") if args.file else python_reference_text(80_000)
    name = args.file.name if args.file else "python_reference.txt"

    # While the document is encoded, the class draws a progress bar on a terminal (progress=None: only there).
    llm = LMInfiniteLLM(model_id=args.model, max_new_tokens=args.max_new_tokens)
    setup = whole_document_setup(llm)
    print(f"{name}: {len(text):,} characters, {llm.load().count_tokens(text):,} tokens", file=sys.stderr)

    index = SummaryIndex.from_documents([Document(text=text)], transformations=setup.transformations)
    query_engine = setup.query_engine(index, response_mode="compact", streaming=True)

    counter = LLMCallCounter()
    get_dispatcher().add_event_handler(counter)
    print(f"Q: {args.question}", file=sys.stderr)
    response = query_engine.query(args.question)
    for token in response.response_gen:  # type: ignore[union-attr]
        print(token, end="", flush=True)
    print()
    print(f"LLM calls: {counter.calls}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as error:  # a missing file, a model that does not load, a setting refused
        sys.exit(f"{Path(__file__).name}: error: {error}")
