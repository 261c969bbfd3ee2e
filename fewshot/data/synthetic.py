"""A small FSS-1000-layout set the project draws itself: the default stage-2 data when none is given.

Each class is a shape (disc, square, triangle, star, ring, cross, hexagon, crescent) with its own colour and
surface texture (stripes, checks, dots, mottled noise). Every image shows one object of its class at a random
position, scale and rotation, with per-image jitter of hue, brightness and texture phase, on a mottled, noisy
background that also carries zero to two objects of *other* classes. Those distractors make the task
few-shot rather than saliency: which object is foreground is only known from the supports.

The set is a pure function of ``(classes, per_class, size, seed)``; ``splits.json`` next to the class folders
lists the train / val / test classes (disjoint; val and test are novel classes).
"""

from __future__ import annotations

import colorsys
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fewshot.data.fss import Fss1000

SHAPES = ("disc", "square", "triangle", "star", "ring", "cross", "hexagon", "crescent")
TEXTURES = ("stripes", "checks", "dots", "mottled")
MARKER = "synthetic.json"


def class_specs(classes: int, seed: int) -> list[dict]:
    """Name, shape, hue and texture of every class (hues spread evenly, then shuffled by the seed)."""
    rng = np.random.default_rng([seed, 7919])
    hues = rng.permutation(classes) / classes
    specs = []
    for i in range(classes):
        shape, texture = SHAPES[i % len(SHAPES)], TEXTURES[(i + i // len(SHAPES)) % len(TEXTURES)]
        specs.append({"name": f"{shape}_{texture}_{i:02d}", "shape": shape, "texture": texture,
                      "hue": float(hues[i]), "period": float(rng.uniform(5, 11)), "sat": float(rng.uniform(.55, .9))})
    return specs


def class_splits(names: list[str]) -> dict[str, list[str]]:
    """Disjoint class splits: the last sixth (at least one) test, the sixth before it val, the rest train."""
    n_hold = max(1, round(len(names) / 6))
    return {"train": names[:-2 * n_hold], "val": names[-2 * n_hold:-n_hold], "test": names[-n_hold:]}


def shape_mask(shape: str, size: int, center: tuple[float, float], radius: float, angle: float) -> np.ndarray:
    """bool ``[size, size]``: one filled shape."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = center

    def polygon(radii: list[float], start: float = 0.0) -> list[tuple[float, float]]:
        n = len(radii)
        return [(cx + r * radius * np.cos(angle + start + 2 * np.pi * k / n),
                 cy + r * radius * np.sin(angle + start + 2 * np.pi * k / n)) for k, r in enumerate(radii)]

    if shape in ("disc", "ring", "crescent"):
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        if shape == "ring":
            r = 0.55 * radius
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=0)
        elif shape == "crescent":
            ox, oy = cx + 0.45 * radius * np.cos(angle), cy + 0.45 * radius * np.sin(angle)
            r = 0.85 * radius
            draw.ellipse([ox - r, oy - r, ox + r, oy + r], fill=0)
    elif shape == "square":
        draw.polygon(polygon([1.0] * 4, np.pi / 4), fill=255)
    elif shape == "triangle":
        draw.polygon(polygon([1.0] * 3), fill=255)
    elif shape == "hexagon":
        draw.polygon(polygon([1.0] * 6), fill=255)
    elif shape == "star":
        draw.polygon(polygon([1.0, 0.45] * 5), fill=255)
    elif shape == "cross":
        arm = 0.33
        pts = [(1, arm), (arm, arm), (arm, 1), (-arm, 1), (-arm, arm), (-1, arm),
               (-1, -arm), (-arm, -arm), (-arm, -1), (arm, -1), (arm, -arm), (1, -arm)]
        c, s = np.cos(angle), np.sin(angle)
        draw.polygon([(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in pts], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(canvas) > 127


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """float ``[size, size]`` in about [0, 1]: a bilinearly upsampled random grid (low-frequency mottling)."""
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), np.float32) / 255.0


def texture(spec: dict, rng: np.random.Generator, size: int) -> np.ndarray:
    """float ``[size, size]`` in [-1, 1]: the class's surface pattern with a random phase and direction jitter."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    period = spec["period"] * rng.uniform(0.85, 1.15)
    u = (xx * np.cos(theta) + yy * np.sin(theta)) / period * 2 * np.pi + rng.uniform(0, 2 * np.pi)
    v = (-xx * np.sin(theta) + yy * np.cos(theta)) / period * 2 * np.pi
    kind = spec["texture"]
    if kind == "stripes":
        return np.sin(u)
    if kind == "checks":
        return np.sign(np.sin(u) * np.sin(v)) * 0.8
    if kind == "dots":
        return np.clip((np.cos(u) * np.cos(v) - 0.3) * 2.5, -1, 1)
    return smooth_noise(rng, size, max(4, int(size / period))) * 2 - 1


def paint(canvas: np.ndarray, mask: np.ndarray, spec: dict, rng: np.random.Generator) -> None:
    """Fill ``mask`` of the float RGB canvas with the class colour (jittered) modulated by its texture."""
    hue = (spec["hue"] + rng.normal(0, 0.02)) % 1.0
    light = rng.uniform(0.5, 0.85)
    base = np.array(colorsys.hsv_to_rgb(hue, spec["sat"], light), np.float32) * 255
    shade = 1.0 + 0.3 * texture(spec, rng, canvas.shape[0])
    canvas[mask] = np.clip(base[None, :] * shade[mask][:, None], 0, 255)


def draw_image(specs: list[dict], target: int, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image of class ``target``: uint8 RGB ``[size, size, 3]`` and its mask (0/1)."""
    canvas = np.empty((size, size, 3), np.float32)
    tint = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.45), rng.uniform(0.35, 0.8)), np.float32)
    for ch in range(3):
        canvas[..., ch] = 255 * tint[ch] * (0.6 + 0.8 * smooth_noise(rng, size, int(rng.integers(3, 9))))
    others = [i for i in range(len(specs)) if i != target]
    objects = [int(o) for o in rng.choice(others, size=int(rng.integers(0, 3)), replace=False)] + [target]
    for cls in objects:  # distractors first; the target is drawn last and never occluded
        radius = size * rng.uniform(0.14, 0.3)
        center = tuple(rng.uniform(radius * 0.6, size - radius * 0.6, size=2))
        mask = shape_mask(specs[cls]["shape"], size, center, radius, rng.uniform(0, 2 * np.pi))
        paint(canvas, mask, specs[cls], rng)
    canvas += rng.normal(0, 8, canvas.shape).astype(np.float32)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))
    return np.asarray(image), mask.astype(np.uint8)


def make_synthetic_fss(root: str | Path, classes: int = 12, per_class: int = 10, size: int = 160,
                       seed: int = 0) -> Path:
    """Write the set under ``root`` (``<class>/<n>.jpg`` + ``<n>.png`` 0/255, ``splits.json``) once.

    An existing set with the same parameters is reused; the folder is built beside ``root`` and renamed into
    place, so concurrent processes never see a half-written set. Returns ``root``.
    """
    root = Path(root).expanduser()
    params = {"classes": classes, "per_class": per_class, "size": size, "seed": seed, "version": 1}
    marker = root / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == params:
            return root
        raise FileExistsError(f"{root}: holds a synthetic set made with {marker.read_text()}, not {params}; "
                              f"choose another data.root or delete it")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: exists and is not a synthetic set; choose another data.root")
    specs = class_specs(classes, seed)
    tmp = root.with_name(f".{root.name}.tmp{np.random.default_rng().integers(1 << 30)}")
    for ci, spec in enumerate(specs):
        (tmp / spec["name"]).mkdir(parents=True)
        for n in range(per_class):
            image, mask = draw_image(specs, ci, np.random.default_rng([seed, ci, n]), size)
            Image.fromarray(image).save(tmp / spec["name"] / f"{n + 1}.jpg", quality=92)
            Image.fromarray(mask * 255).save(tmp / spec["name"] / f"{n + 1}.png")
    (tmp / "splits.json").write_text(json.dumps(class_splits([s["name"] for s in specs]), indent=1))
    (tmp / MARKER).write_text(json.dumps(params))
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        if root.exists():
            root.rmdir()
        tmp.rename(root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        if not marker.is_file():
            raise
    return root


class SyntheticFss(Fss1000):
    """The generated set as a benchmark: the classes of ``split`` (train / val / test) from ``splits.json``."""

    name = "synthetic"

    def __init__(self, root: str | Path, split: str = "train", classes: int = 12, per_class: int = 10,
                 size: int = 160, seed: int = 0) -> None:
        folder = make_synthetic_fss(root, classes, per_class, size, seed)
        splits = json.loads((folder / "splits.json").read_text())
        if split not in splits:
            raise ValueError(f"synthetic split must be one of {sorted(splits)}, got {split!r}")
        super().__init__(folder, split=split, classes=splits[split])
