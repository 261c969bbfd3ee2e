"""Reliability of masks in stage 2: 0/1 masks in FSS layouts, evaluations where episodes are skipped, and bad
test-split pairs found before training. Fixtures are tiny FSS-layout folders drawn in ``tmp_path``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image
from torch import nn

import finetune.evaluate as stage2_eval
from common.config import load_config
from common.errors import DataError
from fewshot.data.crossdomain import KvasirSeg, read_binary_mask
from fewshot.data.episodes import make_episodes
from fewshot.data.fss import Fss1000
from fewshot.evaluate import EvalSpec, check_episodes, evaluate
from fewshot.segmenter import SegmenterOutput
from finetune.config import FinetuneConfig

W, H = 40, 30
THRESHOLD_MESSAGE = r"masks are binarised at 128 .*this mask's maximum is 1"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)


def photo(seed: int, size: tuple[int, int] = (W, H)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def square_mask(foreground: int, size: tuple[int, int] = (W, H)) -> Image.Image:
    """A grey mask with a square of value ``foreground`` (255 in a good FSS mask, 1 in a class-index mask)."""
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[5:20, 8:28] = foreground
    return Image.fromarray(mask)


def fss_class(root: Path, name: str, foreground: int = 255, n: int = 3) -> Path:
    """``root/name/<i>.jpg + <i>.png`` for i = 1..n."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, n + 1):
        photo(sum(map(ord, name)) * 10 + i).save(folder / f"{i}.jpg")
        square_mask(foreground).save(folder / f"{i}.png")
    return folder


class ConstantSegmenter(nn.Module):
    """Predicts foreground everywhere; the evaluation core only needs ``SegmenterOutput(logits=...)``."""

    def forward(self, query: torch.Tensor, supports: torch.Tensor, support_masks: torch.Tensor) -> SegmenterOutput:
        logits = torch.zeros(query.shape[0], 2, *query.shape[-2:])
        logits[:, 1] = 1.0
        return SegmenterOutput(logits=logits)


def spec(**kw) -> EvalSpec:
    return EvalSpec(**{"shot": 1, "episodes": 12, "size": 33, "on_bad_sample": "skip", **kw})


# --------------------------------------------------------------------------------------------------
# case 2: 0/1 masks in an FSS layout


def test_zero_one_fss_mask_names_the_threshold_and_its_maximum(tmp_path):
    folder = fss_class(tmp_path, "indexed", foreground=1)
    bench = Fss1000(tmp_path, split="all")
    sample = bench.sample("indexed/1")
    with pytest.raises(DataError, match=rf"{folder / '1.png'}: FSS-layout {THRESHOLD_MESSAGE}"):
        bench.load(sample, 1)
    # what the evaluation (and training) reports without skip: the file and the reason, not the class
    with pytest.raises(DataError, match=THRESHOLD_MESSAGE) as info:
        check_episodes(bench, spec(on_bad_sample="error"), [0])
    assert "indexed/" in str(info.value) and "no pixel of its episode class" not in str(info.value)


def test_zero_one_cross_domain_mask_names_the_threshold(tmp_path):
    root = tmp_path / "Kvasir-SEG"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    photo(0).save(root / "images" / "a.jpg")
    square_mask(1).save(root / "masks" / "a.png")
    bench = KvasirSeg(root)
    with pytest.raises(DataError, match=rf"a\.png: cross-domain \(PATNet\) {THRESHOLD_MESSAGE}"):
        bench.load(bench.sample("a"), 1)
    assert bench.foreground_pixels(bench.sample("a")) == 0  # counting does not raise


def test_empty_and_good_masks_are_unchanged(tmp_path):
    fss_class(tmp_path, "good")
    empty = fss_class(tmp_path, "empty", foreground=0)
    bench = Fss1000(tmp_path, split="all")
    assert bench.load(bench.sample("good/1"), 1)[1].sum() == 15 * 20
    assert bench.load(bench.sample("empty/1"), 2)[1].sum() == 0  # truly empty: the loader's check names it
    with pytest.raises(DataError, match=rf"{empty / '1.png'}: query mask has no pixel of its episode class"):
        check_episodes(Fss1000(tmp_path, classes=["empty"]), spec(on_bad_sample="error"), [0])
    # a mask with a faint anti-aliased edge below 128 and a real 255 foreground is fine
    square = np.asarray(square_mask(255)).copy()
    square[4, 8:28] = 60
    Image.fromarray(square).save(empty.parent / "good" / "2.png")
    assert read_binary_mask(empty.parent / "good" / "2.png").sum() == 15 * 20


def test_evaluation_with_every_episode_skipped_is_an_error_not_a_number(tmp_path):
    fss_class(tmp_path, "indexed", foreground=1)
    bench = Fss1000(tmp_path, split="all")
    accelerator = Accelerator(cpu=True)
    with pytest.warns(UserWarning, match="skipped episode"):
        with pytest.raises(DataError, match=r"all 4 episodes were skipped as bad input, nothing was scored "
                                            rf"\(first: episode \d+: .*{THRESHOLD_MESSAGE}"):
            evaluate(ConstantSegmenter(), bench, spec(episodes=4), 0, accelerator)
    with pytest.raises(DataError, match=r"pairs of the evaluation episodes: all \d+ episodes were skipped"):
        check_episodes(bench, spec(episodes=4), [0])


def test_skipped_share_above_max_skipped_is_an_error_with_the_count(tmp_path):
    fss_class(tmp_path, "good")
    fss_class(tmp_path, "indexed", foreground=1)
    bench = Fss1000(tmp_path, split="all")
    bad_class = next(c for c, name in bench.class_names.items() if name == "indexed")
    episodes = make_episodes(bench, 1, 12, 0, "cycle")
    n_bad = sum(e.class_id == bad_class for e in episodes)
    assert 0 < n_bad < 12
    accelerator = Accelerator(cpu=True)
    with pytest.warns(UserWarning, match="skipped episode"):
        with pytest.raises(DataError, match=rf"seed 0: {n_bad} of 12 episodes \({100 * n_bad / 12:.1f}%\) were "
                                            r"skipped as bad input, more than the allowed 10%"):
            evaluate(ConstantSegmenter(), bench, spec(max_skipped=0.1), 0, accelerator)
    # below the bound the skips are counted and reported, and the rest is scored
    with pytest.warns(UserWarning, match="skipped episode"):
        result = evaluate(ConstantSegmenter(), bench, spec(max_skipped=0.9), 0, accelerator)
    assert len(result["skipped"]) == n_bad and result["meter"]["episodes"] == 12 - n_bad
    assert all("maximum is 1" in s for s in result["skipped"])
    # the check before any work: the same bound over the (image, class) pairs
    bad_pairs = check_episodes(bench, spec(max_skipped=0.9), [0])
    assert bad_pairs and all("indexed/" in b for b in bad_pairs)
    with pytest.raises(DataError, match=rf"{len(bad_pairs)} of \d+ episodes .* more than the allowed 10%"):
        check_episodes(bench, spec(max_skipped=0.1), [0])


# --------------------------------------------------------------------------------------------------
# case 6: the stage-2 test split is read before training


def check_eval_split(cfg: FinetuneConfig) -> object:
    """finetune.evaluate's read of every pair the evaluation will use (one benchmark per data source)."""
    benches = stage2_eval.eval_benchmarks(cfg)
    stage2_eval.check_eval_splits(cfg, benches)
    return benches


def eval_cfg(root: Path, test_class: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [
        "data.benchmark=fss1000", f"data.root={root}", f"data.fss_classes={{test: [{test_class}]}}",
        "data.eval_size=33", "eval.episodes=4", "eval.seeds=[0]", "eval.num_workers=0"])


def test_check_eval_split_names_a_query_mask_without_foreground(tmp_path):
    folder = fss_class(tmp_path, "lamp")
    square_mask(0).save(folder / "1.png")  # image 1 is the first query (cycle order)
    with pytest.raises(DataError, match=rf"{folder / '1.png'}: query mask has no pixel of its episode class"):
        check_eval_split(eval_cfg(tmp_path, "lamp"))
    square_mask(255).save(folder / "1.png")
    check_eval_split(eval_cfg(tmp_path, "lamp"))  # fixed: no error


def test_check_eval_split_explains_an_exif_rotated_jpeg(tmp_path):
    folder = fss_class(tmp_path, "phone")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": viewers show it H x W
    photo(7).save(folder / "2.jpg", exif=exif)  # stored W x H
    square_mask(255, size=(H, W)).save(folder / "2.png")  # drawn on the rotated view: H x W
    with pytest.raises(DataError) as info:
        check_eval_split(eval_cfg(tmp_path, "phone"))
    message = str(info.value)
    assert message.startswith(f"{folder / '2.jpg'}: image is {W}x{H} but its mask {folder / '2.png'} is {H}x{W}")
    assert "EXIF orientation 6" in message and "stored (unrotated) pixels" in message
