"""A local web page for few-shot segmentation of your own pictures (Gradio; ``pip install -e ".[app]"``).

    python -m finetune.app RUN_DIR_or_WEIGHTS [--port 7860] [--host 127.0.0.1] [key.sub=value ...]
    python -m finetune.app --config configs/finetune/smoke_fss-mini_mnv2.yaml model.method=prototype

Upload one or more support images, brush each one's object (or upload its mask), upload query images, press
*Segment*: every query comes back with its predicted mask overlaid and the method's maps beside it (QGNet's
prior and guided region maps, the prototype baseline's similarity), and the mask PNGs to download. The work is
:mod:`finetune.predict`'s, with the same reading of files (EXIF orientation applied, masks binarised at 128 or
equal to a label value), so the page and ``python -m finetune.predict`` give the same masks. Bad uploads are
refused with a message on the page.

Gradio because it is the field's convention for model demos (Hugging Face Spaces), it is actively maintained,
and it ships the pieces this page needs: an image editor with a brush, galleries, file downloads and a progress
bar, served on a loopback port with no front-end code of our own. It is an optional extra, so the core install
stays lean.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from common.cli import user_errors
from common.errors import InputError
from common.io import write_json
from finetune.predict import (
    Segmenter,
    SupportPair,
    check_pair,
    list_queries,
    load_segmenter,
    map_image,
    output_names,
    overlay_image,
    read_image,
    read_mask,
    save_png,
)

try:
    import gradio as gr
except ImportError:  # the page is an optional extra; predict and everything else work without it
    gr = None

MAX_SUPPORTS = 5  # shots offered on the page (the benchmarks use 1 and 5)
MAP_TITLES = {"prior": "prior region map", "guided": "guided region map", "similarity": "prototype similarity",
              "prototype": "prototype cue"}


def require_gradio() -> Any:
    """The gradio module, or an error saying how to install the page's extra."""
    if gr is None:
        raise InputError('the web page needs Gradio: pip install -e ".[app]" (or pip install gradio)')
    return gr


def drawn_mask(editor: dict | None, shape: tuple[int, int]) -> np.ndarray | None:
    """The brushed foreground of an image-editor value as uint8 ``[H,W]`` {0, 1}, or None when nothing is drawn.

    Strokes are the editor's layers (RGBA, painted = opaque); a layer of another size than the image (the editor
    may scale its canvas) is resized to it with nearest neighbours.
    """
    painted = np.zeros(shape, bool)
    for layer in (editor or {}).get("layers") or []:
        alpha = stroke_alpha(layer)
        if alpha.shape != shape:
            alpha = np.asarray(Image.fromarray(alpha).resize((shape[1], shape[0]), Image.Resampling.NEAREST))
        painted |= alpha > 0
    return painted.astype(np.uint8) if painted.any() else None


def stroke_alpha(layer: Any) -> np.ndarray:
    """``[H,W]`` uint8 coverage of one editor layer: its alpha (RGBA) or its brightest channel."""
    layer = np.asarray(layer)
    if layer.ndim == 3:
        layer = layer[..., 3] if layer.shape[2] == 4 else layer.max(axis=2)
    return layer.astype(np.uint8)


def has_strokes(editor: dict | None) -> bool:
    """Whether anything was brushed in an image-editor value."""
    return any((stroke_alpha(layer) > 0).any() for layer in (editor or {}).get("layers") or [])


def _name(path: str | Path | None) -> str:
    return Path(path).name if path else ""


def _user_message(err: Exception, paths: Sequence[str | Path | None]) -> str:
    """The error's message with Gradio's upload folders cut down to the file names the person uploaded."""
    text = str(err)
    for path in sorted((str(p) for p in paths if p), key=len, reverse=True):
        text = text.replace(path, Path(path).name)
    return text


def collect_supports(slots: Sequence[tuple[str | None, dict | None, str | None]], mask_value: int | None
                     ) -> tuple[list[SupportPair], list[str]]:
    """``[(image file, editor value, mask file)]`` per slot -> support arrays and their names.

    An uploaded mask file wins over brush strokes. Raises InputError / DataError (the slot and the file named)
    for a slot with a mask but no image, an image with neither mask nor strokes, or no support at all.
    """
    supports, names = [], []
    for k, (image_path, editor, mask_path) in enumerate(slots, start=1):
        if not image_path:
            if mask_path or has_strokes(editor):
                raise InputError(f"support {k}: a mask but no support image; upload the image first")
            continue
        image = read_image(image_path)
        if mask_path:
            mask = read_mask(mask_path, mask_value)
            check_pair(image, mask, image_path, mask_path)
        else:
            mask = drawn_mask(editor, image.shape[:2])
            if mask is None:
                raise InputError(f"support {k} ({_name(image_path)}): no mask; brush over the object in the "
                                 "editor or upload its mask")
        supports.append((image, mask))
        names.append(_name(image_path))
    if not supports:
        raise InputError("no support image: upload at least one support image and mark its object")
    return supports, names


def parse_mask_value(text: str | None) -> int | None:
    """The page's mask-value box: empty = binarise at 128, else a class id (InputError otherwise)."""
    text = (text or "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise InputError(f"mask value {text!r}: leave it empty (masks binarised at 128) or give a class id (0-65535)")
    return int(text)


def map_names(segmenter: Segmenter) -> list[str]:
    """The named maps the method returns (from one forward of a blank episode)."""
    blank = np.full((segmenter.size, segmenter.size, 3), 127, np.uint8)
    mask = np.zeros(blank.shape[:2], np.uint8)
    mask[: segmenter.size // 2] = 1
    return list(segmenter.forward([blank], segmenter.encode([(blank, mask)])).maps)


def make_handler(segmenter: Segmenter, names: Sequence[str], out_root: Path) -> Any:
    """The *Segment* button's function: ``(slot values x MAX_SUPPORTS, queries, mask value, threshold) ->
    (gallery, mask files, status)``; input errors become a ``gr.Error`` message naming the uploaded file."""
    gr = require_gradio()
    info = segmenter.info
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)

    def segment(*values: Any, progress: Any = gr.Progress()) -> tuple:
        *slot_values, queries, mask_value, threshold = values
        slots = [tuple(slot_values[i:i + 3]) for i in range(0, 3 * MAX_SUPPORTS, 3)]
        query_paths = [str(q) for q in (queries or [])]
        uploads = [p for slot in slots for p in (slot[0], slot[2])] + query_paths
        start = time.perf_counter()
        try:
            progress(0, desc="checking the uploads")
            value = parse_mask_value(mask_value)
            supports, support_names = collect_supports(slots, value)
            if not query_paths:
                raise InputError("no query image: upload the images to segment")
            listed = list_queries(query_paths)
            images = [read_image(p) for p, _ in listed]  # every query decoded before any work
            progress(0, desc="encoding the supports")
            support_set = segmenter.encode(supports)
            out_dir = Path(tempfile.mkdtemp(prefix="result-", dir=out_root))
            stems = output_names([name for _, name in listed])
            gallery, files, rows, records = [], [], [], []
            # the support masks as used (brushed ones too), so `python -m finetune.predict` can redo the request
            support_files = [str(save_png(out_dir / f"support-{k}_mask.png", np.where(mask == 1, 255, 0)
                                          .astype(np.uint8))) for k, (_, mask) in enumerate(supports, start=1)]
            for i, image in enumerate(images):
                progress((i, len(images)), desc="segmenting", unit="queries")
                pred = segmenter.predict([image], support_set, float(threshold))[0]
                mask_file = save_png(out_dir / f"{stems[i]}_mask.png", pred.mask * np.uint8(255))
                files.append(str(mask_file))
                name = listed[i][1].name
                gallery.append((overlay_image(image, pred.mask), f"{name}: {100 * pred.foreground_share:.1f}% "
                                                                  "foreground"))
                gallery += [(map_image(pred.maps[n]), f"{name}: {MAP_TITLES.get(n, n)}") for n in names
                            if n in pred.maps]
                rows.append(f"| {name} | {image.shape[1]}x{image.shape[0]} | {100 * pred.foreground_share:.1f}% |")
                records.append({"image": name, "mask": mask_file.name,
                                "foreground_share": round(pred.foreground_share, 6)})
            files += support_files
            write_json(out_dir / "predictions.json", {"model": info, "supports": support_names,
                                                      "support_masks": [Path(f).name for f in support_files],
                                                      "threshold": float(threshold), "mask_value": value,
                                                      "queries": records})
        except (InputError, ValueError) as err:
            raise gr.Error(_user_message(err, uploads), duration=None) from None
        seconds = time.perf_counter() - start
        status = (f"**Segmented {len(images)} quer{'y' if len(images) == 1 else 'ies'}** with "
                  f"`{info.get('method')}` from {len(supports)} support{'s' * (len(supports) > 1)} "
                  f"({', '.join(support_names)}) in {seconds:.1f} s.\n\n| query | size | foreground |\n"
                  "|---|---|---|\n" + "\n".join(rows))
        return gallery, files, status

    return segment


def build_app(segmenter: Segmenter, out_root: str | Path | None = None) -> Any:
    """The page (a ``gr.Blocks``) around ``segmenter``; results of each request go to a folder under
    ``out_root`` (default: a temporary folder)."""
    gr = require_gradio()
    out_root = Path(out_root or tempfile.mkdtemp(prefix="qgnet-app-"))
    names = map_names(segmenter)
    info = segmenter.info
    title = f"Few-shot segmentation · {info.get('method', '?')}"
    segment = make_handler(segmenter, names, out_root)

    def show_in_editor(path: str | None) -> Any:
        if not path:
            return None
        try:  # upright, decoded as predict decodes it, so strokes land on the pixels predict uses
            return {"background": read_image(path), "layers": [], "composite": None}
        except InputError as err:
            raise gr.Error(_user_message(err, [path]), duration=None) from None

    columns = 1 + len(names)
    with gr.Blocks(title=title) as demo:
        weights = (f"`{Path(info['weights']).name}` (sha256 {info['sha256'][:8]})" if info.get("weights")
                   else "no weights file")
        gr.Markdown(f"## {title}\nUpload a support image and brush over its object (or upload its mask), add "
                    f"more supports if you like, upload the queries, press **Segment**. Model: {weights}, "
                    f"{segmenter.size} px, {segmenter.protocol} protocol.")
        inputs = []
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tabs():
                    for k in range(1, MAX_SUPPORTS + 1):
                        with gr.Tab(f"Support {k}", elem_id=f"support-tab-{k}"):
                            with gr.Row():
                                image = gr.File(label=f"support image {k}", file_types=["image"], type="filepath",
                                                elem_id=f"support-image-{k}", height=120)
                                mask = gr.File(label="its mask (optional: PNG, object >= 128)", file_types=["image"],
                                               type="filepath", elem_id=f"support-mask-{k}", height=120)
                            editor = gr.ImageEditor(
                                label="brush over the object", type="numpy", image_mode="RGBA", sources=[],
                                layers=False, transforms=[], format="png", elem_id=f"support-editor-{k}",
                                brush=gr.Brush(colors=[("#ff3355", 0.6)], color_mode="fixed", default_size=18),
                                height=380)
                            image.change(show_in_editor, inputs=image, outputs=editor)
                            inputs += [image, editor, mask]
            with gr.Column(scale=2):
                queries = gr.File(label="query images", file_count="multiple", file_types=["image"],
                                  type="filepath", elem_id="queries", height=160)
                mask_value = gr.Textbox(label="mask value", placeholder="empty: masks binarised at 128; a number: "
                                        "the object's class id in label-map masks", elem_id="mask-value")
                threshold = gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="threshold (foreground probability)",
                                      elem_id="threshold")
                run = gr.Button("Segment", variant="primary", elem_id="run")
        status = gr.Markdown(elem_id="status")
        gallery = gr.Gallery(label=" | ".join(["prediction"] + [MAP_TITLES.get(n, n) for n in names]),
                             columns=columns, format="png", elem_id="results", height=420, object_fit="contain")
        downloads = gr.File(label="mask PNGs (0/255, at each query's size; then the support masks as used)",
                            file_count="multiple", elem_id="masks", interactive=False)
        run.click(segment, inputs=[*inputs, queries, mask_value, threshold], outputs=[gallery, downloads, status],
                  concurrency_limit=1)
    demo.qgnet_out_root = out_root
    return demo


def main(argv: list[str] | None = None) -> None:
    """``python -m finetune.app``: build the segmenter, then serve the page until interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    source = argv.pop(0) if argv and not argv[0].startswith("-") and "=" not in argv[0] else None
    parser = argparse.ArgumentParser(prog="python -m finetune.app", description=__doc__,
                                     usage="%(prog)s [RUN_DIR_or_WEIGHTS] [--port N] [options] [key.sub=value ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the run folder's config.yaml)")
    parser.add_argument("--port", type=int, default=7860, help="port of the page (default 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    parser.add_argument("--size", type=int, default=None, help="input size S, 8n+1 (default: data.eval_size)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ...")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    parser.add_argument("--out", default=None, help="folder for the results of each request (default: temporary)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    args = parser.parse_intermixed_args(argv)
    gradio = require_gradio()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    segmenter = load_segmenter(source, config=args.config, overrides=args.overrides, size=args.size,
                               device=args.device, batch_size=1)
    demo = build_app(segmenter, args.out)
    print(f"{segmenter.info['method']} at {segmenter.size} px on {segmenter.device}: "
          f"open http://{args.host}:{args.port}", flush=True)
    demo.queue().launch(server_name=args.host, server_port=args.port, show_error=True, quiet=True,
                        allowed_paths=[str(demo.qgnet_out_root)], footer_links=[],
                        theme=gradio.themes.Default(font=["system-ui", "sans-serif"],
                                                    font_mono=["ui-monospace", "monospace"]))


if __name__ == "__main__":
    with user_errors():
        main()
