"""Stage-1 data: bad input is named (or counted when skipping), samples are a function of (seed, epoch, index)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import load_config
from pretrain.config import PretrainConfig
from pretrain.data import ImageError, PretrainImages, prepare_images, scan_images, source_images


def photo(path: Path, size=(96, 80), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: size[1], : size[0]]
    img = np.stack([xx * 2 % 256, yy * 3 % 256, (xx + yy) % 256], -1).astype(np.uint8)
    img[: size[1] // 2] = rng.integers(0, 255, 3)  # two flat halves plus gradients: several superpixels
    Image.fromarray(img).save(path)
    return path


def cfg_for(root: Path, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, ["data.source=folder", f"data.root={root}", "data.num_workers=0",
                                              "data.min_image_side=32", "superpixels.workers=0",
                                              "aug.global_size=32", "aug.local_size=32", *extra])


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        source_images(cfg_for(tmp_path / "nowhere"), tmp_path)


def test_bad_images_are_named_or_counted(tmp_path):
    good = photo(tmp_path / "good.png")
    photo(tmp_path / "full.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    tiny = photo(tmp_path / "tiny.png", size=(20, 20))
    (tmp_path / "notes.txt").write_text("not an image")
    paths = [good, truncated, tiny]
    with pytest.raises(ImageError, match="truncated.jpg: image file is unreadable or truncated"):
        scan_images(paths, 32, "error", workers=0, progress=False)
    report = scan_images(paths, 32, "skip", workers=0, progress=False)
    assert report.good == [good]
    reasons = dict(report.bad)
    assert "unreadable" in reasons[str(truncated)] and "smaller than data.min_image_side" in reasons[str(tiny)]


def test_single_superpixel_image_is_bad_input(tmp_path):
    photo(tmp_path / "ok.png")
    Image.new("RGB", (64, 64), (120, 30, 200)).save(tmp_path / "flat.png")  # Felzenszwalb: one region
    cfg = cfg_for(tmp_path, "superpixels.method=felzenszwalb", "superpixels.fh_min_size=20",
                  f"superpixels.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(Exception, match="flat.png"):
        prepare_images(cfg, tmp_path, tmp_path / "cache", progress=False)
    skip = cfg_for(tmp_path, "superpixels.method=felzenszwalb", "superpixels.fh_min_size=20",
                   "data.on_bad_image=skip")
    report = prepare_images(skip, tmp_path, tmp_path / "cache", progress=False)
    assert [p.name for p in report.good] == ["ok.png"] and "flat.png" in report.bad[0][0]


@pytest.mark.parametrize("augment_on", ["worker", "device"])
@pytest.mark.parametrize("mode", ["patch", "pooled"])
def test_samples_depend_only_on_seed_epoch_index(tmp_path, mode, augment_on):
    for i in range(3):
        photo(tmp_path / f"{i}.png", seed=i)
    cfg = cfg_for(tmp_path, f"loss.local_mode={mode}", "data.canvas_side=64")
    report = prepare_images(cfg, tmp_path, tmp_path / "cache", progress=False)
    a = PretrainImages(report.good, cfg, tmp_path / "cache", augment_on)
    b = PretrainImages(report.good, cfg, tmp_path / "cache", augment_on)
    torch.manual_seed(123)  # the global RNG must not matter
    first = a[1]
    torch.manual_seed(7)
    again = b[1]
    assert first.keys() == again.keys()
    for key in first:
        assert torch.equal(first[key], again[key]), key
    b.set_epoch(1)
    moved = "view_q" if augment_on == "worker" else "q_box"
    assert not torch.equal(first[moved], b[1][moved])  # a new epoch draws new views
    if augment_on == "device":  # the image fits the 64 px canvas unscaled: 96 x 80 -> 64 x 53
        assert first["canvas"].shape == (3, 64, 64) and first["canvas"].dtype == torch.uint8
        assert (first["canvas"][:, 54:] == 0).all()
    elif mode == "pooled":
        assert first["labels_q"].shape == (32, 32) and first["labels_q"].dtype == torch.int64
    else:
        assert first["patch_q"].shape == (3, 32, 32)


def test_folder_list_file_reads_exactly_the_listed_images(tmp_path):
    for name in ("a.png", "b.png", "sub/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        photo(tmp_path / name)
    listing = tmp_path / "list.txt"
    listing.write_text("sub/c.png\na.png\n\n")
    assert source_images(cfg_for(tmp_path, f"data.list_file={listing}"), tmp_path) == [tmp_path / "sub/c.png",
                                                                                      tmp_path / "a.png"]
    listing.write_text("a.png\ngone.png\n")
    with pytest.raises(FileNotFoundError, match="1 listed image.*gone.png"):
        source_images(cfg_for(tmp_path, f"data.list_file={listing}"), tmp_path)


def test_stage_two_training_images_list_for_stage_one(tmp_path):
    """finetune.list_images writes the training split's images (no test class image) in the list layout."""
    from finetune.list_images import main

    data = ["data.benchmark=synthetic", f"data.root={tmp_path / 'data'}", "data.synthetic_per_class=3",
            "data.synthetic_size=48"]
    config = Path(__file__).parents[1] / "configs" / "finetune" / "quickstart_cpu.yaml"
    paths = main(["--config", str(config), "--out", str(tmp_path / "train.txt"), "--root", str(tmp_path), *data])
    listed = (tmp_path / "train.txt").read_text().splitlines()
    assert len(listed) == len(paths) > 0 and all(not line.startswith("/") for line in listed)
    test = main(["--config", str(config), "--out", str(tmp_path / "test.txt"), "--split", "test", *data])
    assert not set(paths) & set(test)  # synthetic folds: train and test classes use different images
    cfg = cfg_for(tmp_path, f"data.list_file={tmp_path / 'train.txt'}")
    assert source_images(cfg, tmp_path) == [tmp_path / line for line in listed]
