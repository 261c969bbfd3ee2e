"""Design B (DetCon-style): superpixel ids on the feature grid, per-id mean features, shared-id sampling."""

from __future__ import annotations

import torch
from lightly.models.utils import pool_masked


def labels_to_grid(labels: torch.Tensor, grid: int, num_ids: int, check: bool = True) -> torch.Tensor:
    """Majority id per feature cell (one-hot, average-pool each block, argmax; ties go to the lower id).

    Pixel (y, x) belongs to cell (y * grid // S, x * grid // S); with S divisible by ``grid`` these are the
    S/grid-sized blocks of DetCon's average pooling. Counting ids per cell avoids the [B,num_ids,S,S] one-hot.

    Args:
        labels: [B,S,S] int64 ids in ``[0, num_ids)``.
        grid: cells per side (the encoder's output side, e.g. 7 for 224 px on ResNet-50).
        num_ids: number of possible ids.
        check: verify the id range (reads two values back from the device: callers whose ids are known to be
            in range, like the training step, pass False).

    Returns:
        [B,grid,grid] int64.
    """
    batch, height, width = labels.shape
    if height < grid or width < grid:
        raise ValueError(f"label maps of size {height}x{width} are smaller than the {grid}x{grid} grid")
    if check:
        _check_ids(labels, num_ids)
    cell_row = torch.arange(height, device=labels.device) * grid // height  # [S]
    cell_col = torch.arange(width, device=labels.device) * grid // width  # [S]
    cell = (cell_row[:, None] * grid + cell_col[None, :]).reshape(1, -1)  # [1,S*S]
    index = cell * num_ids + labels.reshape(batch, -1)  # [B,S*S]
    counts = torch.zeros(batch, grid * grid * num_ids, dtype=torch.int32, device=labels.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.int32))
    return counts.view(batch, grid, grid, num_ids).argmax(dim=-1)


def pool_regions(features: torch.Tensor, grid_labels: torch.Tensor, num_ids: int,
                 check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean feature of each id (lightly ``pool_masked``) and which ids occur.

    Args:
        features: [B,C,h,w].
        grid_labels: [B,h,w] int64 ids in ``[0, num_ids)``.
        num_ids: number of possible ids N.
        check: verify the id range (as in :func:`labels_to_grid`).

    Returns:
        pooled [B,N,C] (zeros for absent ids) and present [B,N] bool.
    """
    if features.shape[-2:] != grid_labels.shape[-2:] or features.shape[0] != grid_labels.shape[0]:
        raise ValueError(f"features {tuple(features.shape)} and grid labels {tuple(grid_labels.shape)} do not match")
    if check:
        _check_ids(grid_labels, num_ids)
    flat = grid_labels.flatten(1)  # a scatter, not one_hot, which range-checks its input with a host read
    present = torch.zeros(flat.shape[0], num_ids, dtype=torch.bool, device=flat.device).scatter_(1, flat, True)
    pooled = pool_masked(features, grid_labels, num_ids).transpose(1, 2)  # [B,C,N] -> [B,N,C]
    return pooled, present


def _check_ids(labels: torch.Tensor, num_ids: int) -> None:
    low, high = torch.aminmax(labels)
    if low < 0 or high >= num_ids:
        raise ValueError(f"label ids span [{int(low)}, {int(high)}], outside [0, num_ids={num_ids})")


def sample_shared_ids(present_a: torch.Tensor, present_b: torch.Tensor, n: int,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` ids per image, uniformly with replacement among those present in both views.

    Args:
        present_a: [B,N] bool, ids present in view a.
        present_b: [B,N] bool, ids present in view b.
        n: ids drawn per image.
        generator: torch generator on the tensors' device (None: the global RNG).

    Returns:
        ids [B,n] int64 and valid [B,n] bool; a row without shared ids is all-invalid (its ids are
        arbitrary), so callers weight it out and count ``(~valid[:, 0]).sum()``.
    """
    shared = present_a & present_b  # [B,N]
    has_any = shared.any(dim=1, keepdim=True)  # [B,1]
    # Rows with nothing shared draw from all ids only to keep multinomial well defined; they are marked invalid.
    weights = torch.where(has_any, shared, torch.ones_like(shared)).float()
    ids = torch.multinomial(weights, n, replacement=True, generator=generator)
    return ids, has_any.expand(-1, n).clone()
