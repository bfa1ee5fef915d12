"""Write the demo document: Python's own language reference topics (``pydoc_data.topics``, in every CPython).

The text is generated, not shipped: it comes from the interpreter running this script (Python Software
Foundation License). Sorted by topic name, so the same Python version gives the same file.

    python examples/make_document.py examples/data/python_reference.txt [--chars 80000]
"""

from __future__ import annotations

import argparse
import pydoc_data.topics
from pathlib import Path


def python_reference_text(max_chars: int) -> str:
    parts: list[str] = []
    size = 0
    for name in sorted(pydoc_data.topics.topics):
        if size >= max_chars:
            break
        section = f"## {name}\n\n{pydoc_data.topics.topics[name].strip()}\n\n"
        parts.append(section)
        size += len(section)
    return "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--chars", type=int, default=80_000, help="about 4 characters per token (default 80000)")
    args = parser.parse_args()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(python_reference_text(args.chars), encoding="utf-8")


if __name__ == "__main__":
    main()
