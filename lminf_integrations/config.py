"""LM-Infinite settings, validated once at construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

CacheMode = Literal["window", "full"]


@dataclass(frozen=True)
class LMInfiniteConfig:
    """Settings of the Λ-shaped attention (Han et al., 2024, arXiv 2308.16137).

    A query at position ``i`` sees a key at position ``j <= i``:

    * ordinarily when ``i - j < n_local`` (the local window);
    * at relative distance exactly ``distance_limit`` when ``j < n_global`` (the global "sink" tokens);
    * otherwise not at all, except that with ``top_k > 0`` the last prompt token and every generated token
      also attend, in layers ``>= top_k_from_layer``, to the ``top_k`` middle keys with the highest logits
      (computed at distance ``distance_limit``).

    Args:
        n_global: Number of leading tokens every query may attend to.
        n_local: Local window size; keep it at or below the model's training length.
        distance_limit: Relative distance used for the global (and top-k) keys. ``None`` means ``n_local``.
        top_k: Middle keys each query head attends to at generation time (0 turns this off).
        top_k_from_layer: First layer (0-based) that uses top-k middle attention.
        cache: ``"window"`` keeps ``n_global + n_local`` keys per layer (constant memory);
            ``"full"`` keeps every key (needed for ``top_k``).
        chunk_size: Tokens per forward call during prefill; bounds activation memory.
    """

    n_global: int = 10
    n_local: int = 4096
    distance_limit: int | None = None
    top_k: int = 0
    top_k_from_layer: int = 0
    cache: CacheMode = "window"
    chunk_size: int = 2048

    def __post_init__(self) -> None:
        _require(isinstance(self.n_global, int) and self.n_global >= 0, "n_global must be an int >= 0")
        _require(isinstance(self.n_local, int) and self.n_local >= 1, "n_local must be an int >= 1")
        if self.distance_limit is not None:
            _require(
                isinstance(self.distance_limit, int) and self.distance_limit >= 1,
                "distance_limit must be None or an int >= 1",
            )
        _require(isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an int >= 0")
        _require(
            isinstance(self.top_k_from_layer, int) and self.top_k_from_layer >= 0,
            "top_k_from_layer must be an int >= 0",
        )
        _require(self.cache in ("window", "full"), f"cache must be 'window' or 'full', got {self.cache!r}")
        _require(
            not (self.top_k > 0 and self.cache != "full"),
            "top_k > 0 needs cache='full' (the middle keys must be kept)",
        )
        _require(isinstance(self.chunk_size, int) and self.chunk_size >= 1, "chunk_size must be an int >= 1")

    @property
    def effective_distance_limit(self) -> int:
        return self.n_local if self.distance_limit is None else self.distance_limit

    def check_against_model(self, max_position_embeddings: int | None, num_layers: int) -> None:
        """Refuse settings that put the model outside the distances it was trained on."""
        if max_position_embeddings is not None:
            _require(
                self.n_local <= max_position_embeddings,
                f"n_local={self.n_local} exceeds the model's training length {max_position_embeddings}",
            )
            _require(
                self.effective_distance_limit <= max_position_embeddings,
                f"distance_limit={self.effective_distance_limit} exceeds the model's training length "
                f"{max_position_embeddings}",
            )
        if self.top_k > 0:
            _require(
                self.top_k_from_layer < num_layers,
                f"top_k_from_layer={self.top_k_from_layer} but the model has {num_layers} layers",
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
