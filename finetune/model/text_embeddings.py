"""Class captions (JSON, shipped in ``configs/finetune/captions/``) and the text-embedding file made from them.

A captions file names one or more sentences per class and for the background::

    {"about": "what the file covers (optional)",
     "background": "a sentence, or a list of sentences, describing what is not the target",
     "classes": {"lungs": "A chest radiograph ...", "polyp": ["...", "..."]}}

Class names are compared normalised (:func:`fewshot.data.sources.normalise_name`: lower case, runs of spaces,
``_`` and ``-`` as one ``_``), so ``"seborrheic keratosis"`` matches the benchmark name ``seborrheic_keratosis``;
a several-source run's ``"coco-mini:person"`` matches ``person``. Several files merge (a run's source and target
classes): a class named twice must have the same captions, background sentences are pooled.

``python -m finetune.tools.embed_text`` embeds the captions once with a frozen text encoder and writes a
safetensors file: ``vectors [N, d]`` (every caption), ``class_index [N]`` (its class row), ``background [Nb, d]``;
metadata ``names`` (JSON list, row order), ``encoder``, ``encoder_detail``, ``captions_sha256`` (of the merged
captions, canonical JSON) and ``captions`` (the merged captions themselves). ``model.text_guidance`` reads it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open
from torch import Tensor

from common.errors import DataError, WeightsError
from common.io import save_tensors
from fewshot.data.sources import normalise_name

FORMAT = "cdtg-text-embeddings/1"
CAPTION_KEYS = {"about", "background", "classes"}


@dataclass
class Captions:
    """Merged captions: normalised class name -> sentences, the background sentences, and their sha256."""

    classes: dict[str, list[str]]
    background: list[str]
    sha256: str


def _sentences(value: object, where: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(s, str) and s.strip() for s in items):
        raise DataError(f"{where}: expected a non-empty sentence or a non-empty list of them, got {value!r}")
    return [s.strip() for s in items]


def read_captions(paths: list[str | Path]) -> Captions:
    """Read and merge captions files (format in the module docstring).

    Raises:
        DataError: naming the file: missing, not JSON, an unknown key, an empty caption, no background, or a
            class given different captions in two files.
    """
    classes: dict[str, list[str]] = {}
    origin: dict[str, Path] = {}
    background: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path}: captions file not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, dict) or set(data) - CAPTION_KEYS or "classes" not in data:
            raise DataError(f"{path}: expected an object with keys {sorted(CAPTION_KEYS)} ('classes' required), "
                            f"got {sorted(data) if isinstance(data, dict) else type(data).__name__}")
        if "background" in data:
            background += [s for s in _sentences(data["background"], f"{path}: background") if s not in background]
        if not isinstance(data["classes"], dict) or not data["classes"]:
            raise DataError(f"{path}: 'classes' must map class names to captions")
        for name, value in data["classes"].items():
            key, sentences = normalise_name(name), _sentences(value, f"{path}: class {name!r}")
            if key in classes and classes[key] != sentences:
                raise DataError(f"{path}: class {name!r} has other captions in {origin[key]}; give it one set")
            classes[key], origin[key] = sentences, path
    if not background:
        raise DataError(f"{', '.join(map(str, paths))}: no 'background' caption in any captions file")
    canonical = json.dumps({"background": background, "classes": classes}, sort_keys=True, ensure_ascii=False)
    return Captions(classes, background, hashlib.sha256(canonical.encode()).hexdigest())


@dataclass
class TextEmbeddings:
    """The contents of a text-embedding file (see the module docstring)."""

    names: list[str]            # normalised class names, row order
    vectors: Tensor             # [N, d] every caption's embedding
    class_index: Tensor         # [N] the class row of each caption
    background: Tensor          # [Nb, d]
    encoder: str
    captions_sha256: str
    path: str = ""

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def row(self, class_name: str) -> int | None:
        """The row of a benchmark class name (normalised; a ``source:`` prefix is dropped), None if absent."""
        name = normalise_name(class_name)
        for candidate in (name, normalise_name(str(class_name).rsplit(":", 1)[-1])):
            if candidate in self.names:
                return self.names.index(candidate)
        return None


def save_text_embeddings(path: str | Path, captions: Captions, class_vectors: dict[str, Tensor], background: Tensor,
                         encoder: str, encoder_detail: str = "") -> Path:
    """Write the file: ``class_vectors[name] [m, d]`` per class of ``captions`` (its captions' order)."""
    names = list(captions.classes)
    vectors = torch.cat([class_vectors[n].float() for n in names])
    index = torch.cat([torch.full((len(class_vectors[n]),), i, dtype=torch.long) for i, n in enumerate(names)])
    meta = {"format": FORMAT, "names": json.dumps(names), "encoder": encoder, "encoder_detail": encoder_detail,
            "captions_sha256": captions.sha256,
            "captions": json.dumps({"background": captions.background, "classes": captions.classes})}
    return save_tensors(path, {"vectors": vectors.contiguous(), "class_index": index,
                               "background": background.float().contiguous()}, meta)


def load_text_embeddings(path: str | Path) -> TextEmbeddings:
    """Read a file written by :func:`save_text_embeddings`.

    Raises:
        WeightsError: naming the file: missing (with the command that makes it), unreadable, or not this format.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"model.text_guidance={path}: file not found; make it with `python -m "
                          "finetune.tools.embed_text configs/finetune/captions/<source>.json "
                          f"configs/finetune/captions/cdfss.json --encoder minilm --out {path}`")
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"model.text_guidance={path}: not a readable safetensors file ({err})") from err
    if meta.get("format") != FORMAT or set(tensors) != {"vectors", "class_index", "background"}:
        raise WeightsError(f"model.text_guidance={path}: not a text-embedding file of finetune.tools.embed_text "
                          f"(format {meta.get('format')!r}, tensors {sorted(tensors)})")
    names = json.loads(meta["names"])
    vectors, index, background = tensors["vectors"], tensors["class_index"], tensors["background"]
    if (vectors.dim() != 2 or background.dim() != 2 or background.shape[1] != vectors.shape[1]
            or index.shape != (vectors.shape[0],) or sorted(set(index.tolist())) != list(range(len(names)))):
        raise WeightsError(f"model.text_guidance={path}: inconsistent shapes (vectors {tuple(vectors.shape)}, "
                          f"class_index {tuple(index.shape)}, background {tuple(background.shape)}, "
                          f"{len(names)} names)")
    return TextEmbeddings(names, vectors.float(), index.long(), background.float(), meta.get("encoder", ""),
                          meta.get("captions_sha256", ""), str(path))
