"""The cache of ``strategy="dca"``: every key and value, the keys kept at their chunk offsets.

transformers' own cache keeps keys as the model rotated them (at their absolute positions); Dual Chunk Attention
sees every key at its offset within its chunk, so with that cache each decoding step would move every key again.
:class:`DCACache` moves each key once, as it arrives, and tells the attention function so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from ..vanilla import FullCache
from .attention import DCALayerSettings, at_offsets_of, hand_over


class DCACache(FullCache):
    """transformers' ``DynamicCache`` with keys stored at their chunk offsets (one ``DCALayerSettings`` per layer)."""

    def __init__(self, layers: Sequence[DCALayerSettings]) -> None:
        super().__init__()
        self.dca_layers = list(layers)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seen = self.get_seq_length(layer_idx)
        moved = at_offsets_of(key_states, self.dca_layers[layer_idx], first=seen)
        keys, values = super().update(moved, value_states, layer_idx, *args, **kwargs)
        hand_over(keys)
        return keys, values

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], layers: Sequence[Mapping[str, int | None]]) -> None:
        """Fill this empty cache with what :meth:`state_tensors` returned (keys already at their offsets)."""
        if self.get_seq_length() != 0:
            raise ValueError("load_state_tensors needs an empty cache")
        for index, info in enumerate(layers):
            if info["seen"]:
                DynamicCache.update(self, tensors[f"layer.{index}.keys"], tensors[f"layer.{index}.values"], index)
