"""Read state-dict files without unpickling code and load them with an exact missing-key contract.

Files are ``.safetensors`` or torch pickles read with ``weights_only=True``. Checkpoint wrappers
(``{"state_dict": ...}``) and the prefixes DataParallel/DDP (``module.``) and ``torch.compile``
(``_orig_mod.``) add are removed, so a MoCo/PFENet-style checkpoint and a plain torchvision state dict
read the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_state_dict_file(path: str | Path, hint: str = "") -> dict[str, Tensor]:
    """Read a flat ``name -> tensor`` dict from ``path``.

    Args:
        path: ``.safetensors`` file, or a torch file (``.pth``/``.pt``/``.pth.tar``) holding a state dict or
            ``{"state_dict": state_dict}``.
        hint: appended to the error when the file is missing (what to put there, which key to set).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file cannot be read safely or does not hold a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}" + (f". {hint}" if hint else ""))
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors / unpickler errors carry no file name
        raise ValueError(f"{path}: cannot be read as a state dict without executing code ({err})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: expected a non-empty dict of tensors, got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{path}: entry '{key}' is a {type(value).__name__}, not a tensor")
        name = str(key)
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        out[name] = value
    return out


def load_into(model: nn.Module, state: dict[str, Tensor], expected_missing: set[str], source: str = "") -> None:
    """Load ``state`` into ``model``; the keys it leaves missing must be exactly ``expected_missing``.

    This is the MoCo linear-probe check: a classifier is expected to be absent, anything else absent or
    extra means the file is not the network it claims to be.

    Raises:
        ValueError: listing the unexpectedly missing, wrongly present, extra or wrongly shaped keys.
    """
    where = f"{source}: " if source else ""
    own = model.state_dict()
    bad_shape = sorted(f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})"
                       for k, v in state.items() if k in own and own[k].shape != v.shape)
    if bad_shape:
        raise ValueError(f"{where}shape mismatch with {type(model).__name__}: {', '.join(bad_shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    problems = []
    if set(missing) - expected_missing:
        problems.append(f"missing {sorted(set(missing) - expected_missing)}")
    if expected_missing - set(missing):
        problems.append(f"present but expected absent {sorted(expected_missing - set(missing))}")
    if unexpected:
        problems.append(f"unexpected {sorted(unexpected)}")
    if problems:
        raise ValueError(f"{where}does not match {type(model).__name__} "
                         f"(expected exactly {sorted(expected_missing)} missing): {'; '.join(problems)}")
