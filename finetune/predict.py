"""Segment your own images with a trained (or training-free) few-shot method.

    python -m finetune.predict RUN_DIR_or_WEIGHTS --support IMG MASK [--support IMG MASK ...]
        --query IMG_or_FOLDER [--query ...] [--out DIR] [--size N] [--threshold T] [--mask-value V]
    python -m finetune.predict --config FILE model.method=prototype --support IMG MASK --query FOLDER

The method, its input size and the evaluation protocol come from the run's ``config.yaml`` (``--config`` and
``key.sub=value`` overrides as in ``python -m finetune.evaluate``; ``eval.protocol=hsnet`` squares the input).
A training-free method (``model.method=prototype``) needs no weights. Per query, ``--out`` receives
``<name>_mask.png`` (0/255, at the query's size), ``<name>_overlay.png`` and ``<name>_prob.png`` (the
foreground probability, 16-bit grey: value / 65535), plus one ``predictions.json`` (files, foreground shares,
the model with its sha256, the settings, timings). The supports are encoded once; queries go in batches.

Inputs are read the way the evaluation reads benchmark files (``common.images``: any mode, 16-bit scaled to 8
bits), and every file is checked before any work: an unreadable file, a support mask with no foreground, or a
mask whose size differs from its image is an error naming the file. Masks: any PNG, foreground = grey >= 128
(a mask with transparency: alpha >= 128, so cut-outs work); ``--mask-value V``: pixels equal to V of a
single-channel label map (255 = ignore). EXIF orientation: applied to every file, image and mask alike
(``--exif apply``, as viewers, browsers and the web page show them, so a mask drawn on the upright view fits);
outputs are upright. ``--exif stored`` uses pixels as stored, as ``python -m finetune.evaluate`` does. Files
without an orientation tag (all benchmark files) read the same either way.

Python API (numpy in, numpy out)::

    from finetune.predict import load_segmenter, read_image, read_mask
    segmenter = load_segmenter("runs/finetune/smoke_fss-mini_mnv2")
    support = (read_image("cat.jpg"), read_mask("cat.png"))
    prediction = segmenter.predict([read_image("query.jpg")], [support])[0]
    prediction.mask, prediction.probability      # uint8 0/1 and float32 [H,W] at the query's size
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor
from tqdm import tqdm

from common.cli import user_errors
from common.config import load_config
from common.errors import DataError, WeightsError
from common.images import (
    IMAGE_SUFFIXES,
    check_pixel_limit,
    exif_orientation,
    image_size,
    list_images,
    read_rgb,
    to_rgb8,
)
from common.io import atomic_path, write_json
from fewshot.data.base import IGNORE_INDEX, binary_mask
from fewshot.data.loader import single_thread
from fewshot.data.transforms import EvalTransform, check_size
from fewshot.segmenter import SegmenterOutput
from fewshot.vis import PRED, heatmap, overlay
from finetune.config import FinetuneConfig
from finetune.evaluate import load_weights, resolve_weights
from finetune.methods import FewShotMethod, build_method

MASK_THRESHOLD = 128  # grey (or alpha) >= 128 is foreground, as the FSS-layout benchmarks binarise
EXIF_MODES = ("apply", "stored")
_LABEL_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")

SupportPair = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------------------------------
# reading files: every failure is a DataError naming the file


def read_image(path: str | Path, exif: bool = True) -> np.ndarray:
    """An image file as uint8 RGB ``[H,W,3]`` (any mode; 16-bit scaled to 8 bits), upright when ``exif``.

    Raises:
        DataError: the file is missing, unreadable, truncated or too large, naming it.
    """
    path = Path(path)
    orientation = exif_orientation(path) if exif else 0
    if orientation <= 1:  # the project's one decoder, so predict reads exactly what the evaluation reads
        return read_rgb(path)
    with _open(path, "image") as im:
        return to_rgb8(ImageOps.exif_transpose(im))


def read_mask(path: str | Path, mask_value: int | None = None, exif: bool = True) -> np.ndarray:
    """A support mask file as uint8 ``[H,W]``: 1 = foreground, 0 = background, 255 = ignore.

    Without ``mask_value``: grey >= 128 is foreground (16-bit masks scaled to 8 bits first; a mask with
    transparency uses its alpha channel). With ``mask_value``: the pixels of a single-channel label map (L, P
    or 16-bit) equal to it, 255 = ignore. Upright when ``exif``, like :func:`read_image`.

    Raises:
        DataError: naming the file: unreadable, no foreground, or an RGB file given as a label map.
    """
    path = Path(path)
    if mask_value is not None and (mask_value < 0 or mask_value == IGNORE_INDEX):
        raise ValueError(f"--mask-value {mask_value}: must be >= 0 and not {IGNORE_INDEX} (the ignore label)")
    with _open(path, "mask") as im:
        if exif and exif_orientation(path) > 1:
            im = ImageOps.exif_transpose(im)
        if mask_value is None:
            grey = _mask_grey(im)
            mask = (grey >= MASK_THRESHOLD).astype(np.uint8)
            if not mask.any():
                top = int(grey.max()) if grey.size else 0
                hint = (f"its largest value is {top}: a 0/1 (class index) mask? pass --mask-value 1, or save it "
                        f"as 0/255" if top else "it is all background")
                raise DataError(f"{path}: support mask has no foreground (no pixel >= {MASK_THRESHOLD}); {hint}")
            return mask
        if im.mode not in _LABEL_MODES:
            raise DataError(f"{path}: --mask-value needs a single-channel label map (grey, palette or 16-bit "
                            f"PNG of class ids), but this file is {im.mode}")
        labels = np.asarray(im)
    mask = binary_mask(labels, mask_value)
    if not (mask == 1).any():
        present = np.unique(labels)
        raise DataError(f"{path}: support mask has no pixel equal to --mask-value {mask_value} (values present: "
                        f"{', '.join(map(str, present[:12].tolist()))}{' ...' if present.size > 12 else ''})")
    return mask


def _mask_grey(im: Image.Image) -> np.ndarray:
    """The grey levels a mask is binarised on: alpha when the file has transparency, else luminance."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = np.asarray(im.getchannel("A"))
        if (alpha < 255).any():  # a cut-out: what is opaque is the object
            return alpha
    if im.mode.startswith("I"):  # 16/32-bit grey: scaled to 8 bits like images (common.images.to_rgb8)
        return to_rgb8(im)[..., 0]
    return np.asarray(im.convert("L"))  # what the FSS-layout loaders binarise (read_label(grey=True))


class _open:
    """``with _open(path, what) as im``: PIL image, fully decoded, every failure a DataError naming the file."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what, self.image = path, what, None

    def __enter__(self) -> Image.Image:
        try:
            self.image = Image.open(self.path)
            check_pixel_limit(self.image.size, self.path)
            self.image.load()
        except FileNotFoundError as err:
            raise DataError(f"{self.path}: {self.what} file is missing") from err
        except DataError:
            raise
        except Exception as err:  # PIL raises many kinds; all mean the same thing to the user
            raise DataError(f"{self.path}: cannot read this {self.what} file ({type(err).__name__}: {err})") from err
        return self.image

    def __exit__(self, *exc: object) -> None:
        if self.image is not None:
            self.image.close()


def check_pair(image: np.ndarray, mask: np.ndarray, image_path: str | Path, mask_path: str | Path,
               exif: bool = True) -> None:
    """Raise DataError when a support image and its mask differ in size (after orientation)."""
    if image.shape[:2] == mask.shape[:2]:
        return
    notes = [f"{name} has EXIF orientation {o}" for name, o in
             (("the image", exif_orientation(image_path)), ("the mask", exif_orientation(mask_path))) if o > 1]
    note = ""
    if notes:
        note = (f"; {' and '.join(notes)}, {'applied' if exif else 'not applied (--exif stored)'}: "
                f"{'--exif stored uses the pixels as stored' if exif else 'drop --exif stored'} if the mask was "
                "drawn on the other view")
    raise DataError(f"{image_path}: support image is {image.shape[1]}x{image.shape[0]} but its mask {mask_path} "
                    f"is {mask.shape[1]}x{mask.shape[0]}{note}")


def list_queries(sources: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """``(file, name relative to what was given)`` for every query image: files as given, folders recursively.

    Raises:
        DataError: a path that does not exist, or a folder without images.
    """
    found: list[tuple[Path, Path]] = []
    for source in map(Path, sources):
        if source.is_dir():
            images = list_images(source)
            if not images:
                raise DataError(f"{source}: query folder holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found += [(p, p.relative_to(source)) for p in images]
        elif source.is_file():
            found.append((source, Path(source.name)))
        else:
            raise DataError(f"{source}: query image or folder does not exist")
    return found


def output_names(names: Sequence[Path]) -> list[str]:
    """Unique output stems (``a/1.jpg`` -> ``a/1``); ``1.jpg`` beside ``1.png`` keep their suffixes apart."""
    stems = [n.with_suffix("").as_posix() for n in names]
    taken: set[str] = set()
    out = []
    for name, stem in zip(names, stems):
        if stems.count(stem) > 1:
            stem = f"{stem}_{name.suffix.lstrip('.').lower()}"
        base, k = stem, 2
        while stem in taken:
            stem, k = f"{base}-{k}", k + 1
        taken.add(stem)
        out.append(stem)
    return out


# --------------------------------------------------------------------------------------------------
# the segmenter


@dataclass
class Prediction:
    """One query's answer at its own (original) size.

    Attributes:
        mask: uint8 ``[H,W]``, 1 = foreground (probability > threshold; at 0.5 exactly the evaluation's argmax).
        probability: float32 ``[H,W]`` foreground probability.
        maps: the method's named maps (``prior``, ``guided``, ``similarity``, ...), float32 ``[H,W]`` in [0, 1].
    """

    mask: np.ndarray
    probability: np.ndarray
    maps: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def foreground_share(self) -> float:
        """Fraction of the query's pixels predicted foreground."""
        return float(self.mask.mean()) if self.mask.size else 0.0


@dataclass
class SupportSet:
    """Supports prepared for a method: the transformed tensors and the method's encoding of them.

    Attributes:
        supports: ``[1,K,3,S,S]`` normalised images; masks: ``[1,K,S,S]`` in {0, 1, 255}.
        state: the method's ``encode_supports`` output (batch 1); shapes: ``[(H,W)]`` of the originals.
    """

    supports: Tensor
    masks: Tensor
    state: Any
    shapes: list[tuple[int, int]]


class Segmenter:
    """A few-shot method ready for arbitrary images: the evaluation's resize and protocol, supports encoded once.

    Args:
        method: a built method (weights loaded); it is set to eval mode and moved to ``device``.
        size: the input canvas S (8n+1); protocol: ``pfenet`` or ``hsnet`` (:class:`EvalTransform`).
        batch_size: queries per forward.
        info: what ``predictions.json`` records about the model.
    """

    def __init__(self, method: FewShotMethod, size: int, protocol: str = "pfenet", device: str = "cpu",
                 batch_size: int = 4, info: dict[str, Any] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.method = method.to(self.device).eval()
        self.transform = EvalTransform(check_size(size), protocol)
        self.size, self.protocol, self.batch_size = size, protocol, batch_size
        self.info = dict(info or {})

    @torch.no_grad()
    def encode(self, supports: Sequence[SupportPair], class_name: str | None = None) -> SupportSet:
        """Transform and encode ``[(image [H,W,3] uint8, mask [H,W]), ...]`` once for any number of queries.

        Masks: 1 (or True) = foreground, 0 = background, 255 = ignore (what :func:`read_mask` returns).
        ``class_name``: the supports' class, for a text-guided method (``model.text_guidance``); others ignore it.

        Raises:
            ValueError: no support, a malformed array, a size mismatch, or a mask without foreground.
        """
        if not supports:
            raise ValueError("at least one support (image, mask) is needed")
        images, masks, shapes = [], [], []
        for k, (image, mask) in enumerate(supports):
            image, mask = as_rgb8(image, f"support {k}"), as_episode_mask(mask, f"support {k}")
            if image.shape[:2] != mask.shape:
                raise ValueError(f"support {k}: image is {image.shape[1]}x{image.shape[0]} but its mask is "
                                 f"{mask.shape[1]}x{mask.shape[0]}")
            with single_thread():  # as the evaluation's loader: threaded resampling differs in the last bit
                x, m = self.transform(image, mask)
            if not (m == 1).any():
                warnings.warn(f"support {k}: its foreground vanishes at {self.size} px; the method sees none",
                              stacklevel=2)
            images.append(x)
            masks.append(m)
            shapes.append(mask.shape)
        s = torch.stack(images)[None].to(self.device)
        m = torch.stack(masks)[None].to(self.device)
        names = {"class_names": [class_name]} if getattr(self.method, "reads_class_names", False) else {}
        return SupportSet(s, m, self.method.encode_supports(s, m, **names), shapes)

    @torch.no_grad()
    def forward(self, query_images: Sequence[np.ndarray], supports: SupportSet) -> SegmenterOutput:
        """The method's raw output for a batch: logits ``[B,2,S,S]`` and maps ``[B,1,h,w]`` at the input size."""
        queries = []
        for j, image in enumerate(query_images):
            image = as_rgb8(image, f"query {j}")
            with single_thread():
                queries.append(self.transform(image, np.zeros(image.shape[:2], np.uint8))[0])
        return self.method.decode(self.method.encode_query(torch.stack(queries).to(self.device)), supports.state)

    def predict(self, query_images: Sequence[np.ndarray], supports: Sequence[SupportPair] | SupportSet,
                threshold: float = 0.5, maps: bool = True) -> list[Prediction]:
        """Segment each query image ``[H,W,3]`` (or ``[H,W]``) given the supports; one :class:`Prediction` each.

        ``supports``: ``[(image, mask), ...]`` or an encoded :class:`SupportSet` (encode once, call many times).
        ``threshold``: on the foreground probability (0.5 = the evaluation's argmax). ``maps``: also return
        the method's maps at each query's size.
        """
        support_set = supports if isinstance(supports, SupportSet) else self.encode(supports)
        out: list[Prediction] = []
        for i in range(0, len(query_images), self.batch_size):
            batch = list(query_images[i:i + self.batch_size])
            result = self.forward(batch, support_set)
            out += [self.at_original_size(result, j, batch[j].shape[:2], threshold, maps) for j in range(len(batch))]
        return out

    def at_original_size(self, out: SegmenterOutput, index: int, shape: tuple[int, int], threshold: float = 0.5,
                         maps: bool = True) -> Prediction:
        """Episode ``index`` of a batch output at the query's original ``(H, W)``, as the evaluation scores it.

        pfenet: the logits go bilinearly (align_corners) to a max(H, W) square and the top-left H x W is kept
        (``fewshot.evaluate.prediction_at_label``); hsnet: straight to H x W. Foreground where the logit
        margin exceeds ``logit(threshold)``: at 0.5 that is the argmax, bit for bit.
        """
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold {threshold} must be in (0, 1)")
        h, w = shape
        with torch.no_grad():
            up = self._upsample(out.logits[index].float(), h, w)                # [2,H,W]
            margin = up[1] - up[0]
            mask = margin > math.log(threshold / (1.0 - threshold))
            probability = torch.sigmoid(margin)
            named = {name: self._upsample(value[index].float(), h, w)[0].clamp(0, 1).cpu().numpy()
                     for name, value in out.maps.items()} if maps else {}
        return Prediction(mask.to(torch.uint8).cpu().numpy(), probability.cpu().numpy().astype(np.float32), named)

    def _upsample(self, x: Tensor, h: int, w: int) -> Tensor:
        """``[C,s,s]`` over the input canvas -> ``[C,H,W]`` over the original image (see :meth:`at_original_size`)."""
        if self.protocol == "hsnet":
            return F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=True)[0]
        side = max(h, w)
        return F.interpolate(x[None], size=(side, side), mode="bilinear", align_corners=True)[0][:, :h, :w]


def as_rgb8(image: np.ndarray, what: str = "image") -> np.ndarray:
    """A numpy image as uint8 RGB ``[H,W,3]``: grey ``[H,W]`` repeated, RGBA's alpha dropped, 16-bit scaled."""
    image = np.asarray(image)
    if image.dtype == np.uint16:
        image = np.rint(image.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    if image.dtype != np.uint8:
        raise ValueError(f"{what}: expected a uint8 (or uint16) image array, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or 0 in image.shape[:2]:
        raise ValueError(f"{what}: expected an [H,W], [H,W,3] or [H,W,4] image, got shape {image.shape}")
    return np.ascontiguousarray(image[..., :3])


def as_episode_mask(mask: np.ndarray, what: str = "mask") -> np.ndarray:
    """A mask array as uint8 ``[H,W]`` in {0, 1, 255}; booleans: True = foreground.

    Raises:
        ValueError: other values (a 0/255 mask must be binarised first: ``mask >= 128`` or :func:`read_mask`),
            or no foreground pixel.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{what}: expected an [H,W] mask, got shape {mask.shape}")
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    values = set(np.unique(mask).tolist())
    if not values <= {0, 1, IGNORE_INDEX}:
        raise ValueError(f"{what}: mask values {sorted(values)[:8]} are not 0 = background, 1 = foreground, "
                         f"255 = ignore; binarise it first (mask >= 128) or read it with read_mask")
    if 1 not in values:
        hint = " (a 0/255 mask? 255 means ignore here: pass mask >= 128)" if IGNORE_INDEX in values else ""
        raise ValueError(f"{what}: mask has no foreground pixel (value 1){hint}")
    return mask.astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# building one from a run folder, a weights file or a config


def resolve_config(source: str | Path | None, config: str | Path | None, overrides: Sequence[str] = ()
                   ) -> tuple[FinetuneConfig, Path | None, Path | None]:
    """``(config, weights file or None, config file used or None)`` as ``python -m finetune.evaluate`` does.

    The config is ``config``, else the ``config.yaml`` beside the weights (a run folder's own), else the
    schema defaults; overrides apply on top.
    """
    weights = resolve_weights(source) if source is not None else None
    run_dir = None if source is None else Path(source) if Path(source).is_dir() else Path(source).parent
    path = Path(config) if config else (run_dir / "config.yaml" if run_dir and (run_dir / "config.yaml").is_file()
                                        else None)
    return load_config(FinetuneConfig, path, list(overrides)), weights, path


def build_loaded_method(cfg: FinetuneConfig, weights: Path | None) -> FewShotMethod:
    """The configured method with ``weights`` loaded (exact keys); an error if a trained method has none.

    Trained weights hold every parameter and buffer (the key check is exact), so a backbone or prior file the
    run was built from may be absent here: it is then built at random and overwritten by the weights.
    """
    model_cfg = cfg.model
    if weights is not None:
        changes = {}
        backbone = model_cfg.backbone_weights
        if backbone not in ("random", "torchvision") and not Path(backbone).is_file():
            changes["backbone_weights"] = "random"
        if model_cfg.prior not in ("none", "random") and not Path(model_cfg.prior).is_file() \
                and model_cfg.prior_arch != "auto":  # with auto the arch is only in the missing file
            changes["prior"] = "random"
        model_cfg = dataclasses.replace(model_cfg, **changes)
    method = build_method(model_cfg)
    if weights is None and method.trains:
        raise WeightsError(f"model.method={model_cfg.method} has trained parameters: give a run folder or a weights "
                           "file (python -m finetune.predict RUN_DIR ...), or a training-free model.method=prototype")
    if weights is not None:
        load_weights(method, weights)
    return method


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_info(cfg: FinetuneConfig, weights: Path | None, config_path: Path | None, source: object) -> dict:
    """What identifies the model: the method, the file its numbers come from and that file's sha256."""
    if weights is not None:
        file, role = weights, "trained weights"
    elif Path(cfg.model.backbone_weights).is_file():  # a training-free method is its backbone
        file, role = Path(cfg.model.backbone_weights), "backbone weights (training-free method)"
    else:
        file, role = None, f"model.backbone_weights={cfg.model.backbone_weights}"
    return {"method": cfg.model.method, "backbone": cfg.model.backbone, "source": str(source) if source else None,
            "config": str(config_path) if config_path else None, "weights": str(file) if file else None,
            "weights_role": role, "sha256": sha256(file) if file else None}


def load_segmenter(source: str | Path | None = None, *, config: str | Path | None = None,
                   overrides: Sequence[str] = (), size: int | None = None, device: str = "auto",
                   batch_size: int = 4) -> Segmenter:
    """A :class:`Segmenter` from a run folder, a weights file, or (training-free methods) a config alone.

    Args:
        source: run folder (its best, else last, weights and its ``config.yaml``) or weights file; None for a
            training-free method.
        config, overrides: as on the command line (``overrides=["model.method=prototype"]``).
        size: input canvas S (default ``data.eval_size`` of the config); device: ``auto`` = CUDA when present.
    """
    cfg, weights, config_path = resolve_config(source, config, overrides)
    method = build_loaded_method(cfg, weights)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    return Segmenter(method, size or cfg.data.eval_size, cfg.eval.protocol, device, batch_size,
                     model_info(cfg, weights, config_path, source))


# --------------------------------------------------------------------------------------------------
# writing the results


def overlay_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image [H,W,3]`` uint8 with ``mask [H,W]`` (1 = foreground) tinted, as in the evaluation's grids."""
    drawn = overlay(torch.from_numpy(np.array(image)).permute(2, 0, 1), torch.from_numpy(np.array(mask)), PRED)
    return drawn.permute(1, 2, 0).numpy()


def map_image(value: np.ndarray) -> np.ndarray:
    """A map ``[H,W]`` in [0, 1] as an RGB heat map ``[H,W,3]`` (the grids' colours: dark blue 0, yellow 1)."""
    return heatmap(torch.from_numpy(np.array(value)), value.shape).permute(1, 2, 0).numpy()


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` (uint8 grey / RGB, or uint16 grey) as a PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return Path(path)


def write_query_outputs(out_dir: Path, name: str, image: np.ndarray, prediction: Prediction) -> dict[str, str]:
    """The three PNGs of one query (mask 0/255, overlay, 16-bit probability); returns their paths (relative)."""
    files = {"mask": f"{name}_mask.png", "overlay": f"{name}_overlay.png", "probability": f"{name}_prob.png"}
    save_png(out_dir / files["mask"], prediction.mask * np.uint8(255))
    save_png(out_dir / files["overlay"], overlay_image(image, prediction.mask))
    save_png(out_dir / files["probability"], np.rint(prediction.probability * 65535.0).astype(np.uint16))
    return files


def load_supports(pairs: Sequence[tuple[str | Path, str | Path]], mask_value: int | None = None, exif: bool = True
                  ) -> tuple[list[SupportPair], list[dict]]:
    """Read and check every support (image, mask) file pair; returns the arrays and their records.

    Raises:
        DataError: the first bad file, named.
    """
    arrays, records = [], []
    for image_path, mask_path in pairs:
        image, mask = read_image(image_path, exif), read_mask(mask_path, mask_value, exif)
        check_pair(image, mask, image_path, mask_path, exif)
        arrays.append((image, mask))
        records.append({"image": str(image_path), "mask": str(mask_path), "width": image.shape[1],
                        "height": image.shape[0], "foreground_share": round(float((mask == 1).mean()), 6),
                        "exif_orientation": exif_orientation(image_path)})
    return arrays, records


def check_queries(queries: Iterable[Path]) -> None:
    """Decode every query once before any work (a truncated file only fails on a full decode).

    Raises:
        DataError: the first unreadable query, named.
    """
    for path in queries:
        image_size(path)


def run_predict(segmenter: Segmenter, supports: Sequence[SupportPair] | SupportSet,
                queries: Sequence[tuple[Path, Path]], out_dir: Path, threshold: float = 0.5, exif: bool = True,
                progress: Callable[[int, int], None] | None = None,
                timing: dict[str, float] | None = None) -> list[dict]:
    """Segment ``queries`` (``(file, name)``) in batches against supports encoded once; write each one's PNGs.

    Returns one record per query (files relative to ``out_dir``, size, foreground share); ``progress(done,
    total)`` is called after each batch; ``timing`` (when given) receives the seconds spent in the model
    (``model_s``: forward and resizing to each query's size) and reading + writing files (``files_s``).
    """
    support_set = supports if isinstance(supports, SupportSet) else segmenter.encode(supports)
    names = output_names([name for _, name in queries])
    records = []
    model_s = files_s = 0.0
    for i in range(0, len(queries), segmenter.batch_size):
        chunk = list(range(i, min(i + segmenter.batch_size, len(queries))))
        t0 = time.perf_counter()
        images = [read_image(queries[j][0], exif) for j in chunk]
        t1 = time.perf_counter()
        predictions = segmenter.predict(images, support_set, threshold, maps=False)
        t2 = time.perf_counter()
        for j, image, pred in zip(chunk, images, predictions):
            files = write_query_outputs(out_dir, names[j], image, pred)
            records.append({"image": str(queries[j][0]), "width": image.shape[1], "height": image.shape[0],
                            "foreground_share": round(pred.foreground_share, 6),
                            "exif_orientation": exif_orientation(queries[j][0]), **files})
        model_s += t2 - t1
        files_s += (t1 - t0) + (time.perf_counter() - t2)
        if progress is not None:
            progress(chunk[-1] + 1, len(queries))
    if timing is not None:
        timing.update(model_s=model_s, files_s=files_s)
    return records


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, str | None]:
    """The command line; the first argument is the run folder / weights file unless it is a flag or override."""
    source = argv.pop(0) if argv and not argv[0].startswith("-") and "=" not in argv[0] else None
    parser = argparse.ArgumentParser(prog="python -m finetune.predict", description=__doc__,
                                     usage="%(prog)s [RUN_DIR_or_WEIGHTS] --support IMG MASK [--support ...] "
                                           "--query IMG_or_FOLDER [options] [key.sub=value ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--support", nargs=2, action="append", metavar=("IMG", "MASK"), required=True,
                        help="a support image and its mask (repeat for k shots)")
    parser.add_argument("--query", action="append", required=True, metavar="IMG_or_FOLDER",
                        help="a query image, or a folder (every image in it, recursively); repeatable")
    parser.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
    parser.add_argument("--class-name", default=None,
                        help="the supports' class, for a run with model.text_guidance (a captioned class name)")
    parser.add_argument("--size", type=int, default=None, help="input size S, 8n+1 (default: data.eval_size)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="foreground where its probability exceeds this (0.5 = the evaluation's argmax)")
    parser.add_argument("--mask-value", type=int, default=None, metavar="V",
                        help="support masks are label maps: foreground = pixels equal to V (255 = ignore)")
    parser.add_argument("--exif", choices=EXIF_MODES, default="apply",
                        help="apply: every file upright by its EXIF orientation (default); stored: as stored")
    parser.add_argument("--batch-size", type=int, default=4, help="queries per forward")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (0 = torch's default); 1 is faster on a CPU shared with other jobs")
    parser.add_argument("--config", help="YAML config (default: the run folder's config.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    args = parser.parse_intermixed_args(argv)
    if not 0.0 < args.threshold < 1.0:
        parser.error(f"--threshold {args.threshold} must be in (0, 1)")
    if args.mask_value is not None and (args.mask_value < 0 or args.mask_value == IGNORE_INDEX):
        parser.error(f"--mask-value {args.mask_value}: a class id >= 0, not {IGNORE_INDEX} (the ignore label)")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size} must be >= 1")
    if args.size is not None:
        try:
            check_size(args.size)
        except ValueError as err:
            parser.error(f"--size: {err}")
    return args, source


def main(argv: list[str] | None = None) -> dict:
    """``python -m finetune.predict``; returns what ``predictions.json`` holds."""
    args, source = parse_args(list(sys.argv[1:] if argv is None else argv))
    exif = args.exif == "apply"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    # every input file first: a bad one must stop the command before the model is even built
    cfg, weights, config_path = resolve_config(source, args.config, args.overrides)
    supports, support_records = load_supports([tuple(p) for p in args.support], args.mask_value, exif)
    queries = list_queries(args.query)
    check_queries(p for p, _ in queries)
    checked = time.perf_counter()
    method = build_loaded_method(cfg, weights)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    segmenter = Segmenter(method, args.size or cfg.data.eval_size, cfg.eval.protocol, device, args.batch_size,
                          model_info(cfg, weights, config_path, source))
    loaded = time.perf_counter()
    out_dir = Path(args.out)
    bar = tqdm(total=len(queries), unit="query", desc="predict", dynamic_ncols=True)

    def advance(done: int, total: int) -> None:
        bar.update(done - bar.n)

    t0 = time.perf_counter()
    support_set = segmenter.encode(supports, args.class_name)
    encoded = time.perf_counter()
    parts: dict[str, float] = {}
    records = run_predict(segmenter, support_set, queries, out_dir, args.threshold, exif, advance, parts)
    bar.close()
    encode_s, segment_s = encoded - t0, time.perf_counter() - encoded
    result = {
        "model": segmenter.info,
        "settings": {"size": segmenter.size, "protocol": segmenter.protocol, "threshold": args.threshold,
                     "mask_value": args.mask_value, "exif": args.exif, "batch_size": segmenter.batch_size,
                     "device": str(segmenter.device), "supports_encoded_once": True,
                     "torch": torch.__version__, "threads": torch.get_num_threads()},
        "supports": support_records,
        "queries": records,
        "timing": {"check_inputs_s": round(checked - start, 3), "load_model_s": round(loaded - checked, 3),
                   "encode_supports_s": round(encode_s, 3), "segment_and_write_s": round(segment_s, 3),
                   "per_query_s": round(segment_s / len(records), 4),
                   "model_per_query_s": round(parts["model_s"] / len(records), 4),
                   "files_per_query_s": round(parts["files_s"] / len(records), 4), "queries": len(records)},
    }
    write_json(out_dir / "predictions.json", result)
    print(f"{cfg.model.method}: {len(records)} queries at {segmenter.size} px ({segmenter.protocol}) on "
          f"{segmenter.device}: supports ({len(supports)}) encoded once in {encode_s:.2f} s, then "
          f"{result['timing']['per_query_s']:.3f} s per query ({result['timing']['model_per_query_s']:.3f} s in "
          f"the model, {result['timing']['files_per_query_s']:.3f} s reading and writing files); "
          f"masks, overlays, probabilities and predictions.json in {out_dir}")
    return result


if __name__ == "__main__":
    with user_errors():
        main()
