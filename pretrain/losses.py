"""InfoNCE against a key queue (MoCo): the loss of both the global and the local branch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float,
             valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """MoCo InfoNCE: each query's positive is its own key, the negatives are the whole queue.

    Args:
        q: ``[N, D]`` L2-normalised queries (with grad).
        k: ``[N, D]`` L2-normalised positive keys (no grad).
        queue: ``[K, D]`` L2-normalised negatives - a snapshot taken *before* this step's keys are enqueued.
        temperature: logits are divided by it (MoCo-v2: 0.2).
        valid: optional ``[N]`` bool; rows marked False do not count.

    Returns:
        (loss, top-1 instance accuracy): the mean cross-entropy of ``[N, 1 + K]`` logits whose column 0 is
        the positive, and the share of rows whose positive has the highest logit.
    """
    q = q.float()
    pos = (q * k.float()).sum(dim=1, keepdim=True)  # [N, 1]
    neg = q @ queue.float().T  # [N, K]
    logits = torch.cat([pos, neg], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    losses = F.cross_entropy(logits, target, reduction="none")
    correct = (logits.argmax(dim=1) == 0).float()
    if valid is not None:
        weights = valid.float()
        denom = weights.sum().clamp(min=1.0)
        return (losses * weights).sum() / denom, (correct * weights).sum() / denom
    return losses.mean(), correct.mean()
