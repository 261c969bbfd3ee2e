"""Few-shot segmentation metrics: class-accumulated foreground IoU (mIoU) and FB-IoU; generalized FSS (base and
novel classes together, BAM) in :class:`GeneralizedMeter`.

For each class, intersections and unions of the foreground are summed over all its episodes and divided
once: IoU_c = sum |P & G| / sum |P | G|; mIoU is the mean of IoU_c over the classes that had episodes. This is
the PFENet / HSNet "class mIoU", not a mean of per-episode IoUs. FB-IoU averages the IoU of label 0 and of
label 1, each accumulated over every episode. Pixels whose target is ``ignore_index`` count nowhere.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

EPS = 1e-10  # PFENet's guard: a class whose union is empty scores 0, not NaN


class SegmentationMeter:
    """Accumulates episode statistics; mergeable across processes through a tensor ``state``.

    The state is float64 ``[C + 1, 3]``: row ``i < C`` holds (foreground intersection, foreground union,
    episodes) of ``class_ids[i]``; the last row holds (background intersection, background union, 0).
    """

    def __init__(self, class_ids: Sequence[int], ignore_index: int = 255) -> None:
        self.class_ids = [int(c) for c in class_ids]
        if len(set(self.class_ids)) != len(self.class_ids):
            raise ValueError(f"class_ids repeat: {self.class_ids}")
        self.row = {c: i for i, c in enumerate(self.class_ids)}
        self.ignore_index = ignore_index
        self.stats = torch.zeros(len(self.class_ids) + 1, 3, dtype=torch.float64)

    def update(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray, class_id: int) -> float:
        """Add one episode: ``pred`` and ``target`` int ``[H, W]`` (0 / 1, target may hold ``ignore_index``).

        Returns the episode's own foreground IoU (for logging and visualisation).
        """
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        if int(class_id) not in self.row:
            raise ValueError(f"class {class_id} is not one of the meter's classes {self.class_ids}")
        valid = target != self.ignore_index
        p_fg, t_fg = (pred == 1) & valid, (target == 1) & valid
        p_bg, t_bg = (pred == 0) & valid, (target == 0) & valid
        inter, union = int((p_fg & t_fg).sum()), int((p_fg | t_fg).sum())
        self.stats[self.row[int(class_id)]] += torch.tensor([inter, union, 1], dtype=torch.float64)
        self.stats[-1, :2] += torch.tensor([int((p_bg & t_bg).sum()), int((p_bg | t_bg).sum())],
                                           dtype=torch.float64)
        return inter / (union + EPS)

    def per_class_iou(self) -> dict[int, float]:
        """``class_id -> IoU`` for every class with at least one episode."""
        return {c: float(self.stats[i, 0] / (self.stats[i, 1] + EPS))
                for c, i in self.row.items() if self.stats[i, 2] > 0}

    def miou(self) -> float:
        """Mean over the evaluated classes of the class-accumulated foreground IoU."""
        ious = list(self.per_class_iou().values())
        return float(np.mean(ious)) if ious else 0.0

    def fbiou(self) -> float:
        """Mean of background and foreground IoU, each accumulated over all episodes."""
        fg = self.stats[:-1, :2].sum(0)
        bg = self.stats[-1, :2]
        return float((fg[0] / (fg[1] + EPS) + bg[0] / (bg[1] + EPS)) / 2)

    def episodes(self) -> int:
        """Number of episodes added."""
        return int(self.stats[:-1, 2].sum())

    def summary(self) -> dict:
        """``{"miou", "fbiou", "episodes", "per_class_iou": {class: iou}, "episodes_per_class": {...}}``."""
        return {"miou": self.miou(), "fbiou": self.fbiou(), "episodes": self.episodes(),
                "per_class_iou": {str(c): v for c, v in self.per_class_iou().items()},
                "episodes_per_class": {str(c): int(self.stats[i, 2]) for c, i in self.row.items()}}

    def state(self) -> Tensor:
        """The accumulated statistics, float64 ``[C + 1, 3]`` (e.g. for ``accelerator.gather``)."""
        return self.stats.clone()

    def load_state(self, state: Tensor) -> SegmentationMeter:
        """Replace the statistics by ``state`` summed over any leading copies (a gathered ``[P*(C+1), 3]``)."""
        state = torch.as_tensor(state, dtype=torch.float64).cpu().reshape(-1, *self.stats.shape)
        self.stats = state.sum(0)
        return self

    def merge(self, other: SegmentationMeter) -> SegmentationMeter:
        """Add another meter's statistics (same classes) into this one."""
        if other.class_ids != self.class_ids or other.ignore_index != self.ignore_index:
            raise ValueError("can only merge meters over the same classes and ignore index")
        self.stats += other.stats
        return self


class GeneralizedMeter:
    """Generalized FSS: every pixel gets background, one of n base classes or the episode's novel class.

    Predictions and targets are int ``[H, W]`` with 0 = background, 1..n = base channels, n + 1 = the episode's
    novel class, ``ignore_index`` = ignore. Per class, intersections and unions are summed over every episode (a
    base class over all of them, a novel class over its own episodes) and divided once, as
    :class:`SegmentationMeter`. ``miou_base`` averages the base classes that appeared or were predicted at all
    (union > 0), ``miou_novel`` the novel classes that had episodes, ``miou_hm`` is their harmonic mean.
    State: float64 ``[n + N, 3]`` (intersection, union, episodes), base rows first.
    """

    def __init__(self, base_channels: int, novel_ids: Sequence[int], ignore_index: int = 255) -> None:
        self.n, self.novel_ids = int(base_channels), [int(c) for c in novel_ids]
        self.row = {c: self.n + i for i, c in enumerate(self.novel_ids)}
        self.ignore_index = ignore_index
        self.stats = torch.zeros(self.n + len(self.novel_ids), 3, dtype=torch.float64)

    def update(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray, novel_id: int) -> None:
        """Add one episode whose novel class is ``novel_id``."""
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        if int(novel_id) not in self.row:
            raise ValueError(f"class {novel_id} is not one of the meter's novel classes {self.novel_ids}")
        valid = target != self.ignore_index
        for j, row in [*((j, j - 1) for j in range(1, self.n + 1)), (self.n + 1, self.row[int(novel_id)])]:
            p, t = (pred == j) & valid, (target == j) & valid
            self.stats[row, :2] += torch.tensor([int((p & t).sum()), int((p | t).sum())], dtype=torch.float64)
        self.stats[self.row[int(novel_id)], 2] += 1

    def miou_base(self) -> float:
        base = self.stats[:self.n]
        seen = base[:, 1] > 0
        return float((base[seen, 0] / base[seen, 1]).mean()) if seen.any() else 0.0

    def miou_novel(self) -> float:
        novel = self.stats[self.n:]
        seen = novel[:, 2] > 0
        return float((novel[seen, 0] / (novel[seen, 1] + EPS)).mean()) if seen.any() else 0.0

    def miou_hm(self) -> float:
        b, n = self.miou_base(), self.miou_novel()
        return 2 * b * n / (b + n) if b + n > 0 else 0.0

    def summary(self) -> dict:
        """``{"miou_base", "miou_novel", "miou_hm", "episodes", "per_novel_class_iou": {class: iou}}``."""
        novel = self.stats[self.n:]
        return {"miou_base": self.miou_base(), "miou_novel": self.miou_novel(), "miou_hm": self.miou_hm(),
                "episodes": int(novel[:, 2].sum()),
                "per_novel_class_iou": {str(c): float(novel[i, 0] / (novel[i, 1] + EPS))
                                        for i, c in enumerate(self.novel_ids) if novel[i, 2] > 0}}

    def state(self) -> Tensor:
        return self.stats.clone()

    def load_state(self, state: Tensor) -> GeneralizedMeter:
        """Replace the statistics by ``state`` summed over any leading copies (gathered from processes)."""
        self.stats = torch.as_tensor(state, dtype=torch.float64).cpu().reshape(-1, *self.stats.shape).sum(0)
        return self


def region_map_recall(maps: Tensor | np.ndarray, targets: Tensor | np.ndarray,
                      thresholds: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                      ignore_index: int = 255, invert: bool = False) -> dict[float, float]:
    """Share of foreground pixels a region map covers at each threshold (the paper's Table 7 analysis).

    Args:
        maps: float ``[N, h, w]`` in [0, 1] (a prior or guided region map, at the target's resolution).
        targets: int ``[N, h, w]`` in {0, 1, ``ignore_index``}.
        thresholds: a pixel counts as covered when ``map >= t`` (``1 - map >= t`` with ``invert``, for the
            prior map, which the paper reports low on objects).

    Returns:
        ``{t: sum(covered & foreground) / sum(foreground)}`` over all N maps (0.0 without foreground).
    """
    maps, targets = torch.as_tensor(maps, dtype=torch.float64), torch.as_tensor(targets)
    if maps.shape != targets.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and targets {tuple(targets.shape)} differ in shape")
    if invert:
        maps = 1 - maps
    fg = (targets == 1) & (targets != ignore_index)
    total = int(fg.sum())
    return {float(t): (int((fg & (maps >= t)).sum()) / total if total else 0.0) for t in thresholds}
