"""Numeric tolerances derived from the dtype's precision and the size of the reductions, never from what one CPU
happened to produce.

Two computations of the same value that differ only in rounding — another summation order, vector width or
blocking, fused multiply-adds, AVX2 vs AVX-512 vs AMX code paths — differ in a sum of ``n`` terms by about
``sqrt(n)`` rounding errors of unit roundoff ``u`` each, relative to the sum of the terms' magnitudes
``Σ|x_i|``: rounding errors of a long sum behave like a random walk. Higham & Mary (SIAM J. Sci. Comput. 41(5),
2019, "A new approach to probabilistic rounding error analysis") bound it by ``λ·sqrt(n)·u·Σ|x_i|`` with
probability at least ``1 - 2·exp(-λ²/2)`` per sum (to first order in ``u``); ``λ = 8`` makes a spurious failure
rarer than 1e-13 per sum. The worst case over every order is ``n·u·Σ|x_i|``, far too loose to catch anything.

:func:`attention_bound` applies this term by term to one attention query (logits, softmax, weighted sum).
:func:`network_bound` does it for a whole model's output, where the per-layer reductions compound: it takes the
largest reduction of the network, the number of layers the error passes through, and the reference's magnitude,
with a factor for the growth of an error through a layer (``LAYER_GAIN``, generous for the well-conditioned
random and real models tested here). The layers' errors add up in the residual stream like independent random
terms, so they grow as ``sqrt(layers)``. A bug that moves a logit — a wrong rotation, a wrong mask — moves it by far
more than these bounds: the tests that use them also check that such a change is seen.
"""

from __future__ import annotations

import math

import torch

LAMBDA = 8.0  # Higham & Mary's λ: failure probability <= 2·exp(-32) per sum
LAYER_GAIN = 4.0  # how much a relative error may grow through one transformer layer (norms, residual, softmax)
EXP_ULPS = 4.0  # vectorized expf (libmvec / Sleef / inductor's exp) is accurate to a few units in the last place


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps / 2``: the largest relative error of rounding one real number to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def sum_bound(dtype: torch.dtype, n: int) -> float:
    """Relative error bound (to ``Σ|x_i|``) of a sum or dot product of ``n`` terms computed in ``dtype``."""
    return LAMBDA * math.sqrt(max(n, 1)) * unit_roundoff(dtype)


def attention_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    compute_dtype: torch.dtype,
    output_dtype: torch.dtype,
) -> torch.Tensor:
    """Per-element bound on ``|softmax(q·kᵀ·scale + mask)·v - exact|`` for one query per sequence, ``(B, 1, H, D)``.

    Inputs ``(B, H, 1, D)`` / ``(B, Hkv, N, D)``, already in their storage dtype (converting them to the compute
    dtype is exact). Logit errors ``δℓ_j <= sum_bound(D)·scale·Σ_i|q_i·k_ji|`` change each weight ``p_j`` by a
    relative ``<= 2·max|δℓ| + exp's own error``; the weighted sum adds ``sum_bound(N)·Σ_j p_j|v_j|``; storing the
    result in ``output_dtype`` adds ``u·|o|``.
    """
    group = q.shape[1] // k.shape[1]
    q64 = q.double()
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    n_keys, dim = k.shape[-2], q.shape[-1]
    logits = q64 @ k64.transpose(-1, -2) * scale
    if mask is not None:
        logits = logits + mask.double()
    weights = logits.softmax(-1)  # (B, H, 1, N)
    logit_error = sum_bound(compute_dtype, dim) * scale * (q64.abs() @ k64.abs().transpose(-1, -2))
    visible = torch.isfinite(logits)
    worst_logit_error = torch.where(visible, logit_error, 0).amax(-1, keepdim=True)
    weight_error = 2 * worst_logit_error + EXP_ULPS * unit_roundoff(compute_dtype)
    weighted_magnitude = weights @ v64.abs()  # Σ_j p_j |v_j|, (B, H, 1, D)
    output = weights @ v64
    bound = (weight_error + sum_bound(compute_dtype, n_keys)) * weighted_magnitude
    bound = bound + unit_roundoff(output_dtype) * output.abs()
    return bound.transpose(1, 2)  # (B, 1, H, D), the kernel's layout


def network_bound(reference: torch.Tensor, dtype: torch.dtype, reduction: int, layers: int) -> float:
    """Bound on ``max|got - reference|`` for a model output computed twice in ``dtype`` in different orders.

    ``reduction`` is the longest sum in one layer (hidden size, MLP width, or keys attended), ``layers`` the
    layers the error passes through; relative to the reference's largest magnitude.
    """
    per_layer = sum_bound(dtype, reduction)
    return per_layer * math.sqrt(layers) * LAYER_GAIN * float(reference.abs().max())


def assert_close(got: torch.Tensor, expected: torch.Tensor, bound: float | torch.Tensor, what: str = "") -> None:
    """``|got - expected| <= bound`` element by element, with the worst element in the message."""
    error = (got.double() - expected.double()).abs()
    excess = error - (bound if isinstance(bound, float) else bound.double())
    worst = int(excess.argmax())
    flat_bound = bound if isinstance(bound, float) else float(bound.double().flatten()[worst])
    assert float(excess.flatten()[worst]) <= 0, (
        f"{what} error {float(error.flatten()[worst]):.3g} > bound {flat_bound:.3g} at flat index {worst} "
        f"(largest error {float(error.max()):.3g})"
    )
