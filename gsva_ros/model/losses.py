"""GSVA's mask losses (``gsva_reference.md`` §4), computed at the source image resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """n×H×W logits and 0/1 targets → n per-mask BCE (mean over pixels)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, scale: float = 1000.0, eps: float = 1e-6
) -> torch.Tensor:
    """n×H×W → n per-mask DICE loss ``1 − (2Σ(p/s·t)+eps)/(Σp/s + Σt/s + eps)``."""
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    num = 2 * (p / scale * t).sum(-1)
    den = (p / scale).sum(-1) + (t / scale).sum(-1)
    return 1 - (num + eps) / (den + eps)
