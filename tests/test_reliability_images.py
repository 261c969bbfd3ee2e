"""Reliability of image input in both stages: 16-bit and non-RGB images, decompression bombs, and how entry
points report a user's error. Every fixture is drawn in ``tmp_path``; nothing here trains."""

from __future__ import annotations

import io
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.cli import user_errors
from common.config import load_config
from common.errors import DataError, WeightsError
from common.images import image_size, read_rgb
from fewshot.data.crossdomain import ChestXray
from fewshot.data.fss import Fss1000
from pretrain.config import PretrainConfig
from pretrain.data import PretrainImages, check_image, scan_images
from superpixels import cache as sp_cache

W, H = 64, 48


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def gradient8() -> np.ndarray:
    """``[H, W]`` uint8 horizontal ramp 0..255."""
    return np.tile(np.linspace(0, 255, W).round().astype(np.uint8), (H, 1))


def save_16bit(path: Path, grey8: np.ndarray) -> Path:
    """The 8-bit ramp stored as a 16-bit grey PNG (``v * 257``: 0..65535); the name may say .jpg, PIL sniffs."""
    Image.fromarray(grey8.astype(np.uint16) * 257).save(path, format="PNG")
    with Image.open(path) as im:
        assert im.mode.startswith("I"), im.mode  # really a 16-bit file
    return path


def photo(path: Path, size: tuple[int, int] = (W, H), seed: int = 0) -> Path:
    """Flat halves plus gradients: SLIC finds several superpixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: size[1], : size[0]]
    img = np.stack([xx * 4 % 256, yy * 5 % 256, (xx + yy) * 3 % 256], -1).astype(np.uint8)
    img[: size[1] // 2] = rng.integers(0, 255, 3)
    Image.fromarray(img).save(path)
    return path


# --------------------------------------------------------------------------------------------------
# case 1: 16-bit, grey, RGBA and palette images become 8-bit RGB


def test_read_rgb_scales_16bit_png_to_8_bits(tmp_path):
    grey8 = gradient8()
    path = save_16bit(tmp_path / "ramp16.png", grey8)
    rgb = read_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (H, W, 3)
    assert abs(float(rgb.mean()) - float(grey8.mean())) <= 1  # convert("RGB") would clip to (nearly) white
    assert np.array_equal(rgb[..., 0], grey8) and np.array_equal(rgb[..., 0], rgb[..., 2])
    # the same from the file's bytes (how stage 1 and the superpixel cache read)
    assert np.array_equal(read_rgb(path.read_bytes(), path), rgb)
    # a full-range 16-bit ramp that is not a multiple of 257 still lands within 1 of the 8-bit ramp
    wide = np.tile(np.linspace(0, 65535, W).round().astype(np.uint16), (H, 1))
    Image.fromarray(wide).save(tmp_path / "wide16.png")
    assert np.abs(read_rgb(tmp_path / "wide16.png")[..., 0].astype(int) - np.rint(wide / 257)).max() <= 1


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "1", "CMYK"])
def test_read_rgb_turns_other_modes_into_rgb(tmp_path, mode):
    base = Image.fromarray(np.stack([gradient8(), gradient8()[:, ::-1], np.full((H, W), 90, np.uint8)], -1))
    image = base.convert(mode) if mode != "P" else base.quantize(16)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    path = tmp_path / f"img_{mode}.{fmt.lower()}"
    image.save(path, format=fmt)
    rgb = read_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (H, W, 3)
    expected = np.asarray(Image.open(path).convert("RGB"))
    assert np.abs(rgb.astype(int) - expected).max() <= 1


def test_stage1_checks_and_views_a_16bit_image_like_its_8bit_version(tmp_path):
    grey8 = gradient8()
    for name in ("a16", "a8"):
        (tmp_path / name).mkdir()
    p16 = save_16bit(tmp_path / "a16" / "ramp.png", grey8)
    p8 = tmp_path / "a8" / "ramp.png"
    Image.fromarray(grey8).save(p8)
    assert check_image(p16, 32) is None and image_size(p16) == (W, H)
    assert scan_images([p16], 32, "error", workers=0, progress=False).good == [p16]
    cfg = load_config(PretrainConfig, None, ["loss.local_weight=0", "aug.global_size=32", "data.num_workers=0"])
    item16 = PretrainImages([p16], cfg, tmp_path / "unused_cache")[0]
    item8 = PretrainImages([p8], cfg, tmp_path / "unused_cache")[0]
    assert set(item16) == {"view_q", "view_k"}
    for key in item16:  # same pixels after scaling, same seeded augmentation: the same views
        assert torch.equal(item16[key], item8[key]), key


def test_stage2_fss_layout_and_chest_xray_read_16bit_images(tmp_path):
    grey8 = gradient8()
    mask = np.zeros((H, W), np.uint8)
    mask[10:30, 20:40] = 255
    folder = tmp_path / "fss" / "ramp"
    folder.mkdir(parents=True)
    for n in (1, 2):
        save_16bit(folder / f"{n}.jpg", grey8)  # FSS layout names images .jpg; the content is a 16-bit PNG
        Image.fromarray(mask).save(folder / f"{n}.png")
    bench = Fss1000(tmp_path / "fss", split="all")
    image, binary = bench.load(bench.sample("ramp/1"), 1)
    assert image.dtype == np.uint8 and image.shape == (H, W, 3)
    assert abs(float(image.mean()) - float(grey8.mean())) <= 1
    assert binary.sum() == 20 * 20

    xray = tmp_path / "LungSegmentation"
    (xray / "CXR_png").mkdir(parents=True)
    (xray / "masks").mkdir()
    save_16bit(xray / "CXR_png" / "CHNCXR_0001_0.png", grey8)  # X-rays are often 16-bit
    Image.fromarray(mask).save(xray / "masks" / "CHNCXR_0001_0_mask.png")
    image, binary = ChestXray(xray).load(ChestXray(xray).sample("CHNCXR_0001_0"), 1)
    assert abs(float(image.mean()) - float(grey8.mean())) <= 1 and binary.sum() == 400


# --------------------------------------------------------------------------------------------------
# case 3: decompression bombs (PIL's limit made small instead of writing a 14000 x 14000 file)


@pytest.fixture()
def small_pixel_limit(monkeypatch) -> int:
    limit = 2000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    return limit


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_read_rgb_refuses_an_image_above_the_pixel_limit(tmp_path, small_pixel_limit):
    within_2x = photo(tmp_path / "within_2x.png", size=(50, 50))  # 2500 px: PIL itself would only warn
    beyond_2x = photo(tmp_path / "beyond_2x.png", size=(80, 80))  # 6400 px: PIL raises
    for path in (within_2x, beyond_2x):
        with pytest.warns(Image.DecompressionBombWarning) if path is within_2x else nullcontext():
            with pytest.raises(DataError, match=rf"{path.name}: image is too large to decode safely"):
                read_rgb(path)
        with pytest.raises(DataError, match=rf"{path.name}: image is too large"):
            read_rgb(path.read_bytes(), path)
        with pytest.raises(DataError, match=rf"{path.name}: image is too large"):
            image_size(path)
    small = photo(tmp_path / "small.png", size=(40, 40))  # 1600 px: fine
    assert read_rgb(small).shape == (40, 40, 3)


def test_stage1_scan_lists_or_names_a_decompression_bomb(tmp_path, small_pixel_limit):
    good = photo(tmp_path / "good.png", size=(40, 40))
    bomb = photo(tmp_path / "bomb.png", size=(80, 80))
    report = scan_images([good, bomb], 16, "skip", workers=0, progress=False)
    assert report.good == [good]
    assert [p for p, _ in report.bad] == [str(bomb)] and "too large to decode safely" in report.bad[0][1]
    with pytest.raises(DataError, match=r"bomb\.png: image is too large .*data\.on_bad_image=skip"):
        scan_images([good, bomb], 16, "error", workers=0, progress=False)


def test_superpixel_cache_cli_lists_or_names_a_decompression_bomb(tmp_path, small_pixel_limit, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    photo(folder / "good.png", size=(40, 40))
    bomb = photo(folder / "bomb.png", size=(80, 80))
    args = [str(folder), "--cache-dir", str(tmp_path / "cache"), "--workers", "1", "--n-segments", "8",
            "--no-progress"]
    assert sp_cache.main([*args, "--on-bad-image", "skip"]) == 0
    out = capsys.readouterr().out
    assert f"bad image: {bomb}: image is too large to decode safely" in out
    assert "1 computed" in out and "1 bad (skipped)" in out

    assert sp_cache.main([*args, "--on-bad-image", "error"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bomb}: image is too large to decode safely")
    assert "--on-bad-image skip" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# case 9: user-input errors print the message alone


def test_user_errors_prints_the_message_alone_and_exits_2(capsys, monkeypatch):
    monkeypatch.delenv("QGNET_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        with user_errors():
            raise DataError("/data/x.png: image file is unreadable or truncated")
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == "error: /data/x.png: image file is unreadable or truncated\n"
    assert "Traceback" not in captured.err and captured.out == ""
    # every kind of user input error, weights included
    with pytest.raises(SystemExit, match="2"):
        with user_errors():
            raise WeightsError("model.init_weights: weights file not found: w.pth")
    assert capsys.readouterr().err == "error: model.init_weights: weights file not found: w.pth\n"


def test_user_errors_reraises_with_qgnet_debug_and_keeps_bugs(monkeypatch):
    monkeypatch.setenv("QGNET_DEBUG", "1")
    with pytest.raises(DataError, match="x.png"):
        with user_errors():
            raise DataError("x.png: bad")
    monkeypatch.delenv("QGNET_DEBUG")
    with pytest.raises(KeyError):  # a bug is not the user's: its traceback stays
        with user_errors():
            raise KeyError("oops")


def test_read_rgb_names_bytes_and_files_it_cannot_decode(tmp_path):
    with pytest.raises(DataError, match=r"^<bytes>: cannot decode"):
        read_rgb(b"definitely not an image")
    with pytest.raises(DataError, match=r"missing\.png: image file is missing"):
        read_rgb(tmp_path / "missing.png")
    buf = io.BytesIO()
    Image.fromarray(gradient8()).save(buf, format="PNG")
    with pytest.raises(DataError, match=r"cut\.png: image file is unreadable or truncated"):
        read_rgb(buf.getvalue()[:60], "cut.png")
