"""The CD-TG / MMT targets (WBC, CHAOS-MRI, SUIM) on tiny synthetic fixtures in their releases' layouts, and the
CHAOS preparation command from DICOM slices."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.config import load_config
from fewshot.data.base import DataError
from fewshot.data.crossdomain import ChaosMri, Suim, Wbc, suim_codes
from fewshot.data.registry import build_benchmark
from fewshot.tools.prepare_chaos import ground_to_classes, prepare_chaos, window
from finetune.config import FinetuneConfig

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def test_wbc_release_layout_binarises_the_whole_cell(tmp_path):
    root = tmp_path / "segmentation_WBC"
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6], mask[3:5, 3:5] = 128, 255                        # cytoplasm ring around a nucleus
    for sub, n in (("Dataset 1", 3), ("Dataset 2", 2)):
        for i in range(1, n + 1):
            save(root / sub / f"{i:03d}.bmp", RNG.integers(0, 256, (8, 8, 3)))
            save(root / sub / f"{i:03d}.png", mask)
    bench = build_benchmark(load_config(FinetuneConfig, None, ["data.benchmark=wbc", f"data.root={tmp_path}"]).data,
                            "test")
    assert isinstance(bench, Wbc) and bench.class_names == {1: "white blood cell"}
    assert [s.key for s in bench.samples_by_class[1]][:2] == ["Dataset 1/001", "Dataset 1/002"]
    image, episode_mask = bench.load(bench.samples_by_class[1][4], 1)
    assert image.shape == (8, 8, 3) and episode_mask.sum() == 16 and len(bench.samples_by_class[1]) == 5
    (root / "Dataset 2" / "002.png").unlink()
    with pytest.raises(DataError, match="002.png: mask not found"):
        Wbc(root)


def test_suim_colour_codes_give_eight_classes(tmp_path):
    colours = {1: (0, 0, 0), 2: (0, 0, 255), 3: (0, 255, 0), 4: (0, 255, 255), 5: (255, 0, 0), 6: (255, 0, 255),
               7: (255, 255, 0), 8: (255, 255, 255)}
    mask = np.zeros((4, 8, 3), np.uint8)
    for c, rgb in colours.items():
        mask[:, c - 1] = rgb
    mask[0, 0] = (20, 10, 30)                                        # near-black is still waterbody
    root = tmp_path / "SUIM"
    save(root / "train_val/images/d_r_1_.jpg", RNG.integers(0, 256, (4, 8, 3)))
    save(root / "train_val/masks/d_r_1_.bmp", mask)
    only_fish = np.zeros((4, 8, 3), np.uint8)
    only_fish[1:3, 2:5] = (250, 240, 5)
    save(root / "TEST/images/f_1_.jpg", RNG.integers(0, 256, (4, 8, 3)))
    save(root / "TEST/masks/f_1_.bmp", only_fish)
    assert suim_codes(root / "train_val/masks/d_r_1_.bmp")[0].tolist() == list(range(1, 9))
    bench = Suim(root)
    assert bench.class_names[7] == "fish" and bench.query_classes("TEST/f_1_") == [1, 7]
    assert [len(bench.samples_by_class[c]) for c in range(1, 9)] == [2, 1, 1, 1, 1, 1, 2, 1]
    _, fish = bench.load(bench.sample("TEST/f_1_"), 7)
    assert fish.sum() == 6 and bench.foreground_pixels(bench.sample("TEST/f_1_")) == 6


def write_dicom(path: Path, pixels: np.ndarray) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)


def test_chaos_dicom_volumes_become_indexed_slices(tmp_path):
    mr = tmp_path / "MR"
    ground = np.zeros((4, 6, 6), np.uint8)                           # the last slice shows no organ
    ground[0, :2, :2] = 63                                           # liver
    ground[1, :2, :2], ground[1, 4:, 4:] = 126, 252                  # right kidney + spleen
    ground[2, 3:, :3] = 189                                          # left kidney
    for patient in ("1", "10"):
        for s in range(4):
            write_dicom(mr / patient / "T2SPIR/DICOM_anon" / f"IMG-0001-{s + 1:05d}.dcm",
                        np.full((6, 6), 100 * s, np.uint16) + np.arange(6, dtype=np.uint16))
            save(mr / patient / "T2SPIR/Ground" / f"IMG-0001-{s + 1:05d}.png", ground[s])
    counts = prepare_chaos(mr, tmp_path / "CHAOS-MRI")
    assert counts == {"patients": 2, "slices": 8, "indexed": 6, "without organ": 2, "liver": 2, "right kidney": 2,
                      "left kidney": 2, "spleen": 2}
    with open(tmp_path / "CHAOS-MRI/index.csv") as handle:
        assert list(csv.reader(handle))[:3] == [["key", "classes"], ["1_T2SPIR_000", "1"], ["1_T2SPIR_001", "2 4"]]
    bench = ChaosMri(tmp_path / "CHAOS-MRI")
    image, spleen = bench.load(bench.sample("10_T2SPIR_001"), 4)
    assert image.shape == (6, 6, 3) and spleen.sum() == 4 and spleen[4:, 4:].all()


def test_chaos_helpers_and_errors(tmp_path):
    assert ground_to_classes(np.array([[0, 60, 130, 190, 250, 100]])).tolist() == [[0, 1, 2, 3, 4, 0]]
    assert window(np.array([[[0, 50, 100]]]), 0, 100).tolist() == [[[0, 128, 255]]]
    with pytest.raises(DataError, match="index.csv: not found; write the slices with"):
        ChaosMri(tmp_path)
    with pytest.raises(DataError, match="no <patient>/T2SPIR/DICOM_anon/ folder"):
        prepare_chaos(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("name", ["wbc", "chaos", "suim"])
def test_target_configs_load(name):
    cfg = load_config(FinetuneConfig, REPO / f"configs/finetune/cdfss_{name}.yaml")
    assert cfg.eval.episodes == 600 and cfg.data.eval_size == 401 and cfg.data.benchmark.startswith(name[:4])
