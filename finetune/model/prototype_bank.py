"""A per-class bank of prototypes (NTRENet's distracting-object negatives), kept in the model's state dict.

Newest first, at most ``capacity`` per class. The bank is state: it is saved with every checkpoint and weights
file as one tensor ``[N, 1 + D]`` (column 0 = the class id) through ``nn.Module``'s extra-state hooks, so a
resumed run continues with the same negatives. In a multi-process run every process adds what *all*
processes computed (gathered in rank order), so the banks stay identical and rank 0's checkpoint stands for all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class PrototypeBank(nn.Module):
    """``class id -> [n <= capacity, dim]`` prototypes, newest first.

    Args:
        dim: prototype width.
        capacity: prototypes kept per class (the reference: 2,000).
    """

    def __init__(self, dim: int, capacity: int = 2000) -> None:
        super().__init__()
        self.dim, self.capacity = dim, capacity
        self.banks: dict[int, Tensor] = {}

    @torch.no_grad()
    def add(self, classes: Tensor, prototypes: Tensor) -> None:
        """Prepend ``prototypes [B,D]`` to the banks of ``classes [B]`` (gathered over processes first)."""
        classes, prototypes = classes.detach(), prototypes.detach().float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts_c = [torch.empty_like(classes) for _ in range(dist.get_world_size())]
            parts_p = [torch.empty_like(prototypes) for _ in range(dist.get_world_size())]
            dist.all_gather(parts_c, classes)
            dist.all_gather(parts_p, prototypes)
            classes, prototypes = torch.cat(parts_c), torch.cat(parts_p)
        for c in classes.unique(sorted=True).tolist():
            new = prototypes[classes == c].flip(0)  # the later one in the batch is the newer
            old = self.banks.get(int(c))
            self.banks[int(c)] = (new if old is None else torch.cat([new, old.to(new.device)]))[: self.capacity]

    def get(self, class_id: int) -> Tensor:
        """``[n, D]`` prototypes of one class (``n`` may be 0)."""
        return self.banks.get(int(class_id), torch.zeros(0, self.dim))

    def get_extra_state(self) -> Tensor:
        """The whole bank as ``[N, 1 + D]`` float32 rows (class id, prototype), classes in ascending order."""
        rows = [torch.cat([torch.full((len(p), 1), float(c)), p.detach().float().cpu()], dim=1)
                for c, p in sorted(self.banks.items())]
        return torch.cat(rows) if rows else torch.zeros(0, 1 + self.dim)

    def set_extra_state(self, state: Tensor) -> None:
        """Restore from :meth:`get_extra_state`'s tensor; a width other than ``1 + dim`` is an error."""
        if state.dim() != 2 or state.shape[1] != 1 + self.dim:
            raise ValueError(f"prototype bank state must be [N, {1 + self.dim}], got {tuple(state.shape)}")
        self.banks = {}
        for c in state[:, 0].unique(sorted=True).tolist():
            self.banks[int(c)] = state[state[:, 0] == c, 1:].clone()

    def __len__(self) -> int:
        return sum(len(p) for p in self.banks.values())
