"""Cutting a prompt's body into segments at natural boundaries (paragraphs first, then sentences, then words), and
segments into sentences.

Works on token ids (what the engine has), reading each token's text to find the boundaries, so a segment is an
exact slice of the prompt and two prompts sharing a body share its segments.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

# Boundary strength of the gap after a token, by what its text ends with: a paragraph, a line, a sentence, a word.
_PARAGRAPH, _LINE, _SENTENCE, _WORD, _NONE = 4, 3, 2, 1, 0


def _strength(text: str, following: str) -> int:
    if "\n\n" in text or (text.endswith("\n") and following.startswith("\n")):
        return _PARAGRAPH
    if text.endswith("\n"):
        return _LINE
    stripped = text.rstrip()
    if stripped.endswith((".", "?", "!", '."', ".)", ":")) and following.startswith((" ", "\n")):
        return _SENTENCE
    if following.startswith((" ", "\n")) or text.endswith(" "):
        return _WORD
    return _NONE


def boundary_strengths(ids: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """For each gap after token ``i`` (the last one: the end), how natural a place to cut it is."""
    text_of = {token: str(tokenizer.decode([token])) for token in set(ids)}  # each distinct token once
    texts = [text_of[token] for token in ids]
    strengths = [_strength(text, texts[i + 1] if i + 1 < len(texts) else "") for i, text in enumerate(texts)]
    if strengths:
        strengths[-1] = _PARAGRAPH + 1  # the end
    return strengths


def split(ids: Sequence[int], tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> list[tuple[int, int]]:
    """``[start, end)`` spans covering ``ids`` in order, each at most ``max_tokens`` long, each ending at the
    strongest boundary available in its second half (so segments are neither cut mid-sentence when a sentence
    end is near nor much shorter than ``max_tokens``)."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    return _cut(boundary_strengths(ids, tokenizer), 0, len(ids), max_tokens)


def _cut(strengths: Sequence[int], start: int, stop: int, max_tokens: int) -> list[tuple[int, int]]:
    """:func:`split`'s cut of the tokens ``[start, stop)``, given the boundary strengths of all of them."""
    spans = []
    while start < stop:
        end = min(stop, start + max_tokens)
        if end < stop:
            window = range(start + max(1, max_tokens // 2), end)  # cut after token i: the segment is [start, i+1)
            best = max(window, key=lambda i: (strengths[i], i))
            end = best + 1
        spans.append((start, end))
        start = end
    return spans


def sentences(
    ids: Sequence[int], tokenizer: PreTrainedTokenizerBase, max_tokens: int, min_tokens: int
) -> list[tuple[int, int]]:
    """``[start, end)`` spans covering ``ids`` in order, one per sentence or line: a piece shorter than
    ``min_tokens`` is joined to the next one, and one longer than ``max_tokens`` is cut as :func:`split` cuts."""
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens} and {max_tokens}")
    strengths = boundary_strengths(ids, tokenizer)
    spans: list[tuple[int, int]] = []
    start = 0
    for i, strength in enumerate(strengths):
        if (strength >= _SENTENCE and i + 1 - start >= min_tokens) or i == len(ids) - 1:
            spans.extend(_cut(strengths, start, i + 1, max_tokens))
            start = i + 1
    return spans
