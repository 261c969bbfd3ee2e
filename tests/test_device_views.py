"""Stage-1 views on the device (data.augment_on=device): same distribution, same alignment, no host syncs.

The worker path is lightly's MoCoV2Transform / JointViewTransform (torchvision's samplers); the device path
draws its parameters in :mod:`pretrain.view_params` and applies them with :mod:`common.batch_augment`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image
from scipy.ndimage import maximum_filter, minimum_filter
from scipy.stats import ks_2samp
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from common.batch_augment import JITTER_NEUTRAL, color_jitter, crop_resize, crop_resize_labels
from common.config import load_config
from pretrain.config import PretrainConfig
from pretrain.data import PretrainImages, collate_views, labels_to_canvas, prepare_images
from pretrain.device_views import DeviceViews, canvas_size, decode_to_canvas
from pretrain.engine import make_optimizer, make_queues, to_device, train_step, uses_channels_last
from pretrain.model import MoCoPrior
from pretrain.view_params import crop_params, photometric_params, sample_rng, view_params
from superpixels.transforms import PhotometricConfig

DRAWS = 4000


def palette(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 3)).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# same distribution


def test_crop_parameters_follow_torchvision_random_resized_crop():
    height, width, scale = 120, 200, (0.2, 1.0)
    rng = np.random.default_rng(0)
    ours = np.array([crop_params(rng, height, width, scale) for _ in range(DRAWS)], np.float64)
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    theirs = np.array([T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(DRAWS)],
                      np.float64)
    area = height * width
    for name, a, b in (("area", ours[:, 2] * ours[:, 3] / area, theirs[:, 2] * theirs[:, 3] / area),
                       ("aspect", ours[:, 3] / ours[:, 2], theirs[:, 3] / theirs[:, 2]),
                       ("top", ours[:, 0] / height, theirs[:, 0] / height),
                       ("left", ours[:, 1] / width, theirs[:, 1] / width)):
        assert ks_2samp(a, b).pvalue > 1e-3, name  # two samples of one distribution
    area = ours[:, 2] * ours[:, 3] / area
    assert 0.19 < area.min() < 0.22 and area.max() <= 1.0
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()


def test_colour_parameters_follow_torchvision_colour_jitter_and_the_probabilities():
    pm = PhotometricConfig()
    rng = np.random.default_rng(1)
    draws = [photometric_params(rng, pm) for _ in range(DRAWS)]
    jitter = np.stack([d["jitter"] for d in draws])
    applied = ~np.all(jitter == np.array(JITTER_NEUTRAL, np.float32), axis=1)
    torch.manual_seed(1)
    theirs = np.array([[f for f in T.ColorJitter.get_params([0.6, 1.4], [0.6, 1.4], [0.6, 1.4], [-0.1, 0.1])[1:]]
                       for _ in range(DRAWS)], np.float64)
    for i in range(4):
        assert ks_2samp(jitter[applied, i], theirs[:, i]).pvalue > 1e-3, i
    orders = np.stack([d["order"] for d in draws])
    assert (np.sort(orders, axis=1) == np.arange(4)).all()  # permutations,
    assert abs((orders[:, 0] == 3).mean() - 0.25) < 0.03  # uniform over the steps
    se = np.sqrt(0.25 / DRAWS)  # binomial standard error, at most
    for share, p in ((applied.mean(), pm.jitter_prob), (np.mean([d["gray"] for d in draws]), pm.grayscale_prob),
                     (np.mean([d["sigma"] > 0 for d in draws]), pm.blur_prob)):
        assert abs(share - p) < 4 * se
    sigma = np.array([d["sigma"] for d in draws])
    sigma = sigma[sigma > 0]
    assert 0.1 <= sigma.min() < 0.12 and 1.98 < sigma.max() <= 2.0
    flips = [view_params(rng, 50, 60, 0.2, 0.5, pm)["flip"] for _ in range(DRAWS)]
    assert abs(np.mean(flips) - 0.5) < 4 * se


def test_view_parameters_are_a_function_of_seed_epoch_index():
    pm = PhotometricConfig()
    a = view_params(sample_rng(0, 3, 17), 80, 90, 0.2, 0.5, pm)
    b = view_params(sample_rng(0, 3, 17), 80, 90, 0.2, 0.5, pm)
    c = view_params(sample_rng(0, 4, 17), 80, 90, 0.2, 0.5, pm)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["box"], c["box"])


# --------------------------------------------------------------------------------------------------
# the batched ops against torchvision's per-image ones


def test_colour_jitter_in_a_per_sample_order_matches_torchvision_step_by_step():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 12, 12)
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.05], [0.8, 1.3, 0.6, -0.08], list(JITTER_NEUTRAL)])
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
    steps = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    out = color_jitter(images, factors, order)
    for i in range(3):
        ref = images[i]
        for step in order[i].tolist():
            if factors[i, step] != JITTER_NEUTRAL[step]:
                ref = steps[step](ref, float(factors[i, step]))
        torch.testing.assert_close(out[i], ref, atol=2e-4, rtol=0)


def test_crop_resize_matches_torchvision_resized_crop_inside_the_box():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 50, 60)
    boxes = torch.tensor([[10.0, 5.0, 30.0, 35.0], [0.0, 10.0, 44.0, 50.0]])
    out = crop_resize(images, boxes, torch.tensor([0, 1]), 48)
    for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        ref = F.resized_crop(images[i], y1, x1, y2 - y1, x2 - x1, [48, 48], antialias=True)
        # roi_align reads the pixels just outside the box at the border, resized_crop clamps to the crop
        torch.testing.assert_close(out[i, :, 2:-2, 2:-2], ref[:, 2:-2, 2:-2], atol=1e-5, rtol=0)
    labels = torch.arange(50 * 60).view(1, 50, 60)
    ref = F.resize(labels[:, 5:35, 10:30], [48, 48], F.InterpolationMode.NEAREST_EXACT)
    assert torch.equal(crop_resize_labels(labels, boxes[:1], torch.tensor([0]), 48), ref)


# --------------------------------------------------------------------------------------------------
# same alignment: the label-map tests of superpixels/transforms.py, in device mode


def block_batch(side: int, block: int, canvas: int, flip: bool, seed: int) -> tuple[dict, np.ndarray]:
    labels = (np.arange(side)[:, None] // block) * (side // block) + np.arange(side)[None, :] // block
    colours = palette(int(labels.max()) + 1)
    rng = np.random.default_rng(seed)
    params = view_params(rng, side, side, 0.2, 1.0 if flip else 0.0, PhotometricConfig(), offset=(0, 0))
    batch = {"canvas": torch.from_numpy(np.pad(colours[labels], ((0, canvas - side), (0, canvas - side), (0, 0))))
             .permute(2, 0, 1)[None],
             "canvas_labels": torch.from_numpy(labels_to_canvas(labels, (side, side), canvas))[None]}
    neutral = {"jitter": np.array(JITTER_NEUTRAL, np.float32), "gray": np.array(False),
               "sigma": np.array(0.0, np.float32)}
    for v in "qk":
        batch.update({f"{v}_{k}": torch.from_numpy(np.asarray(x))[None] for k, x in {**params, **neutral}.items()})
    return batch, colours


@pytest.mark.parametrize("flip", [False, True])
def test_device_pooled_views_keep_ids_on_their_pixels(flip):
    cfg = load_config(PretrainConfig, None, ["loss.local_mode=pooled", "aug.global_size=48", "data.canvas_side=128"])
    views = DeviceViews(cfg, torch.device("cpu"))
    for seed in range(4):
        batch, colours = block_batch(96, 12, 128, flip, seed)
        out = views(batch)
        ids = out["labels_q"][0].numpy()
        assert set(np.unique(ids)) <= set(range(len(colours)))
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        rgb = (out["view_q"][0] * std[:, None, None] + mean[:, None, None]).permute(1, 2, 0).numpy() * 255
        interior = minimum_filter(ids, 3) == maximum_filter(ids, 3)
        assert interior.mean() > 0.3
        np.testing.assert_allclose(rgb[interior], colours[ids[interior]].astype(np.float32), atol=0.5)
        if flip:  # the flipped view is the unflipped one mirrored, labels included
            batch["q_flip"] = torch.tensor([False])
            assert torch.equal(views(batch)["labels_q"][0].flip(-1), out["labels_q"][0])


def test_canvas_size_shrinks_to_fit_and_never_enlarges():
    assert canvas_size(375, 500, 512) == (375, 500)
    assert canvas_size(480, 640, 512) == (384, 512)
    assert canvas_size(1000, 10, 100) == (100, 1)


def test_gpu_decode_path_matches_the_worker_canvas_on_the_cpu(tmp_path):
    yy, xx = np.mgrid[:90, :140]
    image = np.stack([xx * 2 % 256, yy * 3 % 256, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.jpg", quality=95)
    raw = torch.frombuffer(bytearray((tmp_path / "a.jpg").read_bytes()), dtype=torch.uint8)
    canvas = decode_to_canvas([raw, raw], 128, torch.device("cpu"))
    assert canvas.shape == (2, 3, 128, 128) and canvas.dtype == torch.uint8
    h, w = canvas_size(90, 140, 128)
    assert (canvas[:, :, h:] == 0).all() and (canvas[:, :, :, w:] == 0).all()
    reference = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB").resize((w, h), Image.Resampling.BILINEAR))
    diff = np.abs(canvas[0, :, :h, :w].permute(1, 2, 0).numpy().astype(float) - reference)
    assert diff.mean() < 2.0  # two JPEG decoders and two antialiased resizes, the same picture


def test_device_decode_refuses_non_jpeg_files_before_training(tmp_path):
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(tmp_path / "a.png")
    cfg = load_config(PretrainConfig, None, ["data.source=folder", f"data.root={tmp_path}", "loss.local_weight=0",
                                             "data.min_image_side=32", "data.decode_on=device"])
    with pytest.raises(Exception, match=r"a\.png: not a JPEG file.*decode_on=worker"):
        prepare_images(cfg, tmp_path, tmp_path / "cache", progress=False)


# --------------------------------------------------------------------------------------------------
# no host synchronisation inside a training step


class HostReads(TorchDispatchMode):
    """Counts the ATen ops that read a tensor's value to the host (item, bool(), nonzero, boolean masks, ...)."""

    READS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "is_nonzero", "equal")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name.lstrip("_") in {r.lstrip("_") for r in self.READS}:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def photos(root: Path, count: int = 4) -> None:
    for i in range(count):
        rng = np.random.default_rng(i)
        yy, xx = np.mgrid[:70, :90]
        img = np.stack([xx * 3 % 256, yy * 2 % 256, (xx * yy) % 256], -1).astype(np.uint8)
        img[:35] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(root / f"{i}.jpg", quality=95)


def tiny_run(root: Path, *extra: str) -> tuple[PretrainConfig, list[Path]]:
    """A tiny stage-1 config over four JPEGs in ``root``, and its prepared images."""
    photos(root)
    cfg = load_config(PretrainConfig, None, [
        "data.source=folder", f"data.root={root}", "data.min_image_side=32", "data.canvas_side=96",
        "superpixels.workers=0", "aug.global_size=32", "aug.local_size=32",
        "model.arch=resnet18", "model.head_hidden_dim=32", "model.out_dim=8", "model.split_bn_splits=2",
        "queue.global_size=64", "queue.local_size=64", "train.batch_size=4", *extra])
    return cfg, prepare_images(cfg, root, root / "cache", progress=False).good


@pytest.mark.parametrize("augment_on", ["worker", "device"])
@pytest.mark.parametrize("local", ["local_weight=0", "local_mode=patch", "local_mode=pooled"])
def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, local, augment_on):
    cfg, images = tiny_run(tmp_path, f"loss.{local}", "data.decode_on=device")
    dataset = PretrainImages(images, cfg, tmp_path / "cache", augment_on)
    accelerator = Accelerator(cpu=True)
    model = MoCoPrior(cfg)
    optimizer = make_optimizer(cfg, model, 0.01, accelerator.device)
    queues = make_queues(cfg, accelerator.device)
    views = DeviceViews(cfg, accelerator.device) if augment_on == "device" else None
    for step in range(2):  # the second step also writes across queue slots already filled
        batch = collate_views([dataset[i] for i in range(4)])
        with HostReads() as reads:
            batch = to_device(batch, accelerator.device, False)
            if views is not None:
                batch = to_device(views(batch), accelerator.device, False)
            scalars, loss = train_step(model, queues, batch, optimizer, accelerator, cfg)
        assert reads.seen == [], f"step {step} read {reads.seen} back to the host"
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in scalars.values())


# --------------------------------------------------------------------------------------------------
# compile, bf16, channels_last


def one_step_loss(cfg: PretrainConfig, images: list[Path], cache: Path, mixed_precision: str = "no",
                  compiled: bool = False, channels_last: bool = False) -> tuple[float, dict]:
    """The total loss of the first training step from a fixed seed, and the queues after it."""
    torch.manual_seed(0)
    AcceleratorState._reset_state(reset_partial_state=True)  # a new precision needs a new state
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    model = MoCoPrior(cfg)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compiled:
        model.query_encoder.compile()
        model.key_encoder.compile()
    optimizer = make_optimizer(cfg, model, 0.01, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    queues = make_queues(cfg, accelerator.device)
    batch = collate_views([PretrainImages(images, cfg, cache, "device")[i] for i in range(4)])
    batch = to_device(DeviceViews(cfg, accelerator.device)(batch), accelerator.device, channels_last)
    torch.manual_seed(1)  # the key shuffle
    _, loss = train_step(model, queues, batch, optimizer, accelerator, cfg)
    return float(loss), queues


@pytest.mark.slow
def test_compiled_encoders_give_the_eager_loss_on_a_cpu_step(tmp_path):
    cfg, images = tiny_run(tmp_path, "loss.local_mode=pooled")
    eager, _ = one_step_loss(cfg, images, tmp_path / "cache")
    compiled, _ = one_step_loss(cfg, images, tmp_path / "cache", compiled=True)
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-4)


def test_bf16_autocast_and_channels_last_train_with_float32_queues(tmp_path):

    # channels_last needs plain BatchNorm (several processes use shuffle BN; one uses lightly's split BN)
    cfg, images = tiny_run(tmp_path, "loss.local_mode=patch", "model.bn_mode=plain")
    eager, _ = one_step_loss(cfg, images, tmp_path / "cache")
    nhwc, _ = one_step_loss(cfg, images, tmp_path / "cache", channels_last=True)
    assert nhwc == pytest.approx(eager, rel=1e-4)  # a memory layout, not a different computation
    bf16, queues = one_step_loss(cfg, images, tmp_path / "cache", mixed_precision="bf16")
    assert bf16 == pytest.approx(eager, rel=0.05)  # bf16 keeps 8 bits of mantissa
    assert all(q.keys.dtype == torch.float32 for q in queues.values())
    AcceleratorState._reset_state(reset_partial_state=True)
    split, _ = tiny_run(tmp_path, "train.memory_format=channels_last")
    with pytest.raises(ValueError, match="channels_last cannot run with split BatchNorm"):
        uses_channels_last(split, torch.device("cpu"), "split")
    assert not uses_channels_last(cfg, torch.device("cuda"), "split") and uses_channels_last(cfg, torch.device("cuda"),
                                                                                             "shuffle")
