"""``strategy="vanilla"``: the unpatched model with transformers' own cache (every key, ordinary attention).

For comparisons: it is what the model does without help, and past its training length what it cannot do.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from ..ops import cached_causal
from .base import Strategy, kv_bytes_per_token
from .lm_infinite.patch import is_patched, unpatch_model


class FullCache(DynamicCache):
    """transformers' ``DynamicCache``, measurable, copyable and savable as document states need."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_tensors()[0].values())

    def clone(self) -> FullCache:
        return copy.deepcopy(self)

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], list[dict[str, int | None]]]:
        """Each initialised layer's keys and values, named ``layer.{index}.keys`` / ``.values``."""
        tensors: dict[str, torch.Tensor] = {}
        layers: list[dict[str, int | None]] = []
        for index, layer in enumerate(self.layers):
            seen = self.get_seq_length(index)
            layers.append({"seen": seen})
            if seen:
                assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
                tensors[f"layer.{index}.keys"], tensors[f"layer.{index}.values"] = layer.keys, layer.values
        return tensors, layers

    def key_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each initialised layer's keys and values, in layer order."""
        pairs = []
        for layer in self.layers:
            if isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None:
                pairs.append((layer.keys, layer.values))
        return pairs

    def keep_first(self, length: int) -> None:
        """Drop every token after the first ``length`` (``crop`` changed meaning between transformers versions)."""
        for layer in self.layers:
            if isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None:
                layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], layers: Sequence[Mapping[str, int | None]]) -> None:
        """Fill this empty cache with what :meth:`state_tensors` returned."""
        if self.get_seq_length() != 0:
            raise ValueError("load_state_tensors needs an empty cache")
        for index, info in enumerate(layers):
            if info["seen"]:
                self.update(tensors[f"layer.{index}.keys"], tensors[f"layer.{index}.values"], index)


class Vanilla(Strategy):
    name = "vanilla"

    def prepare(self, model: PreTrainedModel) -> None:
        if is_patched(model):
            unpatch_model(model)
        cached_causal.release(model)  # transformers' own attention, as another strategy may have left it

    def new_cache(self, model: PreTrainedModel) -> FullCache:
        return FullCache(config=model.config)

    def cache_bytes(self, model: PreTrainedModel, n_tokens: int) -> int:
        return model.config.num_hidden_layers * kv_bytes_per_token(model) * n_tokens
