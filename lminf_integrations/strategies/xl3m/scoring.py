"""Each segment read once, after a shared prefix; and how certain the model then is about the question.

Every segment is read after the same short prefix (the prompt's opening and the document's first tokens), as the
answer prompt will have it, so each is scored in the context it is answered in.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from ...hf_compat import cache_kwargs
from ..vanilla import FullCache


def _key(model: PreTrainedModel, ids: Sequence[int]) -> tuple[int, str]:
    return id(model), hashlib.sha256(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes()).hexdigest()


class SegmentStore:
    """Caches of (prefix + segment) by their tokens, per model; least recently used out first, bounded by bytes."""

    def __init__(self, max_bytes: int = 6 * 2**30) -> None:
        self.max_bytes = max_bytes
        self._caches: OrderedDict[tuple[int, str], FullCache] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.encoded = 0  # caches computed rather than found (tests and reports)

    def get(
        self, model: PreTrainedModel, prefix: FullCache, prefix_ids: Sequence[int], ids: Sequence[int]
    ) -> FullCache:
        """The cache of ``prefix_ids + ids``: found, or ``ids`` read after a copy of ``prefix``."""
        return self._find_or_read(model, [*prefix_ids, *ids], lambda: read(model, ids, prefix.clone()))

    def prefix(self, model: PreTrainedModel, ids: Sequence[int]) -> FullCache:
        """The cache of ``ids`` read from position 0."""
        return self._find_or_read(model, ids, lambda: read(model, ids))

    def _find_or_read(self, model: PreTrainedModel, ids: Sequence[int], reader: Callable[[], FullCache]) -> FullCache:
        key = _key(model, ids)
        with self._lock:
            if key in self._caches:
                self._caches.move_to_end(key)
                return self._caches[key]
        cache = reader()
        self._put(key, cache)
        return cache

    def _put(self, key: tuple[int, str], cache: FullCache) -> None:
        with self._lock:
            self.encoded += 1
            size = cache.nbytes()
            if size > self.max_bytes:
                return
            self._caches[key] = cache
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._caches.popitem(last=False)
                self._bytes -= dropped.nbytes()


@torch.inference_mode()
def read(model: PreTrainedModel, ids: Sequence[int], cache: FullCache | None = None) -> FullCache:
    """``ids`` read by the (unpatched) model after what ``cache`` holds (nothing: from position 0)."""
    cache = cache if cache is not None else FullCache(config=model.config)
    if ids:
        tokens = torch.tensor([list(ids)], device=model.device)
        model.get_decoder()(input_ids=tokens, use_cache=True, **cache_kwargs(cache))
    return cache


@torch.inference_mode()
def score_segment(model: PreTrainedModel, cache: FullCache, query: Sequence[int], score: str) -> float:
    """How certain the model is about ``query`` read right after what ``cache`` holds (higher: more certain).

    ``"loglik"``: the mean log-probability of the query's tokens (the first excepted: it follows the segment's last
    token, whose logits are not kept); ``"entropy"``: minus the entropy of the next token after the query, where
    the answer would start. The cache is left as it was.
    """
    length = cache.get_seq_length()
    tokens = torch.tensor([list(query)], device=model.device)
    try:
        logits = model(input_ids=tokens, use_cache=True, **cache_kwargs(cache)).logits[0].float()
    finally:
        cache.keep_first(length)
    if score == "entropy":
        logp = logits[-1].log_softmax(-1)
        return float((logp.exp() * logp).sum())
    if len(query) < 2:
        raise ValueError("scoring by log-likelihood needs a question of at least 2 tokens")
    logp = logits[:-1].log_softmax(-1)
    return float(logp.gather(-1, tokens[0, 1:, None]).mean())
