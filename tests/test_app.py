"""The web page (``python -m finetune.app``): its handler against ``finetune.predict``, and the real page in headless
Chromium on a loopback port.

Browser: Playwright's Python client driving the system Chromium (Debian's ``chromium`` package, which ``.ci/run``
installs): ``pip install playwright`` brings the driver, and ``executable_path`` points it at the system browser,
so nothing is downloaded (Playwright's own browser download is not reachable from CI). Playwright over Selenium
because it needs no separately versioned chromedriver and has file uploads and auto-waiting built in. Without
Chromium or Playwright the browser tests skip and say why. ``QGNET_SCREENSHOT=docs/app.png`` keeps the
screenshot the browser test takes (else it stays in pytest's temporary folder).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from common.errors import InputError
from common.io import save_tensors
from finetune import predict

gr = pytest.importorskip("gradio", reason='the web page is an optional extra: pip install -e ".[app]"')
app = pytest.importorskip("finetune.app")

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "finetune" / "smoke_fss-mini_mnv2.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_random.safetensors"
    torch.manual_seed(0)
    save_tensors(path, torchvision.models.mobilenet_v2().state_dict())
    return ["model.method=prototype", "model.backbone=mobilenet_v2", f"model.backbone_weights={path}"]


def picture(path: Path, h: int, w: int, seed: int = 0) -> tuple[Path, Path]:
    """A noisy picture with a bright square and its 0/255 mask, as PNG files."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
    image[mask > 0] += 120
    path.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path / f"img{seed}.png")
    Image.fromarray(mask).save(path / f"img{seed}_mask.png")
    return path / f"img{seed}.png", path / f"img{seed}_mask.png"


def slots(*filled: tuple) -> list:
    """The handler's slot values: (image file, editor value, mask file) x MAX_SUPPORTS."""
    values = []
    for k in range(app.MAX_SUPPORTS):
        values += list(filled[k]) if k < len(filled) else [None, None, None]
    return values


class Progress:
    def __init__(self):
        self.calls = []

    def __call__(self, value, desc=None, **kwargs):
        self.calls.append(desc)


# --------------------------------------------------------------------------------------------------
# the handler, without a browser


def test_the_page_gives_the_masks_predict_gives(tmp_path, tiny):
    support, support_mask = picture(tmp_path / "in", 40, 56, seed=1)
    q1, _ = picture(tmp_path / "in", 37, 45, seed=2)
    q2, _ = picture(tmp_path / "in", 50, 30, seed=3)
    segmenter = predict.load_segmenter(overrides=tiny, size=33, device="cpu", batch_size=1)
    handler = app.make_handler(segmenter, app.map_names(segmenter), tmp_path / "app")
    progress = Progress()
    gallery, files, status = handler(*slots((str(support), None, str(support_mask))), [str(q1), str(q2)], "",
                                     0.5, progress=progress)
    assert "Segmented 2 queries" in status and "img2.png" in status
    assert {"checking the uploads", "encoding the supports", "segmenting"} <= set(progress.calls)
    assert [Path(f).name for f in files] == ["img2_mask.png", "img3_mask.png", "support-1_mask.png"]
    assert len(gallery) == 4 and gallery[1][1] == "img2.png: prototype similarity"  # overlay, map, overlay, map
    predict.main(["--support", str(support), str(support_mask), "--query", str(q1), "--query", str(q2),
                  "--out", str(tmp_path / "cli"), "--size", "33", *tiny])
    for f in files[:2]:
        assert np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(tmp_path / "cli" / Path(f).name)))
    assert np.array_equal(np.asarray(Image.open(files[2])), np.asarray(Image.open(support_mask)))


def test_brushed_strokes_are_the_support_mask(tmp_path, tiny):
    support, support_mask = picture(tmp_path, 40, 60, seed=1)
    strokes = np.zeros((20, 30, 4), np.uint8)  # the editor's canvas at half the image's size
    strokes[5:15, 8:22, :] = (255, 51, 85, 153)
    editor = {"background": None, "layers": [strokes], "composite": None}
    mask = app.drawn_mask(editor, (40, 60))
    assert mask.shape == (40, 60) and mask[10:30, 16:44].all() and mask.sum() == 20 * 28
    assert app.drawn_mask({"layers": [np.zeros((4, 4, 4), np.uint8)]}, (4, 4)) is None
    supports, names = app.collect_supports([(str(support), editor, None)], None)
    assert names == ["img1.png"] and np.array_equal(supports[0][1], mask)
    supports, _ = app.collect_supports([(str(support), editor, str(support_mask))], None)  # a mask file wins
    assert np.array_equal(supports[0][1], predict.read_mask(support_mask))


@pytest.mark.parametrize("case", ["no support", "no mask", "mask without image", "empty mask", "not an image",
                                  "no query", "bad mask value", "size mismatch"])
def test_bad_uploads_are_a_message_naming_the_file(tmp_path, tiny, case):
    support, support_mask = picture(tmp_path / "upload-dir-0123", 30, 30, seed=1)
    other, other_mask = picture(tmp_path / "upload-dir-0123", 20, 24, seed=2)
    (tmp_path / "notes.jpg").write_text("not a picture")
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(tmp_path / "blank.png")
    segmenter = predict.load_segmenter(overrides=tiny, size=33, device="cpu", batch_size=1)
    handler = app.make_handler(segmenter, ["similarity"], tmp_path / "app")
    good = (str(support), None, str(support_mask))
    values, queries, mask_value, expected = {
        "no support": (slots(), [str(other)], "", "no support image: upload at least one"),
        "no mask": (slots((str(support), None, None)), [str(other)], "", "support 1 (img1.png): no mask; brush"),
        "mask without image": (slots((None, None, str(support_mask))), [str(other)], "", "support 1: a mask but no"),
        "empty mask": (slots((str(support), None, str(tmp_path / "blank.png"))), [str(other)], "",
                       "blank.png: support mask has no foreground"),
        "not an image": (slots(good), [str(tmp_path / "notes.jpg")], "", "notes.jpg: cannot decode"),
        "no query": (slots(good), [], "", "no query image"),
        "bad mask value": (slots(good), [str(other)], "cat", "mask value 'cat': leave it empty"),
        "size mismatch": (slots((str(support), None, str(other_mask))), [str(other)], "",
                          "img1.png: support image is 30x30 but its mask img2_mask.png is 24x20"),
    }[case]
    with pytest.raises(gr.Error) as err:
        handler(*values, queries, mask_value, 0.5, progress=Progress())
    assert expected in err.value.message
    assert "upload-dir-0123" not in err.value.message and "Traceback" not in err.value.message


def test_the_page_builds_around_any_method(tiny):
    segmenter = predict.load_segmenter(overrides=tiny, size=33, device="cpu", batch_size=1)
    assert app.map_names(segmenter) == ["similarity"]
    assert isinstance(app.build_app(segmenter), gr.Blocks)


def test_qgnet_shows_its_prior_and_guided_maps_beside_each_mask(tmp_path, tiny):
    from common.config import load_config, save_config
    from finetune.config import FinetuneConfig
    from finetune.methods import build_method

    backbone = tiny[-1].split("=", 1)[1]
    cfg = load_config(FinetuneConfig, None, ["model.backbone=mobilenet_v2", f"model.backbone_weights={backbone}",
                                             "model.prior=random", "model.prior_arch=resnet18", "model.reduce_dim=16",
                                             "model.bins=[1.0,0.5]", "data.eval_size=33"])
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    save_tensors(run / "last_model.safetensors", build_method(cfg.model).state_dict())
    segmenter = predict.load_segmenter(run, device="cpu", batch_size=1)
    assert app.map_names(segmenter) == ["prior", "guided"]
    support, support_mask = picture(tmp_path, 30, 40, seed=1)
    gallery, files, _ = app.make_handler(segmenter, ["prior", "guided"], tmp_path / "app")(
        *slots((str(support), None, str(support_mask))), [str(support)], "", 0.5, progress=Progress())
    assert [caption for _, caption in gallery] == ["img1.png: " + c for c in (
        f"{100 * (np.asarray(Image.open(files[0])) > 0).mean():.1f}% foreground", "prior region map",
        "guided region map")]
    assert all(image.shape[:2] == (30, 40) for image, _ in gallery)


def test_without_gradio_the_command_says_what_to_install(monkeypatch):
    monkeypatch.setattr(app, "gr", None)
    with pytest.raises(InputError, match=r'pip install -e "\.\[app\]"'):
        app.require_gradio()


# --------------------------------------------------------------------------------------------------
# the real page in headless Chromium


def chromium_path() -> str:
    """The system Chromium, or skip saying how to get one."""
    path = os.environ.get("QGNET_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no Chromium installed: apt-get install chromium (Debian; .ci/run does), or set QGNET_CHROMIUM")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_server(tmp_path_factory, mobilenet_weights):
    """``python -m finetune.app`` (prototype on the real MobileNetV2, 129 px) serving on a loopback port."""
    chromium_path()
    pytest.importorskip("playwright.sync_api", reason="browser tests need Playwright: pip install playwright")
    port, out = free_port(), tmp_path_factory.mktemp("app")
    overrides = ["model.method=prototype", f"model.backbone_weights={mobilenet_weights}"]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    log = open(out / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "finetune.app", "--config", str(SMOKE), *overrides,
                               "--port", str(port), "--threads", "1", "--out", str(out / "results")],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                pytest.fail(f"the app exited with {server.returncode}:\n{(out / 'server.log').read_text()}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the app did not answer on {url}:\n{(out / 'server.log').read_text()}")
                time.sleep(0.5)
        yield url, overrides
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture
def page(page_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True)
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        tab.set_default_timeout(120_000)
        tab.goto(page_server[0], wait_until="domcontentloaded")
        tab.wait_for_selector("#run")
        yield tab
        browser.close()


def upload(page, elem_id: str, files) -> None:
    page.set_input_files(f"#{elem_id} input[type=file]", [str(f) for f in files])
    # the component lists each file once its upload is done (the name split over elements, hence no spaces)
    listed = ("([id, names]) => { const text = document.getElementById(id).innerText.replace(/\\s+/g, '');"
              " return names.every(n => text.includes(n)); }")
    page.wait_for_function(listed, arg=[elem_id, [Path(f).name for f in files]])


def run_and_fetch(page, url: str, expect: int) -> dict[str, np.ndarray]:
    """Press Segment, wait for the download links, and fetch every file as the browser would."""
    page.click("#run")
    page.wait_for_function(f"document.querySelectorAll('#masks a[href]').length >= {expect}")
    hrefs = [a.get_attribute("href") for a in page.locator("#masks a[href]").all()]
    files = {}
    for href in hrefs:
        with urllib.request.urlopen(urllib.parse.urljoin(url, href)) as r:
            files[href.rsplit("/", 1)[-1]] = np.asarray(Image.open(io.BytesIO(r.read())))
    return files


def error_message(page) -> str:
    toast = page.locator(".toast-body").last
    toast.wait_for()
    text = toast.inner_text()
    for close in page.locator(".toast-close").all():  # dismiss, so the next check sees only its own message
        close.click()
    return text


def save_screenshot(page, tmp_path: Path) -> Path:
    """A full-page screenshot, palette-reduced to stay small; also to ``$QGNET_SCREENSHOT`` when set."""
    raw = tmp_path / "page.png"
    page.screenshot(path=str(raw), full_page=True)
    small = Image.open(raw).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    targets = [tmp_path / "app.png"] + ([Path(os.environ["QGNET_SCREENSHOT"])]
                                        if os.environ.get("QGNET_SCREENSHOT") else [])
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        small.save(target, optimize=True)
    print(f"screenshot of the page: {', '.join(map(str, targets))}")
    return targets[-1]


@pytest.mark.slow
def test_the_page_in_chromium_gives_predicts_mask(page, page_server, shared_data, tmp_path):
    url, overrides = page_server
    pets = shared_data / "fss-mini" / "Bengal"
    upload(page, "support-image-1", [pets / "1.jpg"])
    upload(page, "support-mask-1", [pets / "1.png"])
    upload(page, "queries", [pets / "2.jpg", pets / "5.jpg"])
    files = run_and_fetch(page, url, expect=3)
    assert "Segmented 2 queries" in page.inner_text("#status")
    predict.main(["--support", str(pets / "1.jpg"), str(pets / "1.png"), "--query", str(pets / "2.jpg"),
                  "--query", str(pets / "5.jpg"), "--out", str(tmp_path / "cli"), "--config", str(SMOKE),
                  *overrides])
    for name in ("2_mask.png", "5_mask.png"):
        ours = np.asarray(Image.open(tmp_path / "cli" / name))
        assert files[name].shape == ours.shape and np.array_equal(files[name], ours), name
        assert 0.05 < (ours > 0).mean() < 0.95
    page.wait_for_selector("#results img")
    page.wait_for_timeout(500)  # let the gallery's images paint
    save_screenshot(page, tmp_path)


@pytest.mark.slow
def test_the_page_in_chromium_takes_a_brushed_mask_and_refuses_bad_uploads(page, page_server, shared_data,
                                                                          tmp_path):
    url, overrides = page_server
    pets = shared_data / "fss-mini" / "Bengal"
    upload(page, "support-image-1", [pets / "1.jpg"])
    upload(page, "queries", [pets / "2.jpg"])
    page.click("#run")
    assert "support 1 (1.jpg): no mask; brush over the object" in error_message(page)
    canvas = page.locator("#support-editor-1 canvas").first
    canvas.wait_for()
    page.wait_for_timeout(500)
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    for dy in range(-40, 41, 10):  # a patch around the centre, where the (centred) image is
        page.mouse.move(cx - 30, cy + dy)
        page.mouse.down()
        page.mouse.move(cx + 30, cy + dy, steps=6)
        page.mouse.up()
    (tmp_path / "holiday.jpg").write_text("this is not a picture")
    page.locator("#queries button[aria-label='Clear']").first.click()
    upload(page, "queries", [tmp_path / "holiday.jpg"])
    page.click("#run")
    assert "holiday.jpg: cannot decode" in error_message(page)
    page.locator("#queries button[aria-label='Clear']").first.click()
    upload(page, "queries", [pets / "2.jpg"])
    files = run_and_fetch(page, url, expect=2)
    drawn = files["support-1_mask.png"]
    image = predict.read_image(pets / "1.jpg")
    assert drawn.shape == image.shape[:2]
    ys, xs = np.nonzero(drawn)
    assert 0.02 < (drawn > 0).mean() < 0.6
    assert abs(ys.mean() / drawn.shape[0] - 0.5) < 0.15 and abs(xs.mean() / drawn.shape[1] - 0.5) < 0.15
    Image.fromarray(drawn).save(tmp_path / "drawn.png")
    predict.main(["--support", str(pets / "1.jpg"), str(tmp_path / "drawn.png"), "--query", str(pets / "2.jpg"),
                  "--out", str(tmp_path / "cli"), "--config", str(SMOKE), *overrides])
    assert np.array_equal(files["2_mask.png"], np.asarray(Image.open(tmp_path / "cli" / "2_mask.png")))
