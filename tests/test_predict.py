"""``python -m finetune.predict`` and its Python API: the evaluation's numbers on real episodes, the split of each
method's forward that encodes supports once, the files it writes, and bad input refused before any work."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from accelerate import Accelerator
from PIL import Image

import fewshot.evaluate as fewshot_evaluate
import finetune.predict as predict
from common.cli import user_errors
from common.config import load_config, save_config
from common.errors import DataError, WeightsError
from common.images import read_rgb
from common.io import save_tensors
from fewshot.data.base import EpisodeSpec
from fewshot.data.fss import Fss1000
from fewshot.evaluate import EvalSpec
from finetune.config import FinetuneConfig
from finetune.evaluate import load_weights
from finetune.methods import build_method
from finetune.methods.prototype import PrototypeBaseline
from finetune.predict import Segmenter, load_segmenter, read_image, read_mask

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "finetune" / "smoke_fss-mini_mnv2.yaml"
# a small model that builds in a blink from a saved random MobileNetV2 (see `tiny`): file tests need no real weights
TINY: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def tiny(tmp_path_factory) -> list[str]:
    """``TINY``: prototype overrides on one random MobileNetV2 saved as a file, so every build is the same model."""
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_random.safetensors"
    torch.manual_seed(0)
    save_tensors(path, torchvision.models.mobilenet_v2().state_dict())
    TINY[:] = ["model.method=prototype", "model.backbone=mobilenet_v2", f"model.backbone_weights={path}"]
    return TINY


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def blob_image(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy RGB picture with a bright square object; returns (image [h,w,3] uint8, mask 0/255 [h,w])."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
    image[mask > 0] = rng.integers(160, 255, (int((mask > 0).sum()), 3), dtype=np.uint8)
    return image, mask


def write_pair(folder: Path, name: str, h: int, w: int, seed: int = 0) -> tuple[Path, Path]:
    image, mask = blob_image(h, w, seed)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{name}.png")
    Image.fromarray(mask).save(folder / f"{name}_mask.png")
    return folder / f"{name}.png", folder / f"{name}_mask.png"


def run_cli(args: list) -> dict:
    return predict.main([str(a) for a in args])


# --------------------------------------------------------------------------------------------------
# the evaluation's numbers, pixel for pixel


def evaluation_predictions(model, bench, episode: EpisodeSpec, protocol: str, size: int, monkeypatch) -> list:
    """What ``fewshot.evaluate.evaluate`` scores for one episode: the (prediction, target) it hands the meter."""
    scored = []

    class Recording(fewshot_evaluate.SegmentationMeter):
        def update(self, pred, target, class_id):
            scored.append((pred.clone(), target.clone()))
            return super().update(pred, target, class_id)

    monkeypatch.setattr(fewshot_evaluate, "SegmentationMeter", Recording)
    spec = EvalSpec(shot=len(episode.supports), episodes=1, protocol=protocol, size=size)
    fewshot_evaluate.evaluate(model, bench, spec, 0, Accelerator(cpu=True), episodes=[episode])
    assert len(scored) == 1
    return scored[0]


def predict_episode(segmenter: Segmenter, bench, episode: EpisodeSpec):
    query = bench.sample(episode.query)
    supports = [(read_image(bench.sample(k).image_path), read_mask(bench.sample(k).mask_path))
                for k in episode.supports]
    image = read_image(query.image_path)
    return segmenter, image, supports


@pytest.mark.parametrize("protocol", ["pfenet", "hsnet"])
def test_an_evaluation_episode_through_predict_equals_the_evaluation(protocol, shared_data, mobilenet_weights,
                                                                     monkeypatch):
    bench = Fss1000(shared_data / "fss-mini", classes=["Bengal"])
    episode = EpisodeSpec("Bengal/2", ("Bengal/1",), 1)
    overrides = ["model.method=prototype", f"model.backbone_weights={mobilenet_weights}",
                 f"eval.protocol={protocol}"]
    segmenter = load_segmenter(config=SMOKE, overrides=overrides, device="cpu")
    assert segmenter.size == 129 and segmenter.protocol == protocol
    pred_eval, target = evaluation_predictions(segmenter.method, bench, episode, protocol, 129, monkeypatch)
    _, image, supports = predict_episode(segmenter, bench, episode)
    h, w = image.shape[:2]
    if protocol == "pfenet":  # scored at the original label's size: the top-left H x W of the square
        ours = segmenter.predict([image], supports)[0]
        assert ours.mask.shape == (h, w)
        assert np.array_equal(ours.mask, pred_eval[:h, :w].numpy())
        assert (target[:h, :w] != 255).all() and (target[h:] == 255).all() and (target[:, w:] == 255).all()
    else:  # scored at the input size
        logits = segmenter.forward([image], segmenter.encode(supports)).logits[0]
        assert np.array_equal(logits.argmax(0).numpy(), pred_eval.numpy())
    assert 0.2 < pred_eval[target != 255].float().mean() < 0.9  # a real answer, not all one class


def make_trained_run(run_dir: Path, mobilenet_weights: Path | str, seed: int = 0) -> Path:
    """A run folder as finetune/run.py leaves it: config.yaml + best_model.safetensors (random head here)."""
    cfg = load_config(FinetuneConfig, SMOKE, [f"model.backbone_weights={mobilenet_weights}", "model.prior=random",
                                              "model.prior_arch=resnet18", "model.reduce_dim=32",
                                              "model.extra_maps=[prototype]"])
    torch.manual_seed(seed)
    model = build_method(cfg.model)
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    save_tensors(run_dir / "best_model.safetensors", model.state_dict())
    return run_dir


def test_a_trained_qgnet_run_two_shots_equals_the_evaluation(tmp_path, shared_data, mobilenet_weights,
                                                             monkeypatch):
    run_dir = make_trained_run(tmp_path / "run", mobilenet_weights)
    bench = Fss1000(shared_data / "fss-mini", classes=["Bengal"])
    episode = EpisodeSpec("Bengal/4", ("Bengal/1", "Bengal/3"), 1)
    cfg = load_config(FinetuneConfig, run_dir / "config.yaml")
    model = load_weights(build_method(cfg.model), run_dir / "best_model.safetensors")  # evaluate.py's way
    pred_eval, _ = evaluation_predictions(model, bench, episode, "pfenet", 129, monkeypatch)
    segmenter = load_segmenter(run_dir, device="cpu")
    _, image, supports = predict_episode(segmenter, bench, episode)
    ours = segmenter.predict([image], supports)[0]
    h, w = image.shape[:2]
    assert np.array_equal(ours.mask, pred_eval[:h, :w].numpy())
    assert list(ours.maps) == ["prior", "guided", "prototype"]
    assert all(m.shape == (h, w) and 0 <= m.min() and m.max() <= 1 for m in ours.maps.values())
    info = segmenter.info
    assert info["weights"] == str(run_dir / "best_model.safetensors")
    assert info["sha256"] == hashlib.sha256((run_dir / "best_model.safetensors").read_bytes()).hexdigest()


def test_trained_weights_do_not_need_the_files_the_run_was_built_from(tmp_path, mobilenet_weights):
    run_dir = make_trained_run(tmp_path / "run", mobilenet_weights)
    text = (run_dir / "config.yaml").read_text().replace(str(mobilenet_weights), str(tmp_path / "moved.safetensors"))
    (run_dir / "config.yaml").write_text(text)
    moved = load_segmenter(run_dir, device="cpu")
    reference = load_segmenter(run_dir, overrides=[f"model.backbone_weights={mobilenet_weights}"], device="cpu")
    image, mask = blob_image(60, 45)
    a = moved.predict([image], [(image, mask >= 128)])[0]
    b = reference.predict([image], [(image, mask >= 128)])[0]
    assert np.array_equal(a.probability, b.probability)


# --------------------------------------------------------------------------------------------------
# supports encoded once: each method's encode_supports / decode equals its own forward


VARIANTS = {
    "prototype": ["method=prototype"],
    "prototype_l34": ["method=prototype", "prototype_layer=layer3+layer4"],
    "qgnet": [],
    "pfenet": ["method=pfenet"],
    "qgnet_cue": ["extra_maps=[prototype]", "residual=prototype", "prototype_layer=layer2"],
    "qgnet_chunked": ["sim_chunk=7"],
}


def tiny_method(*overrides: str):
    base = ["model.backbone=mobilenet_v2", "model.backbone_weights=random", "model.prior=random",
            "model.prior_arch=resnet18", "model.reduce_dim=16", "model.bins=[1.0,0.5]"]
    torch.manual_seed(0)
    method = build_method(load_config(FinetuneConfig, None, base + [f"model.{o}" for o in overrides]).model)
    if not isinstance(method, PrototypeBaseline):  # a zero-initialised head would hide differences
        for p in method.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
    return method.eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encoding_supports_once_gives_the_forward_of_every_query(variant):
    method = tiny_method(*VARIANTS[variant])
    g = torch.Generator().manual_seed(1)
    query = torch.randn(3, 3, 41, 41, generator=g)
    supports = torch.randn(1, 2, 3, 41, 41, generator=g)
    masks = (torch.rand(1, 2, 41, 41, generator=g) > 0.6).long()
    masks[:, :, :3] = 255
    with torch.no_grad():
        state = method.encode_supports(supports, masks)
        ours = method.decode(method.encode_query(query), state)
        for i in range(3):  # one episode at a time, as the evaluation runs them: bit for bit
            ref = method(query[i:i + 1], supports, masks)
            single = method.decode(method.encode_query(query[i:i + 1]), state)
            assert torch.equal(single.logits, ref.logits)
            assert list(single.maps) == list(ref.maps)
            assert all(torch.equal(single.maps[k], ref.maps[k]) for k in ref.maps)
            torch.testing.assert_close(ours.logits[i:i + 1], ref.logits, rtol=1e-4, atol=1e-4)  # batched


# --------------------------------------------------------------------------------------------------
# the command line: what it writes


def test_predict_writes_masks_overlays_probabilities_and_json(tmp_path):
    support, support_mask = write_pair(tmp_path / "in", "support", 48, 64, seed=1)
    queries = tmp_path / "queries"
    write_pair(queries, "a", 37, 50, seed=2)
    (queries / "a_mask.png").unlink()
    sub = queries / "sub"
    write_pair(sub, "a", 30, 30, seed=3)
    (sub / "a_mask.png").unlink()
    Image.fromarray(blob_image(20, 26, seed=4)[0]).save(queries / "a.jpg")  # same stem as a.png
    result = run_cli(["--support", support, support_mask, "--query", queries, "--out", tmp_path / "out",
                      "--size", 33, "--batch-size", 2, *TINY])
    out = tmp_path / "out"
    written = json.loads((out / "predictions.json").read_text())
    assert written["queries"] == result["queries"]
    names = sorted(q["mask"] for q in written["queries"])
    assert names == ["a_jpg_mask.png", "a_png_mask.png", "sub/a_mask.png"]
    for q in written["queries"]:
        mask = np.asarray(Image.open(out / q["mask"]))
        prob = Image.open(out / q["probability"])
        over = Image.open(out / q["overlay"])
        assert mask.shape == (q["height"], q["width"]) and set(np.unique(mask)) <= {0, 255}
        assert prob.mode.startswith("I") and prob.size == (q["width"], q["height"])
        assert over.mode == "RGB" and over.size == (q["width"], q["height"])
        p = np.asarray(prob, dtype=np.float64) / 65535
        assert ((mask > 0) == (p > 0.5))[np.abs(p - 0.5) > 1e-4].all()  # the mask is the probability > 0.5
        assert q["foreground_share"] == pytest.approx((mask > 0).mean(), abs=1e-6)
    settings = written["settings"]
    assert settings["size"] == 33 and settings["protocol"] == "pfenet" and settings["threshold"] == 0.5
    assert settings["supports_encoded_once"] is True and settings["batch_size"] == 2
    assert written["model"]["method"] == "prototype" and written["supports"][0]["image"] == str(support)
    assert set(written["timing"]) >= {"encode_supports_s", "per_query_s"}


def test_the_json_names_the_weights_and_their_sha256(tmp_path):
    support, support_mask = write_pair(tmp_path, "s", 40, 40)
    backbone = tmp_path / "backbone.safetensors"
    torch.manual_seed(0)
    save_tensors(backbone, torchvision.models.mobilenet_v2().state_dict())  # a torchvision-format file
    result = run_cli(["--support", support, support_mask, "--query", support, "--out", tmp_path / "out",
                      "--size", 33, "model.method=prototype", "model.backbone=mobilenet_v2",
                      f"model.backbone_weights={backbone}"])
    assert result["model"]["weights"] == str(backbone)
    assert result["model"]["sha256"] == hashlib.sha256(backbone.read_bytes()).hexdigest()
    assert result["model"]["weights_role"].startswith("backbone weights")


def test_the_command_gives_what_the_api_gives(tmp_path):
    support, support_mask = write_pair(tmp_path, "s", 45, 31, seed=5)
    query, _ = write_pair(tmp_path, "q", 52, 40, seed=6)
    run_cli(["--support", support, support_mask, "--query", query, "--out", tmp_path / "out", "--size", 41,
             "--threshold", 0.3, *TINY])
    segmenter = load_segmenter(overrides=TINY, size=41, device="cpu")
    ours = segmenter.predict([read_image(query)], [(read_image(support), read_mask(support_mask))], threshold=0.3)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "q_mask.png")) > 0, ours.mask == 1)
    prob = np.asarray(Image.open(tmp_path / "out" / "q_prob.png"), dtype=np.float64) / 65535
    np.testing.assert_allclose(prob, ours.probability, atol=1 / 65535)


def test_a_higher_threshold_keeps_fewer_pixels_and_half_is_the_argmax():
    segmenter = load_segmenter(overrides=TINY, size=33, device="cpu")
    image, mask = blob_image(40, 52, seed=7)
    supports = segmenter.encode([(image, mask >= 128)])
    out = segmenter.forward([image], supports)
    half, high = (segmenter.at_original_size(out, 0, image.shape[:2], t) for t in (0.5, 0.8))
    assert (high.mask <= half.mask).all()
    up = torch.nn.functional.interpolate(out.logits[:1], size=(52, 52), mode="bilinear", align_corners=True)[0]
    assert np.array_equal(half.mask, up.argmax(0)[:40, :52].numpy())


# --------------------------------------------------------------------------------------------------
# reading files: modes, masks, EXIF


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "RGB"])
def test_images_of_any_mode_read_as_the_evaluation_reads_them(tmp_path, mode):
    image, _ = blob_image(21, 34)
    pil = Image.fromarray(image)
    if mode == "I;16":
        pil = Image.fromarray(image[..., 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        pil = pil.convert(mode)
    pil.save(tmp_path / "x.png")
    got = read_image(tmp_path / "x.png")
    assert got.shape == (21, 34, 3) and got.dtype == np.uint8
    assert np.array_equal(got, read_rgb(tmp_path / "x.png"))
    if mode == "I;16":  # 16-bit scaled, not clipped to white
        assert np.array_equal(got[..., 0], image[..., 0])


def test_masks_binarised_at_128_with_alpha_and_16_bit_files(tmp_path):
    grey = np.array([[0, 127, 128, 255]], np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert read_mask(tmp_path / "grey.png").tolist() == [[0, 0, 1, 1]]
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb.png")
    assert read_mask(tmp_path / "rgb.png").tolist() == [[0, 0, 1, 1]]
    cutout = np.zeros((1, 4, 4), np.uint8)
    cutout[..., :3] = 200  # the colours say nothing; the alpha is the object
    cutout[..., 3] = [0, 100, 200, 255]
    Image.fromarray(cutout, "RGBA").save(tmp_path / "cutout.png")
    assert read_mask(tmp_path / "cutout.png").tolist() == [[0, 0, 1, 1]]
    Image.fromarray(np.array([[0, 30000, 40000, 65535]], np.uint16)).save(tmp_path / "deep.png")
    assert read_mask(tmp_path / "deep.png").tolist() == [[0, 0, 1, 1]]


def test_label_maps_with_mask_value(tmp_path):
    labels = np.array([[0, 3, 3, 255, 7]], np.uint8)
    pal = Image.fromarray(labels, "P")
    pal.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    pal.save(tmp_path / "labels.png")
    assert read_mask(tmp_path / "labels.png", mask_value=3).tolist() == [[0, 1, 1, 255, 0]]
    with pytest.raises(DataError, match=r"labels.png: support mask has no pixel equal to --mask-value 5 "
                                        r"\(values present: 0, 3, 7, 255\)"):
        read_mask(tmp_path / "labels.png", mask_value=5)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="rgb.png: --mask-value needs a single-channel label map"):
        read_mask(tmp_path / "rgb.png", mask_value=1)


def exif_jpeg(path: Path, image: np.ndarray, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(image).save(path, exif=exif.tobytes(), quality=95)
    return path


def test_exif_orientation_is_applied_to_image_and_mask_alike(tmp_path):
    stored, mask = blob_image(30, 40)  # stored 40 wide x 30 tall; orientation 6 shows it 30 wide x 40 tall
    image_path = exif_jpeg(tmp_path / "photo.jpg", stored, 6)
    upright = np.asarray(Image.open(image_path).transpose(Image.Transpose.ROTATE_270))
    assert read_image(image_path).shape == (40, 30, 3)
    assert np.array_equal(read_image(image_path), upright)
    assert read_image(image_path, exif=False).shape == (30, 40, 3)
    drawn = tmp_path / "drawn_on_the_upright_view.png"
    Image.fromarray(np.rot90(mask, -1).copy()).save(drawn)  # a mask file without EXIF, drawn on what one sees
    arrays, _ = predict.load_supports([(image_path, drawn)])
    assert arrays[0][1].shape == (40, 30)
    with pytest.raises(DataError, match=r"photo.jpg: support image is 40x30 but its mask .* is 30x40; the image "
                                        r"has EXIF orientation 6, not applied \(--exif stored\)"):
        predict.load_supports([(image_path, drawn)], exif=False)
    tagged = exif_jpeg(tmp_path / "mask_with_the_same_tag.jpg", np.stack([mask] * 3, -1), 6)
    for exif in (True, False):  # a mask carrying its image's tag fits either way
        predict.load_supports([(image_path, tagged)], exif=exif)


def test_an_upright_query_gets_its_outputs_upright(tmp_path):
    support, support_mask = write_pair(tmp_path, "s", 40, 40)
    query = exif_jpeg(tmp_path / "q.jpg", blob_image(24, 36)[0], 8)
    result = run_cli(["--support", support, support_mask, "--query", query, "--out", tmp_path / "out",
                      "--size", 33, *TINY])
    q = result["queries"][0]
    assert (q["width"], q["height"], q["exif_orientation"]) == (24, 36, 8)
    assert Image.open(tmp_path / "out" / "q_mask.png").size == (24, 36)


# --------------------------------------------------------------------------------------------------
# bad input: an error naming the file, before any work


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model is built: input errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the inputs were checked")

    monkeypatch.setattr(predict, "build_loaded_method", refuse)


def expect_cli_error(tmp_path, capsys, args: list, pattern: str) -> None:
    with pytest.raises(SystemExit) as exc, user_errors():
        run_cli([*args, "--out", tmp_path / "out", "--size", 33, *TINY])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(pattern, err), err
    assert not (tmp_path / "out").exists()


def test_a_support_mask_without_foreground_is_named(tmp_path, capsys, no_model):
    support, _ = write_pair(tmp_path, "s", 20, 20)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "empty.png")
    expect_cli_error(tmp_path, capsys, ["--support", support, tmp_path / "empty.png", "--query", support],
                     r"empty.png: support mask has no foreground \(no pixel >= 128\); it is all background")
    Image.fromarray(np.eye(20, dtype=np.uint8)).save(tmp_path / "zero_one.png")
    expect_cli_error(tmp_path, capsys, ["--support", support, tmp_path / "zero_one.png", "--query", support],
                     r"zero_one.png: .*largest value is 1: a 0/1 \(class index\) mask\? pass --mask-value 1")


def test_unreadable_and_missing_files_are_named(tmp_path, capsys, no_model):
    support, support_mask = write_pair(tmp_path, "s", 20, 20)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = np.asarray(Image.open(support))
    Image.fromarray(good).save(tmp_path / "full.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "full.png").read_bytes()[:-40])
    expect_cli_error(tmp_path, capsys, ["--support", tmp_path / "broken.jpg", support_mask, "--query", support],
                     r"broken.jpg: ")
    folder = tmp_path / "queries"
    folder.mkdir()
    (folder / "truncated.png").write_bytes((tmp_path / "truncated.png").read_bytes())
    Image.fromarray(good).save(folder / "fine.png")
    expect_cli_error(tmp_path, capsys, ["--support", support, support_mask, "--query", folder],
                     r"queries/truncated.png: image file is unreadable or truncated")
    expect_cli_error(tmp_path, capsys, ["--support", support, support_mask, "--query", tmp_path / "nope.jpg"],
                     r"nope.jpg: query image or folder does not exist")
    expect_cli_error(tmp_path, capsys, ["--support", support, tmp_path / "nomask.png", "--query", support],
                     r"nomask.png: mask file is missing")


def test_a_size_mismatch_names_both_files(tmp_path, capsys, no_model):
    support, _ = write_pair(tmp_path, "s", 20, 30)
    _, other_mask = write_pair(tmp_path, "o", 20, 20)
    expect_cli_error(tmp_path, capsys, ["--support", support, other_mask, "--query", support],
                     r"s.png: support image is 30x20 but its mask .*o_mask.png is 20x20")


def test_a_trained_method_needs_weights(tmp_path, capsys):
    support, support_mask = write_pair(tmp_path, "s", 20, 20)
    with pytest.raises(SystemExit), user_errors():
        run_cli(["--support", support, support_mask, "--query", support, "--size", 33, "--out", tmp_path / "o",
                 "model.backbone=mobilenet_v2", "model.backbone_weights=random", "model.prior=none"])
    assert "has trained parameters: give a run folder or a weights file" in capsys.readouterr().err
    with pytest.raises(WeightsError):
        load_segmenter(overrides=["model.backbone=mobilenet_v2", "model.backbone_weights=random",
                                  "model.prior=none"])


def test_the_api_refuses_bad_arrays_with_what_to_do():
    segmenter = load_segmenter(overrides=TINY, size=33, device="cpu")
    image, mask = blob_image(20, 20)
    with pytest.raises(ValueError, match=r"no foreground pixel \(value 1\) \(a 0/255 mask\? .*mask >= 128"):
        segmenter.encode([(image, np.where(mask > 0, 255, 0).astype(np.uint8))])
    with pytest.raises(ValueError, match="values .* are not 0 = background"):
        segmenter.encode([(image, mask // 2)])
    with pytest.raises(ValueError, match="support 0: image is 20x20 but its mask is 20x10"):
        segmenter.encode([(image, mask[:10] >= 128)])
    with pytest.raises(ValueError, match="at least one support"):
        segmenter.predict([image], [])
    assert segmenter.predict([image[..., 0]], [(image, mask >= 128)])[0].mask.shape == (20, 20)  # grey query


def test_output_names_stay_unique():
    names = [Path("1.jpg"), Path("1.png"), Path("a/1.jpg"), Path("2.jpg")]
    assert predict.output_names(names) == ["1_jpg", "1_png", "a/1", "2"]
