"""FIFO queue of L2-normalised keys: the negatives of a MoCo-style InfoNCE loss.

Unlike lightly's ``MemoryBankModule`` (a non-persistent buffer that drops the tail of a batch that crosses
the end), the queue here is a persistent buffer - it is saved with every checkpoint so a resumed run sees
the same negatives - and a batch that crosses the end wraps around to the start, so any batch size and any
per-step key count work. Keys must already be gathered from all processes (every rank enqueues the same
keys, so every rank holds the same queue).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FeatureQueue(nn.Module):
    """A ring buffer of ``size`` keys of dimension ``dim``.

    Buffers (all persistent, so ``state_dict`` round-trips the queue exactly):
        keys: ``[size, dim]`` - initialised from N(0, 1) and L2-normalised per key.
        ptr: ``[]`` int64 - the slot the next key goes to.
        filled: ``[]`` int64 - how many real keys have been written (saturates at ``size``).
    """

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"queue size and dim must be positive, got size={size}, dim={dim}")
        self.size, self.dim = size, dim
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: Tensor, valid: Tensor | None = None) -> None:
        """Write ``keys [N, dim]`` (rows where ``valid [N]`` is False are left out) after the newest entry.

        A batch that crosses the end continues at slot 0; a batch longer than the queue keeps its last
        ``size`` keys, as if it had been written one key at a time. With ``N <= size`` (every real run) nothing
        is read back to the host: the valid rows are moved to the front, all N slots after the pointer are
        written, and slots past the valid count get their old keys back.
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"expected keys of shape [N, {self.dim}], got {tuple(keys.shape)}")
        keys = keys.detach().to(self.keys.dtype)
        n_rows = keys.shape[0]
        if n_rows > self.size:
            self._enqueue_long(keys, valid)
            return
        if valid is None:
            count = torch.full((), n_rows, dtype=torch.long, device=keys.device)
        else:
            valid = valid.to(torch.bool)
            keys = keys[torch.argsort((~valid).to(torch.int8), stable=True)]  # valid rows first, in order
            count = valid.sum()
        rows = torch.arange(n_rows, device=keys.device)
        slots = (rows + self.ptr) % self.size
        self.keys[slots] = torch.where((rows < count)[:, None], keys, self.keys[slots])
        self.ptr.copy_((self.ptr + count) % self.size)
        self.filled.copy_(torch.clamp(self.filled + count, max=self.size))

    def _enqueue_long(self, keys: Tensor, valid: Tensor | None) -> None:
        """More rows than slots (tiny queues only): compact on the host, keep the newest ``size``."""
        if valid is not None:
            keys = keys[valid.to(torch.bool)]
        n = keys.shape[0]
        if n == 0:
            return
        ptr = int(self.ptr)
        if n >= self.size:  # only the newest `size` keys survive; they end just before the new pointer
            ptr = (ptr + n) % self.size
            self.keys.copy_(torch.roll(keys[-self.size:], shifts=ptr, dims=0))
        else:
            slots = (torch.arange(n, device=self.keys.device) + ptr) % self.size
            self.keys[slots] = keys
            ptr = (ptr + n) % self.size
        self.ptr.fill_(ptr)
        self.filled.fill_(min(int(self.filled) + n, self.size))

    @property
    def fill_fraction(self) -> float:
        """Share of the queue that holds real keys rather than the random initialisation."""
        return int(self.filled) / self.size

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
