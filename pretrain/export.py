"""Export the prior extractor from a stage-1 checkpoint as a plain torchvision state dict.

    python -m pretrain.export RUN_DIR_or_CHECKPOINT --out prior_r50.safetensors [--encoder key|query]

The default is the momentum (key) encoder, which QGNet's reference code loads. Projection heads, queues and
the classifier are dropped; SplitBatchNorm statistics are folded into plain BatchNorm buffers (the mean over
splits, exactly what SplitBatchNorm itself uses in eval mode). The result loads into the matching
torchvision constructor (``torchvision.models.resnet50()``) with missing keys exactly the classifier's.
A ``.pth`` twin named with its sha256 prefix (the torch.hub convention) is written beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from common.checkpoint import TRAIN_STATE, find_checkpoint
from common.errors import WeightsError
from common.io import save_tensors, write_bytes
from common.weights import arch_info, load_into, torchvision_net

ENCODER_PREFIX = {"key": "key_encoder.", "query": "query_encoder."}


def resolve_checkpoint(source: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its newest checkpoint)."""
    source = Path(source)
    if (source / TRAIN_STATE).is_file():
        return source
    found = find_checkpoint(source, "auto") if source.is_dir() else None
    if found is None:
        raise FileNotFoundError(f"{source}: neither a checkpoint folder nor a run folder with checkpoints")
    return found


def extract_encoder(model_state: dict[str, Tensor], encoder: str = "key") -> dict[str, Tensor]:
    """The chosen encoder's weights with its prefix stripped and SplitBatchNorm folded to plain BN."""
    prefix = ENCODER_PREFIX[encoder]
    state = {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}
    if not state:
        raise KeyError(f"no '{prefix}*' weights in the checkpoint (keys start with "
                       f"{sorted({k.split('.')[0] for k in model_state})})")
    for name in [k for k in state if k.endswith(("running_mean", "running_var"))]:
        channels = state[name.rsplit(".", 1)[0] + ".weight"].numel()
        if state[name].numel() != channels:  # SplitBatchNorm keeps channels x splits statistics
            state[name] = state[name].view(-1, channels).mean(dim=0)
    return {k: v.contiguous().clone() for k, v in state.items()}


def check_loads_into_torchvision(state: dict[str, Tensor], arch: str) -> torch.nn.Module:
    """Load into ``torchvision.models.<arch>()``; missing keys must be exactly the classifier's, nothing extra."""
    net = torchvision_net(arch)
    try:
        load_into(net, state, expected_missing=arch_info(arch).classifier)
    except WeightsError as err:
        raise WeightsError(f"export does not match torchvision {arch}: {err}") from err
    return net


def export_prior(source: str | Path, out: str | Path, encoder: str = "key") -> tuple[Path, Path]:
    """Write ``out`` (safetensors) and its ``<stem>-<sha256[:8]>.pth`` twin; returns both paths."""
    ckpt = resolve_checkpoint(source)
    train_state = json.loads((ckpt / TRAIN_STATE).read_text())
    arch = train_state["arch"]
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{ckpt}: no model.safetensors (was it written by pretrain/run.py?)")
    state = extract_encoder(load_file(str(weights)), encoder)
    check_loads_into_torchvision(state, arch)
    out = Path(out)
    meta = {"format": "pt", "arch": arch, "encoder": encoder, "source_checkpoint": str(ckpt.resolve()),
            "step": str(train_state["step"]), "layout": "torchvision"}
    save_tensors(out, state, meta)
    buffer = io.BytesIO()
    torch.save(state, buffer)  # named by the hash of its bytes, the torch.hub convention
    pth = write_bytes(out.with_name(f"{out.stem}-{hashlib.sha256(buffer.getvalue()).hexdigest()[:8]}.pth"),
                      buffer.getvalue())
    return out, pth


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run folder (its newest checkpoint is used) or checkpoint folder")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.add_argument("--encoder", choices=["key", "query"], default="key",
                        help="key: the momentum encoder (what QGNet loads, default); query: the trained one")
    args = parser.parse_args(argv)
    st, pth = export_prior(args.source, args.out, args.encoder)
    print(f"prior extractor ({args.encoder} encoder) written to {st} and {pth}")


if __name__ == "__main__":
    main()
