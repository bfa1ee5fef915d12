"""Checks shared by every entry point that takes settings by name (LangChain, LlamaIndex).

A misspelt setting (``n_locl=5``) must fail loudly and say what was meant, never build an object with the default
silently in its place.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def refuse_unknown(given: Iterable[str], known: Iterable[str], owner: str) -> None:
    """Raise ``ValueError`` naming every unknown setting, the closest known one, and all known settings."""
    names = sorted({name for name in known if not name.startswith("_")})
    unknown = sorted(set(given) - set(names))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, names, n=1)
        hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    raise ValueError(f"{owner} got unknown settings: {', '.join(hints)}; known settings: {', '.join(names)}")
