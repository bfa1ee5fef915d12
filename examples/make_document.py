"""Write the demo document: Python's own language reference topics (``pydoc_data.topics``, in every CPython).

The text is generated, not shipped: it comes from the interpreter running this script (Python Software
Foundation License). Sorted by topic name, so the same Python version gives the same file. Topics are kept whole,
so the text ends after the topic that reaches ``--min-chars``: the default 80,000 gives about 115,000 characters
(28K tokens of the default model) on Python 3.11, as one topic near there is 50,000 characters long.

    python examples/make_document.py examples/data/python_reference.txt [--min-chars 80000]
"""

from __future__ import annotations

import argparse
import pydoc_data.topics
from pathlib import Path


def python_reference_text(min_chars: int) -> str:
    """Whole topics, in name order, until the text holds at least ``min_chars`` characters."""
    parts: list[str] = []
    size = 0
    for name in sorted(pydoc_data.topics.topics):
        if size >= min_chars:
            break
        section = f"## {name}\n\n{pydoc_data.topics.topics[name].strip()}\n\n"
        parts.append(section)
        size += len(section)
    return "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument(
        "--min-chars", type=int, default=80_000,
        help="add whole topics until the text has at least this many characters (default: %(default)s; the default "
        "model reads about 4 characters per token)",
    )  # fmt: skip
    args = parser.parse_args()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(python_reference_text(args.min_chars), encoding="utf-8")


if __name__ == "__main__":
    main()
