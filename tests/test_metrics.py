"""fewshot.metrics against hand-computed numbers: class-accumulated IoU, FB-IoU, ignore pixels, merging."""

from __future__ import annotations

import pytest
import torch

from fewshot.metrics import SegmentationMeter, region_map_recall

TARGET = torch.tensor([[1, 1, 0, 0],
                       [1, 1, 0, 0],
                       [0, 0, 255, 0],
                       [0, 0, 0, 0]])
PRED = torch.tensor([[1, 0, 0, 0],
                     [1, 1, 1, 0],
                     [0, 0, 1, 0],  # the 1 at (2, 2) sits on an ignored pixel and must not count
                     [0, 0, 0, 1]])


def square(n: int, side: int = 10) -> torch.Tensor:
    """``side x side`` zeros with an ``n``-pixel run of ones in row-major order."""
    out = torch.zeros(side * side, dtype=torch.long)
    out[:n] = 1
    return out.view(side, side)


def test_iou_and_fbiou_by_hand_with_ignore():
    meter = SegmentationMeter([1])
    # 15 valid pixels. fg: pred 5, target 4, both 3 -> IoU 3/6. bg: pred 10, target 11, both 9 -> IoU 9/12.
    assert meter.update(PRED, TARGET, 1) == pytest.approx(0.5)
    assert meter.miou() == pytest.approx(0.5)
    assert meter.fbiou() == pytest.approx((0.5 + 0.75) / 2)
    assert meter.per_class_iou() == {1: pytest.approx(0.5)}
    assert meter.episodes() == 1


def test_class_accumulation_differs_from_per_episode_mean():
    meter = SegmentationMeter([1, 2])
    target_small, pred_small = square(2), square(1)        # inter 1, union 2  -> 0.5
    target_big, pred_big = square(10), square(9)           # inter 9, union 10 -> 0.9
    ious = [meter.update(pred_small, target_small, 1), meter.update(pred_big, target_big, 1)]
    meter.update(square(4), square(4), 2)                  # class 2: perfect
    assert ious == [pytest.approx(0.5), pytest.approx(0.9)]
    per_class = meter.per_class_iou()
    assert per_class[1] == pytest.approx(10 / 12)          # accumulated, not (0.5 + 0.9) / 2 = 0.7
    assert per_class[1] != pytest.approx(sum(ious) / 2)
    assert meter.miou() == pytest.approx((10 / 12 + 1.0) / 2)
    summary = meter.summary()
    assert summary["episodes_per_class"] == {"1": 2, "2": 1} and summary["episodes"] == 3


def test_classes_without_episodes_are_left_out_of_miou():
    meter = SegmentationMeter([1, 2, 3])
    meter.update(square(4), square(4), 3)
    assert meter.per_class_iou() == {3: pytest.approx(1.0)}
    assert meter.miou() == pytest.approx(1.0)


def test_merge_and_gathered_state_equal_a_single_meter():
    episodes = [(square(n), square(m), c) for n, m, c in [(3, 5, 1), (7, 7, 2), (0, 4, 1), (9, 2, 2), (5, 6, 1)]]
    single, parts = SegmentationMeter([1, 2]), [SegmentationMeter([1, 2]) for _ in range(2)]
    for i, (pred, target, c) in enumerate(episodes):
        single.update(pred, target, c)
        parts[i % 2].update(pred, target, c)
    merged = SegmentationMeter([1, 2]).merge(parts[0]).merge(parts[1])
    assert merged.summary() == single.summary()
    gathered = torch.cat([p.state() for p in parts])  # what accelerator.gather returns: [P * (C + 1), 3]
    assert SegmentationMeter([1, 2]).load_state(gathered).summary() == single.summary()
    with pytest.raises(ValueError):
        single.merge(SegmentationMeter([1, 3]))


def test_update_rejects_bad_input():
    meter = SegmentationMeter([1])
    with pytest.raises(ValueError, match="shape"):
        meter.update(torch.zeros(2, 2), torch.zeros(3, 3), 1)
    with pytest.raises(ValueError, match="class 5"):
        meter.update(torch.zeros(2, 2), torch.zeros(2, 2), 5)


def test_region_map_recall_on_a_hand_made_map():
    maps = torch.tensor([[[0.95, 0.55, 0.0], [0.35, 0.15, 0.9]]])
    target = torch.tensor([[[1, 1, 0], [1, 255, 1]]])  # foreground: 0.95, 0.55, 0.35 and 0.9; 0.15 is ignored
    recall = region_map_recall(maps, target, thresholds=(0.1, 0.5, 0.6, 0.92, 0.99))
    assert recall == {0.1: 1.0, 0.5: 0.75, 0.6: 0.5, 0.92: 0.25, 0.99: 0.0}
    inverted = region_map_recall(maps, target, thresholds=(0.6,), invert=True)  # 1 - map >= .6 covers 0.35 only
    assert inverted == {0.6: 0.25}
    assert region_map_recall(maps, torch.zeros_like(target), thresholds=(0.5,)) == {0.5: 0.0}


def test_generalized_fss_meter_by_hand():
    from fewshot.metrics import GeneralizedMeter

    meter = GeneralizedMeter(base_channels=2, novel_ids=[7, 8])
    # episode 1 (novel 7): target row-major [0, 1, 1, 3 | 2, 2, 255, 3], 3 = the novel class
    target = torch.tensor([[0, 1, 1, 3], [2, 2, 255, 3]])
    pred = torch.tensor([[1, 1, 0, 3], [2, 0, 3, 0]])
    meter.update(pred, target, 7)
    # base 1: I 1, U 3; base 2: I 1, U 2; novel 7: I 1 (the 255 pixel does not count), U 2
    meter.update(torch.tensor([[2, 0]]), torch.tensor([[2, 3]]), 8)   # base 2: +I 1 +U 1; novel 8: I 0, U 1
    assert meter.miou_base() == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert meter.miou_novel() == pytest.approx((1 / 2 + 0.0) / 2)
    b, n = 0.5, 0.25
    assert meter.miou_hm() == pytest.approx(2 * b * n / (b + n))
    assert meter.summary()["episodes"] == 2
    twice = GeneralizedMeter(2, [7, 8]).load_state(torch.stack([meter.state(), meter.state()]))
    assert twice.miou_base() == pytest.approx(meter.miou_base())  # doubled counts, same ratios
