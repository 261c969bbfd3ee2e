"""Cross-domain benchmarks (ISIC, Chest X-ray, Deepglobe, Kvasir) and their preparation commands."""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot.data.base import DataError, FewShotBenchmark
from fewshot.data.crossdomain import (
    CROSS_DOMAIN,
    ISIC_CLASS_CSV,
    ChestXray,
    Deepglobe,
    Isic2018,
    KvasirSeg,
    read_binary_mask,
    read_isic_class_csv,
)
from fewshot.tools.prepare_deepglobe import grid_tiles, prepare_deepglobe
from fewshot.tools.prepare_deepglobe import main as deepglobe_main
from fewshot.tools.prepare_isic import main as isic_main
from fewshot.tools.prepare_isic import prepare_isic

RNG = np.random.default_rng(0)


def save_rgb(path: Path, size: tuple[int, int] = (12, 10)) -> np.ndarray:
    """A random RGB image ``size = (H, W)`` written losslessly as PNG, or as JPEG by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = RNG.integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def save_mask(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8)).save(path)


def ramp_mask(size: tuple[int, int] = (12, 10)) -> np.ndarray:
    """Gray values 0..255 with 127 and 128 both present: the binarisation edge."""
    values = np.zeros(size, np.uint8)
    values.flat[:4] = [0, 127, 128, 255]
    values[size[0] // 2:] = 200
    return values


# --------------------------------------------------------------------------------------------------
# synthetic layouts


def make_kvasir(root: Path, ids: tuple[str, ...] = ("a", "b")) -> Path:
    for i in ids:
        save_rgb(root / "images" / f"{i}.jpg")
        save_mask(root / "masks" / f"{i}.png", ramp_mask())
    return root


def make_chest(root: Path) -> Path:
    for key in ("CHNCXR_0001_0", "CHNCXR_0002_0"):
        save_mask(root / "CXR_png" / f"{key}.png", RNG.integers(0, 256, (12, 10)))  # 8-bit grayscale
        save_mask(root / "masks" / f"{key}_mask.png", ramp_mask())
    save_mask(root / "CXR_png" / "CHNCXR_0003_0.png", np.zeros((12, 10)))  # no mask: not annotated
    save_mask(root / "CXR_png" / "MCUCXR_0001_0.png", np.zeros((12, 10)))
    save_mask(root / "masks" / "MCUCXR_0001_0.png", ramp_mask())  # Montgomery naming
    return root


def make_isic_folders(root: Path) -> Path:
    for class_id, ids in {1: ["ISIC_0000000", "ISIC_0000001"], 2: ["ISIC_0012086"], 3: ["ISIC_0000004"]}.items():
        for i in ids:
            save_rgb(root / Isic2018.IMAGES / str(class_id) / f"{i}.jpg")
            save_mask(root / Isic2018.MASKS / f"{i}_segmentation.png", ramp_mask())
    return root


def make_isic_flat(root: Path, classes: dict[str, str]) -> Path:
    for i in classes:
        save_rgb(root / "images" / f"{i}.jpg")
        save_mask(root / "masks" / f"{i}_segmentation.png", ramp_mask())
    write_csv(root / "class_id.csv", classes)
    return root


def write_csv(path: Path, classes: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("ID,Class\n" + "".join(f"{i},{c}\n" for i, c in classes.items()))
    return path


# --------------------------------------------------------------------------------------------------
# loaders


def test_registry_and_protocol_configs(repo_root):
    from common.config import load_config
    from finetune.config import FinetuneConfig

    assert CROSS_DOMAIN == {"isic": Isic2018, "chest_xray": ChestXray, "deepglobe": Deepglobe, "kvasir": KvasirSeg}
    for name, cls in CROSS_DOMAIN.items():
        assert issubclass(cls, FewShotBenchmark)
        cfg = load_config(FinetuneConfig, repo_root / "configs" / "finetune" / f"cdfss_{name}.yaml")
        assert cfg.data.benchmark == name and cfg.eval.episodes == 600 and cfg.data.eval_size == 401


def test_mask_binarised_at_128(tmp_path):
    bench = KvasirSeg(make_kvasir(tmp_path / "Kvasir-SEG"))
    assert bench.split == "test" and bench.class_ids == [1] and bench.name == "kvasir"
    sample = bench.samples_by_class[1][0]
    image, mask = bench.load(sample, 1)
    assert image.shape == (12, 10, 3) and image.dtype == np.uint8
    assert mask.dtype == np.uint8 and mask.shape == (12, 10)
    assert mask.flat[:4].tolist() == [0, 0, 1, 1]  # 0, 127 -> 0; 128, 255 -> 1
    assert mask.sum() == 2 + 6 * 10
    assert bench.foreground_pixels(sample) == 62


def test_colour_mask_reduced_to_luminance(tmp_path):
    values = np.zeros((4, 4, 3), np.uint8)
    values[0] = 255  # white -> 1
    values[1] = (0, 0, 255)  # pure blue has luminance 29 -> 0
    save_mask(tmp_path / "m.png", values)
    assert read_binary_mask(tmp_path / "m.png").sum(axis=1).tolist() == [4, 0, 0, 0]


def test_kvasir_accepts_official_jpeg_masks(tmp_path):
    root = make_kvasir(tmp_path / "Kvasir-SEG", ids=("a",))
    (root / "masks" / "a.png").rename(root / "masks" / "a.jpg")
    sample = KvasirSeg(root).samples_by_class[1][0]
    assert sample.mask_path.endswith("a.jpg")


def test_chest_xray_grayscale_becomes_rgb_and_exclusions_are_counted(tmp_path):
    root = make_chest(tmp_path / "LungSegmentation")
    bench = ChestXray(root)
    assert [s.key for s in bench.samples_by_class[1]] == ["CHNCXR_0001_0", "CHNCXR_0002_0"]
    image, mask = bench.load(bench.sample("CHNCXR_0001_0"), 1)
    gray = np.asarray(Image.open(root / "CXR_png" / "CHNCXR_0001_0.png"))
    assert image.shape == (12, 10, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], gray)
    assert set(np.unique(mask).tolist()) == {0, 1}
    assert bench.excluded == {"masks not named <id>_mask.png (Montgomery set)": 1, "images without a mask": 2}


def test_chest_xray_mask_without_image_is_an_error(tmp_path):
    root = make_chest(tmp_path / "LungSegmentation")
    (root / "CXR_png" / "CHNCXR_0002_0.png").unlink()
    with pytest.raises(DataError, match=r"CXR_png/CHNCXR_0002_0\.png: image not found"):
        ChestXray(root)


def test_isic_class_folders(tmp_path):
    bench = Isic2018(make_isic_folders(tmp_path / "ISIC"))
    assert bench.class_ids == [1, 2, 3]
    assert bench.class_names == {1: "nevus", 2: "seborrheic keratosis", 3: "melanoma"}
    keys = {c: [s.key for s in samples] for c, samples in bench.samples_by_class.items()}
    assert keys == {1: ["ISIC_0000000", "ISIC_0000001"], 2: ["ISIC_0012086"], 3: ["ISIC_0000004"]}
    sample = bench.sample("ISIC_0012086")
    assert sample.mask_path.endswith(f"{Isic2018.MASKS}/ISIC_0012086_segmentation.png")
    assert bench.load(sample, 2)[1].flat[:4].tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="not annotated for class 1"):
        bench.load(sample, 1)


def test_isic_image_in_two_class_folders_is_an_error(tmp_path):
    root = make_isic_folders(tmp_path / "ISIC")
    save_rgb(root / Isic2018.IMAGES / "3" / "ISIC_0000000.jpg")
    with pytest.raises(DataError, match="ISIC_0000000 is also in"):
        Isic2018(root)


def test_isic_flat_layout_with_csv(tmp_path):
    classes = {"ISIC_1": "nevus", "ISIC_2": "seborrheic_keratosis", "ISIC_3": "melanoma", "ISIC_4": "melanoma"}
    bench = Isic2018(make_isic_flat(tmp_path / "ISIC", classes))
    assert {c: [s.key for s in v] for c, v in bench.samples_by_class.items()} == {
        1: ["ISIC_1"], 2: ["ISIC_2"], 3: ["ISIC_3", "ISIC_4"]}
    assert bench.excluded == {}


def test_isic_flat_unlisted_image_error_or_counted_skip(tmp_path):
    classes = {"ISIC_1": "nevus", "ISIC_2": "seborrheic_keratosis", "ISIC_3": "melanoma"}
    root = make_isic_flat(tmp_path / "ISIC", classes)
    save_rgb(root / "images" / "ISIC_9.jpg")
    save_mask(root / "masks" / "ISIC_9_segmentation.png", ramp_mask())
    with pytest.raises(DataError, match=r"images/ISIC_9\.jpg: ISIC_9 is not in the class csv"):
        Isic2018(root)
    bench = Isic2018(root, skip_unlisted=True)
    assert bench.excluded == {"not in the class csv": 1}
    assert "excluded 1 (not in the class csv)" in repr(bench)
    other_csv = write_csv(tmp_path / "other.csv", {"ISIC_1": "melanoma", "ISIC_2": "nevus", "ISIC_3": "nevus",
                                                   "ISIC_9": "seborrheic_keratosis"})
    assert [s.key for s in Isic2018(root, class_csv=other_csv).samples_by_class[2]] == ["ISIC_9"]


def test_isic_csv_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,Class\nISIC_1,nevus\nISIC_2,naevus\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: .*'ISIC_2,naevus'"):
        read_isic_class_csv(bad)
    bad.write_text("ID,Class\nISIC_1,nevus\nISIC_1,melanoma\n")
    with pytest.raises(DataError, match="ISIC_1 is listed twice"):
        read_isic_class_csv(bad)


def test_deepglobe_keys_are_per_class(tmp_path):
    root = tmp_path / "Deepglobe"
    for class_id in range(1, 7):
        for tile in ("100_00", "200_11") if class_id == 1 else ("100_00",):
            save_rgb(root / str(class_id) / "test" / "origin" / f"{tile}.jpg")
            save_mask(root / str(class_id) / "test" / "groundtruth" / f"{tile}.png", ramp_mask() * (class_id == 1))
    bench = Deepglobe(root)
    assert bench.class_ids == [1, 2, 3, 4, 5, 6] and bench.class_names[5] == "water"
    assert [s.key for s in bench.samples_by_class[1]] == ["1/100_00", "1/200_11"]
    assert bench.load(bench.sample("1/100_00"), 1)[1].sum() == 62
    assert bench.load(bench.sample("4/100_00"), 4)[1].sum() == 0
    with pytest.raises(ValueError):
        bench.load(bench.sample("4/100_00"), 1)


def test_deepglobe_missing_class_folder(tmp_path):
    save_rgb(tmp_path / "Deepglobe" / "1" / "test" / "origin" / "t.jpg")
    save_mask(tmp_path / "Deepglobe" / "1" / "test" / "groundtruth" / "t.png", ramp_mask())
    with pytest.raises(DataError, match=r"Deepglobe/2/test/origin: folder not found"):
        Deepglobe(tmp_path / "Deepglobe")


def test_missing_mask_is_named_at_index_and_at_load(tmp_path):
    root = make_kvasir(tmp_path / "Kvasir-SEG")
    (root / "masks" / "b.png").unlink()
    with pytest.raises(DataError, match=r"masks/b\.png: mask not found for image .*images/b\.jpg"):
        KvasirSeg(root)
    root = make_kvasir(tmp_path / "Kvasir2")
    bench = KvasirSeg(root)
    (root / "masks" / "a.png").unlink()
    with pytest.raises(DataError, match=r"Kvasir2/masks/a\.png: label file is missing"):
        bench.load(bench.sample("a"), 1)


def test_truncated_image_is_named(tmp_path):
    root = make_kvasir(tmp_path / "Kvasir-SEG")
    save_rgb(root / "images" / "a.jpg", size=(64, 64))
    save_mask(root / "masks" / "a.png", np.zeros((64, 64)))
    data = (root / "images" / "a.jpg").read_bytes()
    (root / "images" / "a.jpg").write_bytes(data[: len(data) // 2])
    bench = KvasirSeg(root)
    with pytest.raises(DataError, match=r"images/a\.jpg: image file is unreadable or truncated"):
        bench.load(bench.sample("a"), 1)
    (root / "images" / "a.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"images/a\.jpg: cannot decode: unreadable image file"):
        bench.load(bench.sample("a"), 1)


def test_size_mismatch_names_both_files(tmp_path):
    root = make_kvasir(tmp_path / "Kvasir-SEG")
    save_mask(root / "masks" / "b.png", np.zeros((12, 11)))
    bench = KvasirSeg(root)
    with pytest.raises(DataError, match=r"images/b\.jpg: image is 10x12 but its mask .*masks/b\.png is 11x12"):
        bench.load(bench.sample("b"), 1)


def test_empty_benchmark_is_an_error(tmp_path):
    (tmp_path / "LungSegmentation" / "masks").mkdir(parents=True)
    with pytest.raises(DataError, match=r"LungSegmentation: no samples for class 1 \(lungs\)"):
        ChestXray(tmp_path / "LungSegmentation")


def test_unrecognised_isic_layout(tmp_path):
    (tmp_path / "ISIC").mkdir()
    with pytest.raises(DataError, match="prepare_isic"):
        Isic2018(tmp_path / "ISIC")


# --------------------------------------------------------------------------------------------------
# shipped ISIC class csv and prepare_isic


def test_shipped_isic_csv_is_patnets():
    classes = read_isic_class_csv(ISIC_CLASS_CSV)
    assert len(classes) == 2594  # the ISIC-2018 task 1 training set
    assert Counter(classes.values()) == {1: 1867, 2: 208, 3: 519}
    assert list(classes) == sorted(classes) and next(iter(classes)) == "ISIC_0000000"
    assert classes["ISIC_0016072"] == 1 and classes["ISIC_0012086"] == 2 and classes["ISIC_0000004"] == 3


def test_prepare_isic_builds_class_folders(tmp_path, capsys):
    src = tmp_path / "download"
    classes = {"ISIC_0000000": "nevus", "ISIC_0000001": "nevus", "ISIC_0012086": "seborrheic_keratosis",
               "ISIC_0000004": "melanoma"}
    for i in [*classes, "ISIC_9999999"]:
        save_rgb(src / "ISIC2018_Task1-2_Training_Input" / f"{i}.jpg")
        save_mask(src / "GroundTruth" / f"{i}_segmentation.png", ramp_mask())
    csv_path = write_csv(tmp_path / "class_id.csv", classes)
    out = tmp_path / "ISIC"
    assert isic_main(["--input", str(src / "ISIC2018_Task1-2_Training_Input"), "--out", str(out),
                      "--class-csv", str(csv_path), "--masks", str(src / "GroundTruth")]) == 0
    printed = capsys.readouterr().out
    assert "class 1 (nevus): 2 images" in printed and "total: 4 images" in printed
    assert "1 image(s)" in printed and "ISIC_9999999.jpg" in printed  # unlisted: reported, not filed
    linked = out / Isic2018.IMAGES / "2" / "ISIC_0012086.jpg"
    assert os.path.samefile(linked, src / "ISIC2018_Task1-2_Training_Input" / "ISIC_0012086.jpg")
    bench = Isic2018(out)
    assert {c: len(v) for c, v in bench.samples_by_class.items()} == {1: 2, 2: 1, 3: 1}
    # in place (PATNet's layout): class folders inside the input folder, masks already beside it
    assert prepare_isic(src / "ISIC2018_Task1-2_Training_Input", src, csv_path) == {1: 2, 2: 1, 3: 1}
    assert prepare_isic(src / "ISIC2018_Task1-2_Training_Input", src, csv_path) == {1: 2, 2: 1, 3: 1}  # rerun


def test_prepare_isic_names_first_missing_input_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "in"
    save_rgb(src / "ISIC_0000001.jpg")
    csv_path = write_csv(tmp_path / "c.csv", {"ISIC_0000000": "nevus", "ISIC_0000001": "nevus",
                                              "ISIC_0000002": "melanoma"})
    assert isic_main(["--input", str(src), "--out", str(tmp_path / "out"), "--class-csv", str(csv_path)]) == 1
    err = capsys.readouterr().err
    assert "ISIC_0000000.jpg: missing input" in err and "2 of 3 inputs are missing" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="ISIC_0000000.jpg: missing input .* 2593 of 2594"):
        prepare_isic(src, tmp_path / "out")  # the shipped csv: the full ISIC-2018 task 1 set is expected


# --------------------------------------------------------------------------------------------------
# prepare_deepglobe

AGRI, URBAN, RANGE, FOREST, WATER, BARREN, UNKNOWN = ((255, 255, 0), (0, 255, 255), (255, 0, 255), (0, 255, 0),
                                                      (0, 0, 255), (255, 255, 255), (0, 0, 0))


def deepglobe_masks() -> dict[str, np.ndarray]:
    """Two 24x24 colour masks, cut 2x2 into 12x12 tiles (144 px; a colour needs > 4.8% = 7 px to count)."""
    a = np.zeros((24, 24, 3), np.uint8)
    a[:12, :12] = AGRI  # (0,0) one colour -> dropped
    a[:12, 12:18], a[:12, 18:] = URBAN, WATER  # (0,1) -> classes 2, 5
    a[12:, :12] = AGRI
    a[12, :7] = UNKNOWN  # (1,0) 7 px unknown (4.86%) -> kept, class 1
    a[12:, 12:] = FOREST
    a[12, 12:18] = BARREN  # (1,1) 6 px barren (4.17%) -> dropped
    b = np.zeros((24, 24, 3), np.uint8)
    b[:12, :12] = UNKNOWN
    b[:6, :12] = (10, 10, 10)  # (0,0) unknown + an off-palette colour -> kept, filed nowhere
    b[:12, 12:16], b[:12, 16:20], b[:12, 20:] = RANGE, BARREN, AGRI  # (0,1) -> classes 1, 3, 6
    b[12:, :12] = UNKNOWN  # (1,0) one colour -> dropped
    b[12:, 12:18], b[12:, 18:] = FOREST, WATER  # (1,1) -> classes 4, 5
    return {"100": a, "200": b}


def make_deepglobe_input(folder: Path) -> dict[str, np.ndarray]:
    images = {}
    for stem, mask in deepglobe_masks().items():
        images[stem] = save_rgb(folder / f"{stem}_sat.jpg", size=(24, 24))
        save_mask(folder / f"{stem}_mask.png", mask)
    return images


def test_grid_bounds_follow_patnet():
    assert [(r.start, r.stop) for i, j, r, c in grid_tiles(10, 10, 3) if j == 0] == [(0, 3), (3, 6), (6, 10)]
    assert len(list(grid_tiles(2448, 2448, 6))) == 36
    assert {(r.stop - r.start, c.stop - c.start) for _, _, r, c in grid_tiles(2448, 2448, 6)} == {(408, 408)}


def test_prepare_deepglobe_tiles_filters_and_files(tmp_path):
    make_deepglobe_input(tmp_path / "train")
    out = tmp_path / "Deepglobe"
    report = prepare_deepglobe(tmp_path / "train", out, grid=2)
    assert (report.pairs, report.tiles, report.kept, report.unfiled) == (2, 8, 5, 1)
    assert report.per_class == {1: 2, 2: 1, 3: 1, 4: 1, 5: 2, 6: 1}
    listing = {c: sorted(p.stem for p in (out / str(c) / "test" / "origin").glob("*.jpg")) for c in range(1, 7)}
    assert listing == {1: ["100_10", "200_01"], 2: ["100_01"], 3: ["200_01"], 4: ["200_11"], 5: ["100_01", "200_11"],
                       6: ["200_01"]}
    for c in range(1, 7):
        assert sorted(p.stem for p in (out / str(c) / "test" / "groundtruth").glob("*.png")) == listing[c]
    urban = np.asarray(Image.open(out / "2" / "test" / "groundtruth" / "100_01.png"))
    expected = np.zeros((12, 12), np.uint8)
    expected[:, :6] = 255
    np.testing.assert_array_equal(urban, expected)
    assert os.path.samefile(out / "1/test/origin/200_01.jpg", out / "6/test/origin/200_01.jpg")
    bench = Deepglobe(out)
    image, mask = bench.load(bench.sample("5/100_01"), 5)
    assert image.shape == (12, 12, 3) and mask.sum() == 6 * 12 and mask[:, 6:].all()
    with pytest.raises(DataError, match="already exists"):
        prepare_deepglobe(tmp_path / "train", out, grid=2)


def test_prepare_deepglobe_image_tiles_match_the_source(tmp_path):
    images = make_deepglobe_input(tmp_path / "train")
    prepare_deepglobe(tmp_path / "train", tmp_path / "out", grid=2)
    source = np.asarray(Image.open(tmp_path / "train" / "100_sat.jpg").convert("RGB")).astype(int)
    tile = np.asarray(Image.open(tmp_path / "out" / "1" / "test" / "origin" / "100_10.jpg")).astype(int)
    assert tile.shape == (12, 12, 3) and images["100"].shape == (24, 24, 3)
    assert np.abs(tile - source[12:, :12]).mean() < 12  # same pixels, JPEG-encoded twice


def test_prepare_deepglobe_cli_counts_and_assertion(tmp_path, capsys):
    make_deepglobe_input(tmp_path / "train")
    assert deepglobe_main(["--input", str(tmp_path / "train"), "--out", str(tmp_path / "a"), "--grid", "2"]) == 0
    printed = capsys.readouterr().out
    assert "2 image/mask pairs -> 8 tiles, 5 kept (1 of them match no class colour" in printed
    assert "class 5 (water): 2 tiles" in printed and "not asserted" in printed
    assert deepglobe_main(["--input", str(tmp_path / "train"), "--out", str(tmp_path / "b"), "--grid", "2",
                           "--expect-tiles", "6"]) == 1
    assert "kept 5 tiles, expected 6" in capsys.readouterr().err


def test_prepare_deepglobe_asserts_the_count_on_the_full_set(tmp_path, capsys, monkeypatch):
    import fewshot.tools.prepare_deepglobe as prep

    make_deepglobe_input(tmp_path / "train")
    monkeypatch.setattr(prep, "FULL_PAIRS", 2)  # pretend the 2 synthetic pairs are the full set at the standard grid
    monkeypatch.setattr(prep, "GRID", 2)
    monkeypatch.setattr(prep, "FULL_KEPT_TILES", 5)
    assert deepglobe_main(["--input", str(tmp_path / "train"), "--out", str(tmp_path / "a")]) == 0
    assert "class 1 (agriculture): 2 tiles  (IFA reports 6891)" in capsys.readouterr().out
    monkeypatch.setattr(prep, "FULL_KEPT_TILES", 6)
    assert deepglobe_main(["--input", str(tmp_path / "train"), "--out", str(tmp_path / "b")]) == 1
    assert "kept 5 tiles, expected 6" in capsys.readouterr().err


def test_prepare_deepglobe_names_the_missing_partner(tmp_path, capsys):
    make_deepglobe_input(tmp_path / "train")
    (tmp_path / "train" / "200_mask.png").unlink()
    assert deepglobe_main(["--input", str(tmp_path / "train"), "--out", str(tmp_path / "out"), "--grid", "2"]) == 1
    assert "200_mask.png: missing, but 200_sat.jpg is there" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prepare_deepglobe_size_mismatch_is_named(tmp_path):
    make_deepglobe_input(tmp_path / "train")
    save_mask(tmp_path / "train" / "200_mask.png", np.zeros((24, 22, 3)))
    with pytest.raises(DataError, match=r"200_sat\.jpg: image is 24x24 but its mask .*200_mask\.png is 22x24"):
        prepare_deepglobe(tmp_path / "train", tmp_path / "out", grid=2)


def test_prepare_deepglobe_parallel_equals_serial(tmp_path):
    make_deepglobe_input(tmp_path / "train")
    serial = prepare_deepglobe(tmp_path / "train", tmp_path / "s", grid=2)
    parallel = prepare_deepglobe(tmp_path / "train", tmp_path / "p", grid=2, workers=2)
    assert serial == parallel
    for path in sorted((tmp_path / "s").rglob("*.png")):
        np.testing.assert_array_equal(np.asarray(Image.open(path)),
                                      np.asarray(Image.open(tmp_path / "p" / path.relative_to(tmp_path / "s"))))


# --------------------------------------------------------------------------------------------------
# real samples (skipped without ../shared/data)


@pytest.mark.parametrize("cls, folder, count", [(ChestXray, "LungSegmentation", 10), (KvasirSeg, "Kvasir-SEG", 5)])
def test_real_samples_load(shared_data, cls, folder, count):
    bench = cls(shared_data / "cdfss-samples" / folder)
    samples = bench.samples_by_class[1]
    assert len(samples) == count
    for sample in samples:
        image, mask = bench.load(sample, 1)
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
        assert mask.shape == image.shape[:2] and set(np.unique(mask).tolist()) == {0, 1}
        assert 0 < bench.foreground_pixels(sample) < mask.size


def test_real_isic_flat_layout(shared_data, tmp_path):
    root = shared_data / "cdfss-samples" / "ISIC"
    ids = sorted(p.stem for p in (root / "images").glob("*.jpg"))
    assert len(ids) == 5
    # these are HAM10000 (ISIC task 3) images, so PATNet's task-1 csv does not list them
    with pytest.raises(DataError, match=f"{ids[0]} is not in the class csv"):
        Isic2018(root)
    names = ["nevus", "seborrheic_keratosis", "melanoma", "melanoma", "nevus"]
    csv_path = write_csv(tmp_path / "class_id.csv", dict(zip(ids, names)))
    bench = Isic2018(root, class_csv=csv_path)
    assert {c: len(v) for c, v in bench.samples_by_class.items()} == {1: 2, 2: 1, 3: 2}
    for class_id, samples in bench.samples_by_class.items():
        for sample in samples:
            image, mask = bench.load(sample, class_id)
            assert image.shape == (450, 600, 3) and mask.shape == (450, 600)
            assert set(np.unique(mask).tolist()) == {0, 1}
    with csv_path.open() as handle:
        assert len(list(csv.reader(handle))) == 6
