"""Generated token ids to text deltas (``DeltaStreamer``), on the default model's byte-level tokenizer."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from lminf_integrations.streaming import DeltaStreamer


def _stream(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    deltas: list[str] = []
    streamer = DeltaStreamer(tokenizer, deltas.append)
    streamer.put(torch.tensor([[1, 2, 3]]))  # generate() passes the prompt first
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.end()
    return deltas


def test_a_character_of_several_tokens_comes_out_whole(default_tokenizer: PreTrainedTokenizerBase) -> None:
    ids = default_tokenizer.encode("ab 龘 😀 c", add_special_tokens=False)
    deltas = _stream(default_tokenizer, ids)
    assert "".join(deltas) == "ab 龘 😀 c" and all("\ufffd" not in delta for delta in deltas)


def test_an_answer_cut_inside_a_character_ends_before_it(default_tokenizer: PreTrainedTokenizerBase) -> None:
    """max_new_tokens may stop generation between a character's byte tokens: the answer ends with the last whole
    character, not with a replacement character."""
    whole = default_tokenizer.encode("ab 龘", add_special_tokens=False)
    cut = whole[:-1]
    assert default_tokenizer.decode(cut).endswith("\ufffd")  # what a plain decode would show
    assert "".join(_stream(default_tokenizer, cut)) == "ab "
