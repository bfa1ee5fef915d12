"""Rotary-embedding arithmetic used to move queries and keys to other positions.

RoPE rotates each (x_k, x_{k+d/2}) pair of a head vector by ``position * inv_freq[k]``. Rotations compose, so a
vector already rotated to position ``p`` is moved to ``p + delta`` by rotating it by ``delta``; this lets the
attention work on the states the model already rotated, whatever rope scaling produced ``inv_freq``.
"""

from __future__ import annotations

import torch


def rotation(delta: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape ``(*delta.shape, head_dim)`` for rotating by ``delta`` positions."""
    angles = delta.to(torch.float32)[..., None] * inv_freq.to(device=delta.device, dtype=torch.float32)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (..., seq, head_dim)`` by tables broadcastable to it, in the tables' dtype.

    The models' formula ``x * cos + rotate_half(x) * sin``, written per half into one output: each half is
    ``x1 * cos - x2 * sin`` or ``x2 * cos + x1 * sin``. With bf16 ``x`` and float32 tables the products are taken
    in float32 without a float copy of ``x``; this runs ~5x faster than the formula on whole float copies, and it
    moves every query of a prefill chunk in every layer.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos_half, sin_half = cos[..., :half], sin[..., :half]  # RoPE tables repeat: (angles, angles)
    if torch.compiler.is_compiling():  # the compiler fuses the plain formula (and cannot trace ``out=`` views)
        return torch.cat((x1 * cos_half - x2 * sin_half, x2 * cos_half + x1 * sin_half), dim=-1)
    shape = torch.broadcast_shapes(x.shape, cos.shape)
    out = torch.empty(shape, dtype=cos.dtype, device=x.device)
    low, high = out[..., :half], out[..., half:]
    torch.mul(x1, cos_half, out=low)
    low.addcmul_(x2, sin_half, value=-1)
    torch.mul(x2, cos_half, out=high)
    high.addcmul_(x1, sin_half)
    return out


def shift_positions(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move states ``x (batch, heads, seq, head_dim)`` by ``delta (seq,)`` positions, computed in float32."""
    cos, sin = rotation(delta, inv_freq, torch.float32)
    return rotate(x, cos, sin).to(x.dtype)
