"""Stage-2 training augmentation on the device (``data.augment_on=device``): masks bit-identical to the worker
path, images close to it, parameters a pure function of (seed, epoch, episode, slot), batching that does not
leak between samples, the config key, and a real training run that resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_device_views import HostReads
from test_methods import tiny

from common.config import ConfigError, load_config
from fewshot.data.device_augment import DEVICE_KEYS, DeviceAugment
from fewshot.data.episodes import make_episodes
from fewshot.data.fss import Fss1000
from fewshot.data.loader import EpisodeDataset, collate, collate_device_images
from fewshot.data.synthetic import class_specs, draw_image
from fewshot.data.transforms import STD, DeviceTrainTransform, TrainTransform
from fewshot.evaluate import episode_loader
from finetune.config import FinetuneConfig

SPECS = class_specs(12, 0)


def textured(i: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic photo-like image (textures, sharp object edges, pixel noise) and its 0/1 mask."""
    image, mask = draw_image(SPECS, i % 12, np.random.default_rng(i), max(height, width))
    return np.ascontiguousarray(image[:height, :width]), np.ascontiguousarray(mask[:height, :width])


def smooth(i: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A band-limited image (periods of 130-190 px): resampling it once or twice gives nearly the same values."""
    yy, xx = np.mgrid[:height, :width].astype(np.float64)
    phase = i * 0.7
    image = np.stack([128 + 100 * np.sin(xx / 30.0 + phase), 128 + 100 * np.cos(yy / 21.0 - phase),
                      100 + 50 * np.sin((xx + yy) / 25.0)], -1).round().astype(np.uint8)
    return image, textured(i, height, width)[1]


def draws_of(seed: int, count: int) -> list[tuple[int, int, dict]]:
    """``count`` (height, width, transform keywords) covering pad-and-crop, plain crops, long_side, no rotation."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        kw: dict = {"scale": (0.6, 1.5)}
        if i % 5 == 1:
            kw["long_side"] = 80
        if i % 7 == 3:
            kw["rotate"] = (0.0, 0.0)
        cases.append((int(rng.integers(40, 180)), int(rng.integers(40, 180)), kw))
    return cases


def device_image(params: dict, size: int) -> torch.Tensor:
    return DeviceAugment(size).images(*collate_device_images([[params]]).values())[0]


def interior(params: dict, draws, height: int, width: int, size: int, margin: float = 3.0) -> torch.Tensor:
    """``[S, S]`` bool: output pixels whose source point is ``margin`` px inside the image and whose 5x5 blur
    window stays inside the crop and the resized frame (where the two paths may differ by construction)."""
    u = torch.arange(size, dtype=torch.float64) + 0.5
    a = params["matrix"].double()
    x = a[0, 0] * u[None, :] + a[0, 1] * u[:, None] + a[0, 2]
    y = a[1, 0] * u[None, :] + a[1, 1] * u[:, None] + a[1, 2]
    keep = (x > margin) & (x < width - margin) & (y > margin) & (y < height - margin)
    x1, y1, x2, y2 = draws.frame()
    inside_x = (u > max(x1, 0) + margin) & (u < min(x2, size) - margin)
    inside_y = (u > max(y1, 0) + margin) & (u < min(y2, size) - margin)
    return keep & inside_y[:, None] & inside_x[None, :]


def test_masks_are_bit_identical_between_modes(one_thread):
    size = 65
    for i, (h, w, kw) in enumerate(draws_of(0, 60)):
        image, mask = textured(i, h, w)
        if not (mask == 1).any():
            continue
        _, worker_mask = TrainTransform(size, **kw)(image, mask, np.random.default_rng([7, i]))
        params, device_mask = DeviceTrainTransform(size, **kw)(image, mask, np.random.default_rng([7, i]))
        assert device_mask.dtype == torch.int64 and torch.equal(worker_mask, device_mask), i
        assert params["source"].dtype == torch.uint8 and params["source"].shape == (3, h, w)
        assert params["matrix"].shape == (2, 3) and params["blur"].dtype == torch.bool


def test_device_images_match_the_worker_images_away_from_borders(one_thread):
    """Measured on this case list (0-255 scale, mean over channels, pixels away from every border, see
    :func:`interior`): unrotated crops agree to float rounding (max 0.002: one bilinear resample in both paths);
    rotated ones are resampled once here and twice (resize, then rotate) in the worker path: band-limited images
    per-crop mean 0.03-0.13 (max pixel 4.3 after a long-side shrink), noisy textured ones mean 1.2 on average,
    4.3 at most, single pixels up to ~55 at sharp object edges, where a second bilinear pass smooths more.
    Whole crops, borders included, differ by 0.2-1.3 on average. Tolerances: 0.01 unrotated; band-limited
    mean 0.3, pixel 8; textured mean 6 per crop and 2.5 on average."""
    size = 97
    std = torch.tensor(STD).view(3, 1, 1)
    rotated_textured = []
    for kind in (smooth, textured):
        for i, (h, w, kw) in enumerate(draws_of(1, 30)):
            image, mask = kind(i, h, w)
            if not (mask == 1).any():
                continue
            worker, _ = TrainTransform(size, **kw)(image, mask, np.random.default_rng([3, i]))
            params, _ = DeviceTrainTransform(size, **kw)(image, mask, np.random.default_rng([3, i]))
            draws, _ = TrainTransform(size, **kw).draw(torch.from_numpy(mask)[None], np.random.default_rng([3, i]))
            diff = ((device_image(params, size) - worker) * std).abs().mean(0)  # [S, S], 0-255 scale
            keep = interior(params, draws, h, w, size)
            assert keep.sum() > 400, "every crop of the case list keeps some pixels away from the borders"
            if draws.angle is None:
                assert diff[keep].max() < 0.01, (kind.__name__, i)
            elif kind is smooth:
                assert diff[keep].mean() < 0.3 and diff[keep].max() < 8.0, (i, diff[keep].mean(), diff[keep].max())
            else:
                rotated_textured.append(diff[keep].mean().item())
                assert rotated_textured[-1] < 6.0, i
    assert len(rotated_textured) >= 10 and np.mean(rotated_textured) < 2.5


def test_fill_outside_the_image_is_the_mean_and_batch_padding_never_leaks(one_thread):
    """A small image padded into a batch with a large one: its pad is the ImageNet mean (normalised ~0), and
    its result does not depend on the other images of the batch."""
    size = 65
    small, small_mask = textured(1, 30, 44)
    large, large_mask = textured(2, 170, 120)
    tf = DeviceTrainTransform(size, scale=(1.0, 1.0), rotate=(0.0, 0.0))
    p_small, _ = tf(small, small_mask, np.random.default_rng(0))
    p_large, _ = tf(large, large_mask, np.random.default_rng(1))
    batch = collate_device_images([[p_large, p_small], [p_small, p_large]])
    assert batch["device_sources"].shape == (4, 3, 170, 120)
    assert batch["device_sizes"].tolist() == [[170, 120], [30, 44], [30, 44], [170, 120]]
    together = DeviceAugment(size).images(*(batch[k] for k in DEVICE_KEYS))
    alone = device_image(p_small, size)
    assert torch.allclose(together[1], alone, atol=1e-4) and torch.allclose(together[2], alone, atol=1e-4)
    assert torch.allclose(together[0], device_image(p_large, size), atol=1e-4)
    # the 30 x 44 image is centred in the 65 x 65 crop: the rows above it are pad = the mean -> 0 after normalise
    assert alone[:, :10].abs().max() < 1e-4 and alone[:, :, :8].abs().max() < 1e-4


def write_tree(root: Path) -> Path:
    """An FSS-1000-layout folder of 3 classes x 4 textured images of different, non-square sizes."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("ant", "bird", "cup")):
        for n in range(1, 5):
            h, w = (int(v) for v in rng.integers(50, 110, 2))
            image, mask = textured(12 * c + n, h, w)
            mask[h // 4:h // 2, w // 4:w // 2] = 1  # foreground whatever the drawing
            (root / "FSS-1000" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / "FSS-1000" / name / f"{n}.jpg", quality=92)
            Image.fromarray(mask * 255).save(root / "FSS-1000" / name / f"{n}.png")
    return root


def test_parameters_are_a_pure_function_and_do_not_depend_on_workers(tmp_path, one_thread):
    bench = Fss1000(write_tree(tmp_path), "all")
    episodes = make_episodes(bench, 2, 6, seed=3)
    tf = DeviceTrainTransform(33, scale=(0.8, 1.2))
    dataset = EpisodeDataset(bench, episodes, tf, shot=2, seed=9, epoch=4)
    again = EpisodeDataset(bench, episodes, DeviceTrainTransform(33, scale=(0.8, 1.2)), shot=2, seed=9, epoch=4)
    for index in (0, 3, 5):
        a, b = dataset[index], again[index]
        for slot in range(3):  # query, then each support: the generator of (seed, epoch, index, slot)
            for key in ("source", "matrix", "frame", "blur"):
                assert torch.equal(a["device_images"][slot][key], b["device_images"][slot][key])
            image, mask, _ = dataset.read([episodes[index].query, *episodes[index].supports][slot],
                                          episodes[index].class_id, "query" if slot == 0 else "support")
            expected, _ = tf(image, mask, np.random.default_rng([9, 4, index, slot]))
            assert torch.equal(expected["matrix"], a["device_images"][slot]["matrix"])
    serial, parallel = list(episode_loader(dataset, 3, 0)), list(episode_loader(dataset, 3, 2))
    assert len(serial) == len(parallel) == 2
    for a, b in zip(serial, parallel):
        assert "query" not in a and a["device_sources"].shape[:2] == (9, 3)
        for name in (*DEVICE_KEYS, "query_mask", "support_masks", "class_id"):
            assert torch.equal(a[name], b[name]), name
    out = DeviceAugment(33)({k: v for k, v in serial[0].items()})
    assert out["query"].shape == (3, 3, 33, 33) and out["supports"].shape == (3, 2, 3, 33, 33)
    assert not any(k in out for k in DEVICE_KEYS)
    other_epoch = EpisodeDataset(bench, episodes, tf, shot=2, seed=9, epoch=5)
    assert not torch.equal(dataset[0]["device_images"][0]["matrix"], other_epoch[0]["device_images"][0]["matrix"])
    # the collated batch is the worker path's layout once finished: supports episode by episode
    worker = collate([EpisodeDataset(bench, episodes, TrainTransform(33, scale=(0.8, 1.2)), shot=2, seed=9,
                                     epoch=4)[i] for i in range(3)])
    assert torch.equal(worker["support_masks"], serial[0]["support_masks"])
    err = (out["supports"] - worker["supports"]).abs().mean() * 58  # ~std on the 0-255 scale
    assert err < 8.0, err


def test_the_device_side_reads_nothing_back_to_the_host(tmp_path, one_thread):
    bench = Fss1000(write_tree(tmp_path), "all")
    dataset = EpisodeDataset(bench, make_episodes(bench, 2, 4, seed=1), DeviceTrainTransform(33), shot=2, seed=0)
    batch = collate([dataset[i] for i in range(4)])
    assert batch["device_blur"].any() and not batch["device_blur"].all()  # both branches of the blur are taken
    with HostReads() as reads:
        out = DeviceAugment(33)(batch)
    assert reads.seen == [] and torch.isfinite(out["supports"]).all()


def test_augment_on_is_a_checked_config_key():
    assert load_config(FinetuneConfig, None, []).data.augment_on == "auto"
    assert load_config(FinetuneConfig, None, ["data.augment_on=device"]).data.augment_on == "device"
    with pytest.raises(ConfigError, match="data.augment_on"):
        load_config(FinetuneConfig, None, ["data.augment_on=gpu"])


def test_device_mode_trains_and_resumes_exactly(tmp_path, one_thread):
    from common.checkpoint import CheckpointError
    from finetune.run import main as run_main

    args = [*tiny(tmp_path / "data", tmp_path), "model.method=pfenet", "data.augment_on=device", "data.scale=[0.5,1.5]",
            "train.trackers=[]", "train.deterministic=true", "train.checkpoint_every=2", "train.keep_last=0",
            "train.max_steps=4", "train.val_every=0", "train.episodes_per_epoch=4", "eval.episodes=2",
            "eval.vis_episodes=0"]
    run_main(args)
    run = tmp_path / "run"
    state = json.loads((run / "checkpoints" / "step_0000004" / "train_state.json").read_text())
    assert state["augment_on"] == "device" and state["step"] == 4
    first = load_file(str(run / "last_model.safetensors"))
    halfway = load_file(str(run / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert any(not torch.equal(first[k], halfway[k]) for k in halfway)  # steps 3-4 changed something
    run_main([*args, "--resume", str(run / "checkpoints" / "step_0000002")])
    again = load_file(str(run / "last_model.safetensors"))
    assert first.keys() == again.keys()
    for key in first:
        assert torch.equal(first[key], again[key]), f"{key} differs after resume"
    # the worker path's images differ, so a resume across modes is refused, naming the key
    with pytest.raises(CheckpointError, match="augment_on"):
        run_main([*args, "data.augment_on=worker", "--resume",
                  str(run / "checkpoints" / "step_0000002")])
