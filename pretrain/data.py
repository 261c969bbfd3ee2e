"""Unlabelled images for stage 1: finding them, checking them, and turning one into its training views.

Every sample is made from a generator seeded by (seed, epoch, index) alone, so a batch is the same whatever
the number of workers and a resumed run sees exactly the batches an uninterrupted run would. Superpixels
are never computed here: they are read from the on-disk cache that :func:`prepare_images` fills first.

With ``data.augment_on=worker`` a sample is its finished views (PIL, lightly, torchvision); with ``device`` it
is the image on a fixed canvas (or its JPEG bytes) plus every view's parameters, and
:class:`pretrain.device_views.DeviceViews` cuts and colours the views of the whole batch on the accelerator.
"""

from __future__ import annotations

import io
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from lightly.transforms import MoCoV2Transform
from PIL import Image
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

from common.errors import DataError
from common.images import image_size, list_images, read_rgb
from common.io import atomic_path
from fewshot.data.pascal import PASCAL_TRAIN_LIST
from pretrain.config import AugConfig, PretrainConfig
from pretrain.device_views import canvas_size
from pretrain.view_params import sample_rng, view_params
from superpixels.cache import SuperpixelCache, precompute
from superpixels.segment import segment_ids_for_sampling
from superpixels.transforms import JointViewTransform, sample_segment_crop, segment_box
from superpixels.vis import save_boundary_grid

REPO_ROOT = Path(__file__).resolve().parents[1]
# scikit-image ships these photos inside its wheel, so the default run needs no download. Pure textures
# (grass, gravel, brick) are left out: SLIC finds a single superpixel on them.
BUILTIN_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
                  "colorwheel", "logo", "coins", "camera", "moon", "clock", "text", "page", "cell", "microaneurysms",
                  "stereo_motorcycle:0", "stereo_motorcycle:1")

# kept as a name of stage 1: bad images are the project's DataError (common.errors)
ImageError = DataError


# --------------------------------------------------------------------------------------------------
# finding and checking images


def source_images(cfg: PretrainConfig, out_dir: Path) -> list[Path]:
    """The image files of ``cfg.data`` in a stable (sorted) order; a missing folder or list is an error."""
    data = cfg.data
    if data.source == "builtin":
        return materialise_builtin(Path(data.builtin_dir) if data.builtin_dir else out_dir / "builtin_images")
    root = Path(data.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} does not exist or is not a folder")
    if data.source == "folder" and data.list_file:  # e.g. the training images of stage 2's sources
        list_file = Path(data.list_file)
        if not list_file.is_file():
            raise FileNotFoundError(f"data.list_file {list_file} not found")
        paths = [root / line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"data.list_file {list_file}: {len(missing)} listed image(s) missing, first "
                                    f"{missing[0]}")
    elif data.source == "folder":
        paths = list_images(root)
    elif data.source == "voc":
        list_file = Path(data.list_file) if data.list_file else PASCAL_TRAIN_LIST  # train images only
        if not list_file.is_file():
            raise FileNotFoundError(f"data.list_file {list_file} not found")
        ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        # PFENet lists hold "JPEGImages/<id>.jpg SegmentationClassAug/<id>.png" pairs; plain id lists work too
        paths = [root / "JPEGImages" / (Path(i).stem + ".jpg") for i in ids]
    else:  # coco
        folder = next((root / name for name in ("train2014", "train2017") if (root / name).is_dir()), None)
        if folder is None:
            raise FileNotFoundError(f"{root} has neither train2014/ nor train2017/")
        paths = sorted(folder.glob("*.jpg"))
    if not paths:
        raise FileNotFoundError(f"no images found for data.source={data.source!r} under {root}")
    return paths


def materialise_builtin(folder: Path, max_side: int = 512) -> list[Path]:
    """Write scikit-image's bundled sample photos as PNGs (RGB, long side <= ``max_side``) once."""
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in BUILTIN_IMAGES:
        path = folder / f"{name.replace(':', '_')}.png"
        if not path.is_file():
            loader, _, part = name.partition(":")
            data = getattr(skimage.data, loader)()
            image = Image.fromarray(np.asarray(data[int(part)] if part else data)).convert("RGB")
            image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            with atomic_path(path) as tmp:
                image.save(tmp)
        paths.append(path)
    return paths


def check_image(path: str | Path, min_side: int) -> str | None:
    """Fully decode one image; return why it is unusable, or None."""
    try:
        w, h = image_size(path)
    except DataError as err:
        return str(err).removeprefix(f"{path}: ")
    if min(w, h) < min_side:
        return f"image is {w}x{h}, smaller than data.min_image_side={min_side}"
    return None


@dataclass
class ScanReport:
    good: list[Path]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _check_star(args: tuple[str, int]) -> str | None:
    return check_image(*args)


def scan_images(paths: list[Path], min_side: int, on_bad: str, workers: int, progress: bool = True) -> ScanReport:
    """Decode every image once (in parallel) so bad files surface before training, never inside a worker."""
    jobs = [(str(p), min_side) for p in paths]
    if workers > 1 and len(jobs) > 64:
        with get_context("spawn").Pool(workers) as pool:
            reasons = list(tqdm(pool.imap(_check_star, jobs, chunksize=16), total=len(jobs),
                                desc="checking images", disable=not progress))
    else:
        reasons = [_check_star(j) for j in tqdm(jobs, desc="checking images", disable=not progress)]
    report = ScanReport(good=[p for p, r in zip(paths, reasons) if r is None],
                        bad=[(str(p), r) for p, r in zip(paths, reasons) if r is not None])
    if report.bad and on_bad == "error":
        path, reason = report.bad[0]
        more = f" (and {len(report.bad) - 1} more)" if len(report.bad) > 1 else ""
        raise ImageError(f"{path}: {reason}{more}; set data.on_bad_image=skip to leave such files out")
    return report


def prepare_images(cfg: PretrainConfig, out_dir: Path, cache_dir: Path, progress: bool = True) -> ScanReport:
    """List, check and (when the local loss is on) superpixel-cache every image. Run on the main process only."""
    report = scan_images(source_images(cfg, out_dir), cfg.data.min_image_side, cfg.data.on_bad_image,
                         cfg.data.num_workers, progress)
    if cfg.uses_local:
        sp = precompute([str(p) for p in report.good], cfg.superpixels, str(cache_dir),
                        workers=max(cfg.superpixels.workers, 1), on_bad_image=cfg.data.on_bad_image,
                        progress=progress)
        report.bad += sorted(sp.bad.items())
        report.good = [p for p in report.good if str(p) not in sp.bad]
    if not report.good:
        raise ImageError(f"no usable image left out of {len(report.good) + len(report.bad)}")
    if cfg.data.decode_on == "device":  # nvJPEG decodes JPEG only: say so now, not inside a worker
        others = [p for p in report.good if not is_jpeg(p)]
        if others:
            more = f" (and {len(others) - 1} more)" if len(others) > 1 else ""
            raise ImageError(f"{others[0]}: not a JPEG file{more}; data.decode_on=device decodes JPEG only, "
                             "use data.decode_on=worker")
    return report


def is_jpeg(path: str | Path) -> bool:
    """Whether the file starts with the JPEG SOI marker."""
    with open(path, "rb") as handle:
        return handle.read(2) == b"\xff\xd8"


def save_superpixel_grid(paths: list[Path], cfg: PretrainConfig, cache_dir: Path, out: Path,
                         max_side: int = 256) -> Path:
    """A PNG of the images with their cached superpixel boundaries (long side ``max_side``), for a person to check."""
    cache = SuperpixelCache(str(cache_dir), cfg.superpixels)
    images, labels = [], []
    for path in paths:
        raw = Path(path).read_bytes()
        image, label = Image.fromarray(read_rgb(raw, path)), Image.fromarray(cache.labels_for(raw).astype(np.int32))
        scale = max_side / max(image.size)
        if scale < 1:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image, label = image.resize(size, Image.Resampling.BILINEAR), label.resize(size, Image.Resampling.NEAREST)
        images.append(np.asarray(image))
        labels.append(np.asarray(label))
    return save_boundary_grid(images, labels, out)


# --------------------------------------------------------------------------------------------------
# views


def moco_v2_views(aug: AugConfig, size: int) -> MoCoV2Transform:
    """lightly's MoCo-v2 two-view transform with the config's values (its defaults are MoCo-v2's)."""
    pm = aug.photometric
    return MoCoV2Transform(input_size=size, cj_prob=pm.jitter_prob, cj_strength=1.0, cj_bright=pm.brightness,
                           cj_contrast=pm.contrast, cj_sat=pm.saturation, cj_hue=pm.hue, min_scale=aug.min_scale,
                           random_gray_scale=pm.grayscale_prob, gaussian_blur=pm.blur_prob,
                           sigmas=tuple(pm.blur_sigma), hf_prob=aug.hflip_prob)


@contextmanager
def seeded(seed_words: tuple[int, ...]) -> Iterator[None]:
    """Seed torch, numpy and python RNGs from ``seed_words`` inside the block, restoring them afterwards."""
    seed = int(np.random.SeedSequence(list(seed_words)).generate_state(1)[0])
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class PretrainImages(Dataset):
    """One item = the training views of one image, a dict of tensors.

    Keys, by configuration (B = batch after collation, S = aug.global_size, P = aug.local_size):
        ``view_q``, ``view_k``: ``[3, S, S]`` two MoCo-v2 views (when the global loss or pooled mode is on).
        ``labels_q``, ``labels_k``: ``[S, S]`` int64 superpixel ids aligned with the views (pooled mode).
        ``patch_q``, ``patch_k``: ``[3, P, P]`` two views of one superpixel's box crop (patch mode).

    In ``device`` mode (``augment_on="device"``, C = data.canvas_side) an item is instead:
        ``canvas``: ``[3, C, C]`` uint8, the image shrunk to fit (:func:`pretrain.device_views.canvas_size`) at the
        top left, zeros elsewhere; or ``jpeg``: ``[L]`` uint8 file bytes with ``data.decode_on=device``.
        ``canvas_labels``: ``[C, C]`` int16 superpixel ids on the same canvas (pooled mode).
        per view v in ``q_``, ``k_`` (global / pooled) and ``patch_q_``, ``patch_k_`` (patch): ``v + "box"`` ``[4]``
        (x1, y1, x2, y2) in canvas pixels, ``flip``, ``jitter [4]``, ``order [4]``, ``gray``, ``sigma``
        (:func:`pretrain.view_params.view_params`).
    Pooled mode adds ``region_count``: 1 + the largest superpixel id (:func:`collate_views` keeps the batch's
    largest as an int), so the model sizes its pooling without reading a device tensor.
    """

    def __init__(self, paths: list[Path], cfg: PretrainConfig, cache_dir: Path, augment_on: str = "worker") -> None:
        if augment_on not in ("worker", "device"):
            raise ValueError(f"augment_on must be worker or device (the engine resolves auto), got {augment_on!r}")
        self.augment_on, self.decode_on = augment_on, cfg.data.decode_on
        self.canvas_side = cfg.data.canvas_side
        self.aug = cfg.aug
        self.paths = [str(p) for p in paths]
        self.seed = cfg.train.seed
        self.epoch = 0
        self.mode = cfg.loss.local_mode if cfg.uses_local else "none"
        self.min_area_frac = cfg.superpixels.min_area_frac
        self.cache = SuperpixelCache(str(cache_dir), cfg.superpixels) if cfg.uses_local else None
        self.want_global = cfg.uses_global or self.mode == "pooled"
        self.global_views = moco_v2_views(cfg.aug, cfg.aug.global_size)
        self.patch_views = moco_v2_views(cfg.aug, cfg.aug.local_size)
        self.joint_view = JointViewTransform(size=cfg.aug.global_size, min_scale=cfg.aug.min_scale,
                                             hflip_prob=cfg.aug.hflip_prob, photometric=cfg.aug.photometric)

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch's iterator is made (workers copy the dataset then)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path = self.paths[index]
        raw = Path(path).read_bytes()
        if self.augment_on == "device":
            return self.device_sample(index, path, raw)
        image = Image.fromarray(read_rgb(raw, path))
        labels = self.labels(raw, path, (image.height, image.width))
        out: dict[str, torch.Tensor] = {}
        with seeded((self.seed, self.epoch, index)):
            if self.mode == "pooled":
                out["view_q"], out["labels_q"] = self.joint_view(image, labels)
                out["view_k"], out["labels_k"] = self.joint_view(image, labels)
                out["region_count"] = torch.tensor(int(labels.max()) + 1)
            elif self.want_global:
                out["view_q"], out["view_k"] = self.global_views(image)
            if self.mode == "patch":
                ids = segment_ids_for_sampling(labels, self.min_area_frac)
                rng = np.random.default_rng(np.random.randint(2**31))
                crop = sample_segment_crop(image, labels, ids, rng)
                out["patch_q"], out["patch_k"] = self.patch_views(crop)
        return out

    def labels(self, raw: bytes, path: str, size: tuple[int, int]) -> np.ndarray | None:
        """The cached superpixel map ``[H, W]`` of an image of ``size`` (H, W); None without the local loss."""
        if self.cache is None:
            return None
        labels = self.cache.load(self.cache.key_for(raw))
        if labels.shape != size:
            raise ImageError(f"{path}: cached superpixels are {labels.shape}, image is {size}; delete the cache "
                             "entry and re-run")
        return labels

    def device_sample(self, index: int, path: str, raw: bytes) -> dict[str, torch.Tensor]:
        """The canvas (or JPEG bytes) and every view's parameters; see the class docstring."""
        rng = sample_rng(self.seed, self.epoch, index)
        out: dict[str, torch.Tensor] = {}
        if self.decode_on == "device":
            with Image.open(io.BytesIO(raw)) as header:  # the size only: the pixels are decoded on the device
                width, height = header.size
            out["jpeg"] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            image = None
        else:
            image = read_rgb(raw, path)  # [H,W,3]
            height, width = image.shape[:2]
        ch, cw = canvas_size(height, width, self.canvas_side)
        if image is not None:
            out["canvas"] = torch.from_numpy(to_canvas(image, (ch, cw), self.canvas_side)).permute(2, 0, 1)
        labels = self.labels(raw, path, (height, width))
        to_canvas_box = np.array([cw / width, ch / height, cw / width, ch / height])
        aug, pm = self.aug, self.aug.photometric

        def add(prefix: str, params: dict[str, np.ndarray]) -> None:
            params["box"] = params["box"] * to_canvas_box
            out.update({prefix + k: torch.from_numpy(np.asarray(v)) for k, v in params.items()})

        if self.want_global:
            for prefix in ("q_", "k_"):
                add(prefix, view_params(rng, height, width, aug.min_scale, aug.hflip_prob, pm))
        if self.mode == "pooled":
            if labels.max() > np.iinfo(np.int16).max:
                raise ImageError(f"{path}: {int(labels.max()) + 1} superpixels, more than the 32,768 the canvas "
                                 "holds; lower superpixels.n_segments / raise fh_scale")
            out["canvas_labels"] = torch.from_numpy(labels_to_canvas(labels, (ch, cw), self.canvas_side))
            out["region_count"] = torch.tensor(int(labels.max()) + 1)
        if self.mode == "patch":
            ids = segment_ids_for_sampling(labels, self.min_area_frac)
            top, left, bottom, right = segment_box(labels, ids[rng.integers(len(ids))])
            for prefix in ("patch_q_", "patch_k_"):
                add(prefix, view_params(rng, bottom - top, right - left, aug.min_scale, aug.hflip_prob, pm,
                                        offset=(top, left)))
        return out


def to_canvas(image: np.ndarray, size: tuple[int, int], side: int) -> np.ndarray:
    """``image [H,W,3]`` uint8 resized (PIL bilinear, antialiased) to ``size`` (h, w) at the top left of a zero
    ``[side, side, 3]`` canvas."""
    if image.shape[:2] != size:
        image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))
    canvas = np.zeros((side, side, 3), np.uint8)
    canvas[:size[0], :size[1]] = image
    return canvas


def labels_to_canvas(labels: np.ndarray, size: tuple[int, int], side: int) -> np.ndarray:
    """``labels [H,W]`` resized by pixel-centre nearest to ``size`` (h, w) on a zero ``[side, side]`` int16 canvas."""
    height, width = labels.shape
    rows = ((np.arange(size[0]) + 0.5) * height / size[0]).astype(np.int64)
    cols = ((np.arange(size[1]) + 0.5) * width / size[1]).astype(np.int64)
    canvas = np.zeros((side, side), np.int16)
    canvas[:size[0], :size[1]] = labels[rows[:, None], cols[None, :]]
    return canvas


def collate_views(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """``default_collate``, except JPEG bytes (one length per file), which stay a list, and ``region_count``,
    which becomes the batch's largest, a Python int (the pooled branch's size, known without a device read)."""
    apart = ("jpeg", "region_count")
    batch = default_collate([{k: v for k, v in s.items() if k not in apart} for s in samples])
    if "jpeg" in samples[0]:
        batch["jpeg"] = [s["jpeg"] for s in samples]
    if "region_count" in samples[0]:
        batch["region_count"] = max(int(s["region_count"]) for s in samples)
    return batch
