"""superpixels/: dense label maps, the on-disk cache, joint view augmentation, region pooling, PNG figures."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import maximum_filter, minimum_filter
from skimage import data as skdata

from common.images import list_images, read_rgb
from superpixels.cache import BadImageError, MissingSuperpixelsError, SuperpixelCache, main, precompute
from superpixels.pooling import labels_to_grid, pool_regions, sample_shared_ids
from superpixels.segment import SuperpixelConfig, TooFewSegmentsError, compute_superpixels, segment_ids_for_sampling
from superpixels.transforms import JointViewTransform, PhotometricConfig, sample_segment_crop
from superpixels.vis import PAD, save_boundary_grid, save_view_pair_grid, to_rgb_uint8

SMALL_FH = dict(fh_scale=100.0, fh_min_size=20)  # FH defaults are tuned for full-size photos


def astronaut(side: int = 64) -> np.ndarray:
    return np.asarray(Image.fromarray(skdata.astronaut()).resize((side, side), Image.Resampling.BILINEAR))


def block_labels(side: int = 96, block: int = 12) -> np.ndarray:
    """[side,side] uint16 ids of a grid of block x block squares, row-major."""
    per_row = side // block
    return (np.arange(side)[:, None] // block * per_row + np.arange(side)[None, :] // block).astype(np.uint16)


def palette(n: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(n, 3), dtype=np.uint8)


def write_image(path: Path, seed: int, side: int = 40) -> Path:
    """A JPEG/PNG of four noisy colour quadrants (always >= 2 superpixels)."""
    rng = np.random.default_rng(seed)
    quads = block_labels(side, side // 2)
    rgb = palette(4 + seed)[quads + seed].astype(np.int16) + rng.integers(-8, 9, size=(side, side, 3))
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(path)
    return path


# --------------------------------------------------------------------------------------------------
# segment.py


@pytest.mark.parametrize("method", ["slic", "felzenszwalb"])
@pytest.mark.parametrize("max_side", [0, 32])
@pytest.mark.parametrize("source", ["astronaut", "synthetic"])
def test_labels_dense_from_zero(method: str, max_side: int, source: str) -> None:
    image = astronaut() if source == "astronaut" else palette(64)[block_labels(64, 16)]
    cfg = SuperpixelConfig(method=method, max_side=max_side, **SMALL_FH)
    labels = compute_superpixels(image, cfg)
    assert labels.shape == image.shape[:2] and labels.dtype == np.uint16
    n = int(labels.max()) + 1
    assert n >= 2
    np.testing.assert_array_equal(np.unique(labels), np.arange(n))


def test_synthetic_blocks_recovered_by_felzenszwalb() -> None:
    truth = block_labels(64, 16)
    cfg = SuperpixelConfig(method="felzenszwalb", fh_scale=100.0, fh_sigma=0.0, fh_min_size=20)
    labels = compute_superpixels(palette(16)[truth], cfg)
    # Same partition as the 16 flat squares (ids may be permuted).
    assert len(np.unique(labels)) == 16
    assert len(np.unique(truth.astype(np.int64) * 1000 + labels)) == 16


def test_grayscale_and_rgba_inputs_match_rgb() -> None:
    gray = astronaut()[..., 0]
    cfg = SuperpixelConfig()
    rgb_labels = compute_superpixels(np.repeat(gray[..., None], 3, axis=2), cfg)
    np.testing.assert_array_equal(compute_superpixels(gray, cfg), rgb_labels)
    np.testing.assert_array_equal(compute_superpixels(gray[..., None], cfg), rgb_labels)
    rgba = np.concatenate([astronaut(), np.full((64, 64, 1), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(compute_superpixels(rgba, cfg), compute_superpixels(astronaut(), cfg))
    with pytest.raises(ValueError, match="uint8"):
        compute_superpixels(astronaut().astype(np.float32), cfg)


def test_params_hash_tracks_only_label_parameters() -> None:
    base = SuperpixelConfig()
    assert base.params_hash() == "7fd3b8bb42c1"  # cache folders must survive code changes
    for changed in (dict(n_segments=64), dict(compactness=20.0), dict(max_side=256), dict(method="felzenszwalb"),
                    dict(slic_sigma=1.0), dict(max_num_iter=5)):
        assert SuperpixelConfig(**changed).params_hash() != base.params_hash(), changed
    for same in (dict(cache_dir="/x"), dict(workers=8), dict(min_area_frac=0.05), dict(fh_scale=5.0)):
        assert SuperpixelConfig(**same).params_hash() == base.params_hash(), same
    fh = SuperpixelConfig(method="felzenszwalb")
    assert SuperpixelConfig(method="felzenszwalb", fh_min_size=10).params_hash() != fh.params_hash()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="n_segments"):
        SuperpixelConfig(n_segments=1).validate()
    with pytest.raises(ValueError, match="min_area_frac"):
        SuperpixelConfig(min_area_frac=0.7).validate()


def test_segment_ids_for_sampling() -> None:
    labels = np.array([0] * 50 + [1] * 30 + [2] * 19 + [3]).reshape(10, 10)
    np.testing.assert_array_equal(segment_ids_for_sampling(labels, 0.01), [0, 1, 2, 3])
    np.testing.assert_array_equal(segment_ids_for_sampling(labels, 0.19), [0, 1, 2])
    np.testing.assert_array_equal(segment_ids_for_sampling(labels, 0.2), [0, 1])
    with pytest.raises(TooFewSegmentsError, match="only 1 of 4"):
        segment_ids_for_sampling(labels, 0.31)


# --------------------------------------------------------------------------------------------------
# cache.py


def test_cache_roundtrip_and_atomic_layout(tmp_path: Path) -> None:
    cfg = SuperpixelConfig()
    cache = SuperpixelCache(tmp_path, cfg)
    key = cache.key_for(b"image bytes")
    assert key != SuperpixelCache(tmp_path, SuperpixelConfig(n_segments=8)).key_for(b"image bytes")
    assert not cache.has(key)
    with pytest.raises(MissingSuperpixelsError, match="python -m superpixels.cache .*--n-segments 32"):
        cache.load(key)
    labels = block_labels(20, 5)
    path = cache.save(key, labels)
    assert path == tmp_path / cfg.params_hash() / key[:2] / f"{key}.npz"
    assert cache.has(key) and list(path.parent.iterdir()) == [path]  # no temporary file left behind
    loaded = cache.labels_for(b"image bytes")
    assert loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, labels)
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="corrupt"):
        cache.load(key)


def test_precompute_two_workers_then_all_cached(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    paths = [write_image(folder / ("sub" if i % 2 else "") / f"im{i}.{'png' if i % 3 else 'jpg'}", i)
             for i in range(6)]
    assert list_images(folder) == sorted(paths)
    cfg = SuperpixelConfig(n_segments=8)
    report = precompute(list_images(folder), cfg, tmp_path / "cache", workers=2, progress=False)
    assert (report.total, report.computed, report.cached, report.bad) == (6, 6, 0, {})
    again = precompute(list_images(folder), cfg, tmp_path / "cache", workers=2, progress=False)
    assert (again.computed, again.cached) == (0, 6)
    cache = SuperpixelCache(tmp_path / "cache", cfg)
    for path in paths:
        raw = path.read_bytes()
        np.testing.assert_array_equal(cache.labels_for(raw), compute_superpixels(read_rgb(raw, str(path)), cfg))


def test_bad_images_raise_or_are_counted(tmp_path: Path) -> None:
    good = [write_image(tmp_path / f"ok{i}.png", i) for i in range(2)]
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(flat)
    cfg = SuperpixelConfig(method="felzenszwalb", **SMALL_FH)  # SLIC would tile a flat image into a grid
    for bad in (truncated, text, flat):
        with pytest.raises(BadImageError, match=str(bad)):
            precompute([str(good[0]), str(bad)], cfg, tmp_path / "cache", workers=0, progress=False)
    paths = [str(p) for p in (*good, truncated, text, flat)]
    report = precompute(paths, cfg, tmp_path / "cache", workers=0, on_bad_image="skip", progress=False)
    assert (report.total, report.computed + report.cached, len(report.bad)) == (5, 2, 3)
    assert "truncated" in report.bad[str(truncated)] and "decode" in report.bad[str(text)]
    assert "superpixel" in report.bad[str(flat)]
    assert SuperpixelCache(tmp_path / "cache", cfg).bad_images() == report.bad


def test_cli_prints_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        write_image(tmp_path / "imgs" / f"{i}.png", i)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG garbage")
    config = tmp_path / "run.yaml"
    config.write_text("superpixels:\n  n_segments: 8\n  workers: 0\n")
    argv = [str(tmp_path / "imgs"), "--cache-dir", str(tmp_path / "c"), "--config", str(config), "--no-progress"]
    assert main(argv) == 1
    assert "broken.png" in capsys.readouterr().err
    assert main([*argv, "--on-bad-image", "skip", "--compactness", "5"]) == 0
    out = capsys.readouterr().out
    assert "4 images: 3 computed, 0 already cached, 1 bad (skipped)" in out
    assert SuperpixelConfig(n_segments=8, compactness=5.0).params_hash() in out


def test_precompute_real_photos(shared_data: Path, tmp_path: Path) -> None:
    photos = sorted((shared_data / "fss-mini" / "Abyssinian").glob("*.jpg"))[:3]
    assert photos, "fss-mini/Abyssinian holds no JPEGs"
    cfg = SuperpixelConfig(max_side=96)
    report = precompute([str(p) for p in photos], cfg, tmp_path, workers=0, progress=False)
    assert report.computed == len(photos)
    for photo in photos:
        labels = SuperpixelCache(tmp_path, cfg).labels_for(photo.read_bytes())
        with Image.open(photo) as img:
            assert labels.shape == (img.height, img.width)
        assert len(segment_ids_for_sampling(labels, cfg.min_area_frac)) >= 2


# --------------------------------------------------------------------------------------------------
# transforms.py


def test_joint_view_keeps_ids_on_their_pixels() -> None:
    labels = block_labels(96, 12)
    colours = palette(64)
    image = Image.fromarray(colours[labels])
    transform = JointViewTransform(48, photometric=None, normalize=None)
    for seed in range(4):
        torch.manual_seed(seed)
        view, view_labels = transform(image, labels)
        assert view.shape == (3, 48, 48) and view.dtype == torch.float32
        assert view_labels.shape == (48, 48) and view_labels.dtype == torch.int64
        ids = view_labels.numpy()
        assert set(np.unique(ids)) <= set(np.unique(labels))
        rgb = view.permute(1, 2, 0).numpy() * 255
        # Away from region borders (where bilinear mixes colours) each pixel has its label's colour exactly.
        interior = minimum_filter(ids, 3) == maximum_filter(ids, 3)
        assert interior.mean() > 0.3
        np.testing.assert_allclose(rgb[interior], colours[ids[interior]].astype(np.float32), atol=0.5)


def test_joint_view_flip_moves_labels_with_image() -> None:
    labels = np.zeros((32, 32), np.uint16)
    labels[:, 16:] = 1
    image = Image.fromarray(palette(2)[labels])
    transform = JointViewTransform(16, min_scale=1.0, hflip_prob=1.0, photometric=None, normalize=None)
    torch.manual_seed(0)
    view, view_labels = transform(image, labels)
    left = view[:, 8, 0] * 255
    assert view_labels[8, 0] == 1 and torch.allclose(left, torch.tensor(palette(2)[1], dtype=torch.float32))


def test_joint_view_same_seed_same_views() -> None:
    image = Image.fromarray(astronaut(64))
    labels = compute_superpixels(astronaut(64), SuperpixelConfig())
    transform = JointViewTransform(32, photometric=PhotometricConfig(jitter_prob=1.0, blur_prob=1.0))

    def draw(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        np.random.seed(seed)
        return transform(image, labels)

    (a, la), (b, lb), (c, _) = draw(3), draw(3), draw(4)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="does not match the image size"):
        transform(image, labels[:, :-1])


def test_sample_segment_crop_is_tight_bbox() -> None:
    labels = np.zeros((30, 40), np.uint16)
    labels[5:12, 20:33] = 1
    labels[20:, :10] = 2
    image = Image.fromarray(np.arange(30 * 40 * 3, dtype=np.uint32).reshape(30, 40, 3).astype(np.uint8))
    crops = {}
    for seed in range(20):
        crop = sample_segment_crop(image, labels, np.array([1, 2]), np.random.default_rng(seed))
        crops[crop.size] = np.asarray(crop)
    assert set(crops) == {(13, 7), (10, 10)}  # (width, height) of segments 1 and 2
    np.testing.assert_array_equal(crops[(13, 7)], np.asarray(image)[5:12, 20:33])  # context kept, not masked
    first = sample_segment_crop(image, labels, np.array([1, 2]), np.random.default_rng(5))
    again = sample_segment_crop(image, labels, np.array([1, 2]), np.random.default_rng(5))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))


# --------------------------------------------------------------------------------------------------
# pooling.py


def test_labels_to_grid_hand_case() -> None:
    labels = torch.tensor([[[0, 0, 1, 1],
                            [0, 2, 1, 2],
                            [3, 3, 2, 2],
                            [3, 1, 1, 2]]])
    # Blocks: top-left {0:3, 2:1}; top-right {1:3, 2:1}; bottom-left {3:3, 1:1}; bottom-right {2:3, 1:1}.
    assert labels_to_grid(labels, 2, 4).tolist() == [[[0, 1], [3, 2]]]
    tie = torch.tensor([[[2, 1], [1, 2]]])
    assert labels_to_grid(tie, 1, 3).tolist() == [[[1]]]  # equal counts: the lower id wins
    with pytest.raises(ValueError, match="num_ids"):
        labels_to_grid(labels, 2, 3)


def test_labels_to_grid_matches_one_hot_average_pool() -> None:
    labels = torch.randint(0, 6, (3, 28, 28), generator=torch.Generator().manual_seed(0))
    one_hot = F.one_hot(labels, 6).permute(0, 3, 1, 2).float()
    reference = F.avg_pool2d(one_hot, 4).argmax(dim=1)
    assert torch.equal(labels_to_grid(labels, 7, 6), reference)


def test_pool_regions_against_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 4, 4, generator=gen)
    grid = torch.randint(0, 3, (2, 4, 4), generator=gen)
    grid[1][grid[1] == 2] = 0  # id 2 absent from image 1; id 4 never used
    pooled, present = pool_regions(features, grid, 5)
    assert pooled.shape == (2, 5, 5) and present.shape == (2, 5)
    for b in range(2):
        for i in range(5):
            where = grid[b] == i
            assert bool(present[b, i]) == bool(where.any())
            expected = features[b][:, where].mean(dim=1) if where.any() else torch.zeros(5)
            torch.testing.assert_close(pooled[b, i], expected)
    with pytest.raises(ValueError, match="num_ids=2"):
        pool_regions(features, grid, 2)


def test_sample_shared_ids_only_shared() -> None:
    present_a = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    present_b = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    ids, valid = sample_shared_ids(present_a, present_b, 64, torch.Generator().manual_seed(0))
    assert ids.shape == valid.shape == (3, 64) and ids.dtype == torch.int64
    assert set(ids[0].tolist()) == {1, 3}
    assert set(ids[2].tolist()) == {4}
    assert valid[0].all() and valid[2].all() and not valid[1].any()
    again, _ = sample_shared_ids(present_a, present_b, 64, torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)


# --------------------------------------------------------------------------------------------------
# vis.py


def test_png_writers(tmp_path: Path) -> None:
    images = [astronaut(40), astronaut(24)[:20]]
    labels = [compute_superpixels(im, SuperpixelConfig(n_segments=8)) for im in images]
    path = save_boundary_grid(images, labels, tmp_path / "figs" / "boundaries.png", ncol=4)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (2 * (40 + PAD) + PAD, 40 + 2 * PAD)

    torch.manual_seed(0)
    transform = JointViewTransform(32, photometric=None)
    pil = Image.fromarray(images[0])
    (v1, l1), (v2, l2) = transform(pil, labels[0]), transform(pil, labels[0])
    path = save_view_pair_grid(images[0], labels[0], v1, l1, v2, l2, tmp_path / "pair.png")
    with Image.open(path) as png:
        assert png.size == (3 * (32 + PAD) + PAD, 2 * (32 + PAD) + PAD)
        grid = np.asarray(png.convert("RGB"))
    # View 1's un-normalised pixels appear in its cell (top row, second column) up to boundary marks.
    cell = grid[PAD:PAD + 32, 2 * PAD + 32:2 * PAD + 64].astype(int)
    assert (np.abs(cell - to_rgb_uint8(v1)).max(axis=-1) == 0).mean() > 0.5
