"""The Diffusion K-Head (METHOD 2): a small MLP from the last hidden state to a horizon in 1..K.

Two objectives share the module:
- "gaussian" (the paper's): K logits over horizons 1..K, trained with soft cross-entropy against a Gaussian
  centred on the target horizon `K*`; the horizon is `argmax + 1`.
- "loss-curve": K regressed per-slot losses `l^_1..l^_K`; the horizon is chosen at decode time for any `tau`
  with the same rule that defines `K*`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn


@dataclass
class KHeadMeta:
    """The contract between calibration (which writes it into `fluid.json`) and decoding (which reads it).

    `tau` is the threshold the head was calibrated at: a Gaussian head's classes *are* horizons for that tau
    only; a loss-curve head predicts per-slot losses, so decoding may apply any tau. `slot_loss` is the mean
    held-out loss of each slot (nats): the scale a sensible `--tau` lives on.
    """

    objective: Literal["loss-curve", "gaussian"] = "loss-curve"
    calibrated: bool = False
    tau: float | None = None
    sigma: float | None = None
    slot_loss: list[float] = field(default_factory=list)
    steps: int | None = None
    lr: float | None = None
    data: dict[str, Any] = field(default_factory=dict)  # dataset path and pair counts


class KHead(nn.Module):
    """`Linear(h, h/4) -> GELU -> Linear(h/4, K)`."""

    def __init__(self, hidden_size: int, max_k: int):
        super().__init__()
        self.hidden_size, self.max_k = hidden_size, max_k
        inner = max(1, hidden_size // 4)
        self.net = nn.Sequential(nn.Linear(hidden_size, inner), nn.GELU(), nn.Linear(inner, max_k))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.to(self.net[0].weight.dtype))


def horizon_from_curve(losses: torch.Tensor, tau: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """`max { k : mean(l_1..l_k) < tau }` over the slots that exist, and 1 when none qualifies.

    `losses` is `[..., K]`; `valid[..., k]` says slot `k+1` exists (slots past the sequence end do not). A `k`
    qualifies only if slots 1..k all exist.

    >>> horizon_from_curve(torch.tensor([[1.0, 2.0, 9.0, 0.0], [5.0, 5.0, 5.0, 5.0]]), tau=2.8)
    tensor([2, 1])
    >>> horizon_from_curve(torch.tensor([4.0, 1.0, 1.0, 1.0]), tau=2.8)  # dips under tau late
    tensor(4)
    >>> horizon_from_curve(torch.tensor([1.0, 1.0, 1.0]), tau=2.8, valid=torch.tensor([True, True, False]))
    tensor(2)
    """
    K = losses.shape[-1]
    ks = torch.arange(1, K + 1, device=losses.device)
    if valid is None:
        valid = torch.ones_like(losses, dtype=torch.bool)
    all_valid = valid.long().cumprod(-1).bool()
    running_mean = torch.where(valid, losses, 0.0).cumsum(-1) / ks
    qualifies = all_valid & (running_mean < tau)
    best = torch.where(qualifies, ks, torch.zeros_like(ks)).amax(-1)
    return best.clamp(min=1)


def gaussian_soft_labels(k_star: torch.Tensor, max_k: int, sigma: float) -> torch.Tensor:
    """A normalised Gaussian over classes 1..K centred on `k_star` with width `sigma`: `[..., K]`.

    >>> q = gaussian_soft_labels(torch.tensor([3]), max_k=5, sigma=1.5)
    >>> round(float(q.sum()), 6), int(q.argmax()) + 1
    (1.0, 3)
    """
    ks = torch.arange(1, max_k + 1, device=k_star.device, dtype=torch.float32)
    logits = -((ks - k_star.unsqueeze(-1).float()) ** 2) / (2 * sigma**2)
    return torch.softmax(logits, dim=-1)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of `-sum(q * log_softmax(logits))` (the KL divergence to `q` up to a constant)."""
    return -(target * torch.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def predict_horizon(
    head_out: torch.Tensor,
    *,
    objective: str = "gaussian",
    tau: float | None = None,
    min_k: int = 1,
    max_k: int | None = None,
) -> torch.Tensor:
    """The horizon the head chooses, clamped to `[min_k, max_k]`.

    gaussian: `argmax + 1`; loss-curve: `horizon_from_curve(head_out, tau)`.

    >>> predict_horizon(torch.tensor([0.1, 3.0, 0.2, 0.0]), max_k=4)
    tensor(2)
    >>> predict_horizon(torch.tensor([4.0, 4.0, 4.0, 4.0]), objective="loss-curve", tau=2.8, min_k=3)
    tensor(3)
    """
    if objective == "gaussian":
        k = head_out.argmax(-1) + 1
    elif objective == "loss-curve":
        if tau is None:
            raise ValueError("the loss-curve objective needs tau to choose a horizon")
        k = horizon_from_curve(head_out, tau)
    else:
        raise ValueError(f"unknown K-head objective {objective!r}")
    return k.clamp(min=min_k, max=max_k if max_k is not None else head_out.shape[-1])
