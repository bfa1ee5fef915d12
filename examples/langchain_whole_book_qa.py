"""Ask LangChain a question about a whole long document: no text splitter, one prompt, answer streamed.

The document is read whole into one LangChain ``Document`` and handed to a stuff-documents chain whose model is
``ChatLMInfinite``: LM-Infinite attention lets a small local model read far past its training length, so no
chunking, retrieval or map-reduce is needed.

    python examples/langchain_whole_book_qa.py
    python examples/langchain_whole_book_qa.py --file book.txt --question "Who is the narrator?" --max-new-tokens 300

Without ``--file`` the document is Python's own language reference (about 115,000 characters, 28K tokens), written
by ``make_document.py`` from the running interpreter into a temporary file. On a laptop CPU, reading it takes a few
minutes; a progress bar shows on the terminal meanwhile.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnablePassthrough
from make_document import python_reference_text

from lminf_integrations.langchain import ChatLMInfinite

DEFAULT_QUESTION = "When a loop is left with break, does its else clause run?"

PROMPT = ChatPromptTemplate.from_messages(
    [
        (
            "system",
            "Answer the question using only the document below. Be brief.\n\n<document>\n{context}\n</document>",
        ),
        ("human", "{question}"),
    ]
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--file", type=Path, help="UTF-8 text file (default: Python's language reference)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--model", default=None, help="model id or path (default: the embedded SmolLM2-135M)")
    return parser.parse_args()


@contextmanager
def document_path(file: Path | None) -> Iterator[Path]:
    """The given file, or the Python reference written to a temporary file (removed afterwards)."""
    if file is not None:
        yield file
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "python_reference.txt"
        path.write_text(python_reference_text(80_000), encoding="utf-8")
        yield path


def stuff_chain(llm: BaseChatModel) -> Runnable[dict[str, Any], str]:
    """LangChain's stuff-documents chain: every document's text joined into ``{context}``, one model call."""
    try:
        from langchain_classic.chains.combine_documents import create_stuff_documents_chain
    except ImportError:  # langchain-classic is absent: the same thing from core parts
        join = RunnablePassthrough.assign(context=lambda x: "\n\n".join(d.page_content for d in x["context"]))
        return join | PROMPT | llm | StrOutputParser()
    return create_stuff_documents_chain(llm, PROMPT)


def main() -> None:
    args = parse_args()
    chat = ChatLMInfinite(model_id=args.model, max_new_tokens=args.max_new_tokens)
    with document_path(args.file) as path:
        # The whole file as one document, no splitter (what langchain-community's TextLoader gives; that package is
        # being sunset, and reading a file needs none).
        documents = [Document(page_content=path.read_text(encoding="utf-8"), metadata={"source": str(path)})]
    n_tokens = sum(chat.get_num_tokens(d.page_content) for d in documents)  # loads the model
    print(f"{path.name}: {n_tokens:,} tokens in one prompt, model {chat.model_name}", file=sys.stderr, flush=True)
    for piece in stuff_chain(chat).stream({"context": documents, "question": args.question}):
        print(piece, end="", flush=True)
    print()


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as error:  # a missing file, a model that does not load, a setting refused
        sys.exit(f"{Path(__file__).name}: error: {error}")
