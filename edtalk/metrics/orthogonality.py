"""How far a set of bases is from orthonormal: max |QᵀQ − I| (DESIGN.md section 2).

The latent navigation orthonormalises its banks by construction (one QR), so in exact arithmetic this is 0; the
metric catches a broken construction and reports float round-off (~1e-6 in float32).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def orthogonality_error(bases: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> float:
    """max |QᵀQ − I| for Q of shape (D, n), one basis per column.

    A list or dict of banks (each (D, n_s)) is concatenated along the columns in the order given, so the cross-space
    products count too.
    """
    if isinstance(bases, Mapping):
        bases = list(bases.values())
    if not isinstance(bases, torch.Tensor):
        parts = [torch.as_tensor(b) for b in bases]
        if not parts:
            raise ValueError("orthogonality_error: no bases given")
        dims = {p.shape[0] for p in parts}
        if len(dims) != 1 or any(p.dim() != 2 for p in parts):
            raise ValueError(
                f"banks must be 2-D (D, n) with one D, got shapes {[tuple(p.shape) for p in parts]}"
            )
        bases = torch.cat(parts, dim=1)
    q = bases.detach().to(torch.float64)
    if q.dim() != 2:
        raise ValueError(f"bases must be a (D, n) matrix, got shape {tuple(q.shape)}")
    if q.shape[1] > q.shape[0]:
        raise ValueError(f"{q.shape[1]} bases in {q.shape[0]} dimensions cannot be orthonormal")
    gram = q.T @ q
    return float((gram - torch.eye(q.shape[1], dtype=torch.float64)).abs().max())
