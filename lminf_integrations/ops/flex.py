"""Partial attentions off the CPU through FlexAttention: LM-Infinite's local band in one call over a sliding-window
block mask, and :func:`.partial.flash`'s unmasked and causal calls (Dual Chunk Attention's parts).

On a CPU the band goes through PyTorch's fused CPU flash kernel, cut into blocks that keep its work near the band
(:mod:`..strategies.lm_infinite.attention`). FlexAttention (``torch.nn.attention.flex_attention``) does that cut
itself: its block mask lists, per tile of queries, the tiles of keys that hold any visible key, so a compiled call
(Triton kernels on CUDA) computes only the tiles on the band, pairs grouped-query heads itself and returns the
log-sum-exp that the exact merge with the global and top-k parts needs.

The CPU path stays where it is: compiled FlexAttention on a CPU does not return the log-sum-exp, and uncompiled it
materialises every logit. Tests set :data:`FLEX_ON_CPU` to run this path uncompiled on a CPU, where it is exact
and small inputs keep it cheap.

Where FlexAttention does not compile (a torch without Triton, a GPU its kernels do not support), the first failure
is logged once and recorded in :data:`COMPILE_FAILURE`; that call and every later one take the exact unfused
kernels instead (:func:`.partial.plain_attention`, and the CPU's blockwise band layout over it): slower, but right.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.attention.flex_attention as flex_module
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# torch 2.9+ asks for the log-sum-exp with an AuxRequest and deprecates `return_lse` for removal; older torch has only
# `return_lse`.
_AUX_REQUEST: Any = getattr(flex_module, "AuxRequest", None)

# A partial attention (:mod:`.partial` merges them): its output (B, H, Lq, D), in any memory layout, and its
# log-sum-exp (B, H, Lq).
Part = tuple[torch.Tensor, torch.Tensor]

#: Take this path on the CPU too, uncompiled (tests: the path CUDA takes, checked on a CPU).
FLEX_ON_CPU = False
#: Why compiled FlexAttention failed in this process ("ErrorType: message"); set, no call goes through it again.
COMPILE_FAILURE: str | None = None
logger = logging.getLogger(__name__)
_MASKS_KEPT = 32  # block masks kept per process: a prefill uses a few shapes (its chunks, and the last one)


def applies(device: torch.device) -> bool:
    """Whether partial attentions of several queries on ``device`` go through FlexAttention."""
    return (device.type == "cuda" or (device.type == "cpu" and FLEX_ON_CPU)) and COMPILE_FAILURE is None


@functools.lru_cache(maxsize=1)
def _compiled() -> Callable[..., Any]:
    # Compiled once per process; each new shape compiles once more, and a prefill has few (its chunk, the window).
    return torch.compile(flex_attention)


def _band_rule(offset: torch.Tensor, window: torch.Tensor) -> Callable[..., torch.Tensor]:
    """Query row ``r`` stands at key index ``offset + r`` and sees the ``window`` keys up to its own. The numbers are
    tensors, so that a compiled kernel does not specialise on them (no recompiling per chunk)."""

    def visible(batch: torch.Tensor, head: torch.Tensor, row: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        at = row + offset
        return (key <= at) & (at - key < window)

    return visible


@functools.lru_cache(maxsize=_MASKS_KEPT)
def band_mask(n_queries: int, n_keys: int, offset: int, window: int, device: torch.device) -> BlockMask:
    """The block mask of :func:`_band_rule` for ``n_queries`` rows over ``n_keys`` keys."""
    rule = _band_rule(torch.tensor(offset, device=device), torch.tensor(window, device=device))
    return create_block_mask(rule, B=None, H=None, Q_LEN=n_queries, KV_LEN=n_keys, device=device)


def band(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, window: int, first_index: int, scale: float
) -> Part:
    """Ordinary attention of ``query (B, H, Lq, D)`` to the keys within ``window`` positions: row ``r`` is the query
    at index ``first_index + r`` of ``keys``/``values (B, Hkv, Lk, D)`` and sees keys ``(first_index + r - window,
    first_index + r]``. Returns ``(out (B, H, Lq, D), logsumexp (B, H, Lq) float32)``."""
    n_queries = query.shape[-2]
    if first_index + n_queries > keys.shape[-2]:
        raise ValueError(f"queries up to key index {first_index + n_queries - 1}, but {keys.shape[-2]} keys")
    low = max(0, first_index - window + 1)  # keys before the first query's window are never seen
    keys, values = keys[:, :, low : first_index + n_queries], values[:, :, low : first_index + n_queries]
    offset = first_index - low
    try:
        return _attend(query, keys, values, band_mask(n_queries, keys.shape[-2], offset, window, query.device), scale)
    except torch._dynamo.exc.TorchDynamoException as error:  # the compile failed, not the inputs
        _note_compile_failure(error, query.device)
        return _unfused(query, keys, values, scale, _band_seen(n_queries, keys.shape[-2], offset, window, query.device))


def attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, is_causal: bool, scale: float) -> Part:
    """:func:`.partial.flash`'s contract without an added mask: every key, or (``is_causal``) row ``r`` sees keys
    ``[0, r]`` (top-left aligned)."""
    if is_causal:
        return band(query, keys, values, max(query.shape[-2], 1), 0, scale)
    try:
        return _attend(query, keys, values, None, scale)
    except torch._dynamo.exc.TorchDynamoException as error:  # the compile failed, not the inputs
        _note_compile_failure(error, query.device)
        return _unfused(query, keys, values, scale, None)


def _attend(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: BlockMask | None, scale: float
) -> Part:
    attend = cast("Callable[..., Any]", flex_attention) if query.device.type == "cpu" else _compiled()
    grouped = query.shape[1] != keys.shape[1]
    if _AUX_REQUEST is None:
        out, lse = attend(query, keys, values, block_mask=mask, scale=scale, enable_gqa=grouped, return_lse=True)
    else:
        out, aux = attend(query, keys, values, block_mask=mask, scale=scale, enable_gqa=grouped,
                          return_aux=_AUX_REQUEST(lse=True))  # fmt: skip
        lse = aux.lse
    return out, lse.float()


def _note_compile_failure(error: Exception, device: torch.device) -> None:
    global COMPILE_FAILURE
    first_line = (str(error).strip().splitlines() or [""])[0]
    COMPILE_FAILURE = f"{type(error).__name__}: {first_line}"
    logger.warning(
        "FlexAttention did not compile on %s (%s); attention takes exact unfused kernels instead (slower, and more "
        "memory per call). The full error is logged at DEBUG level.", device, COMPILE_FAILURE,
    )  # fmt: skip
    logger.debug("FlexAttention compile error", exc_info=error)


def _band_seen(n_queries: int, n_keys: int, offset: int, window: int, device: torch.device) -> torch.Tensor:
    """:func:`_band_rule` as a boolean ``(Lq, Lk)`` tensor."""
    at = torch.arange(offset, offset + n_queries, device=device)[:, None]
    key = torch.arange(n_keys, device=device)[None, :]
    return (key <= at) & (at - key < window)


def _unfused(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, seen: torch.Tensor | None
) -> Part:
    """The exact unfused attention where FlexAttention did not compile: query row ``r`` sees the keys where
    ``seen[r]`` is true (all keys if ``seen`` is None)."""
    from .partial import additive_mask, plain_attention  # .partial imports this module: imported at use

    mask = None if seen is None else additive_mask(seen, query.dtype)
    return plain_attention(query, keys, values, False, mask, scale)
