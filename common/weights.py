"""Weights, in one place for both stages: the torchvision architectures we use, their stages, and safe loading.

* ``ARCHS``: every architecture the project builds (channels of the stage taps, classifier keys).
* :func:`torchvision_net` / :func:`stages` / :func:`trunk_features`: a torchvision network and its five stages
  ``layer0..layer4`` (ResNet: stem+maxpool, layer1..4; MobileNetV2: ``features[:2] [2:4] [4:7] [7:14]
  [14:19]``), the split both stages, the probe and the stage-2 backbones rely on.
* :func:`load_state_dict_file`: ``.safetensors`` or a torch pickle read with ``weights_only=True`` (no pickled
  code ever runs); wrappers (``{"state_dict": ...}``) and DataParallel / ``torch.compile`` prefixes removed.
* :func:`load_into`: the MoCo linear-probe contract: the keys a file leaves missing must be exactly the
  expected ones (the classifier), anything else is an error naming the keys.
* :func:`export_arch`: the ``arch`` a stage-1 export records in its metadata, which stage 2 reads.

Every failure is a :class:`~common.errors.WeightsError` naming the file (and the config key when given).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from common.errors import WeightsError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class Arch:
    """What the project needs to know of one torchvision architecture."""

    taps: tuple[int, int, int]  # channels of layer2 (stride 8), layer3 (16), layer4 (32)
    classifier: frozenset[str]  # state-dict keys of the ImageNet classifier

    @property
    def feature_dim(self) -> int:
        """Channels of the last feature map (what a pooled embedding has)."""
        return self.taps[2]


_RESNET_FC = frozenset({"fc.weight", "fc.bias"})
ARCHS: dict[str, Arch] = {
    "resnet18": Arch((128, 256, 512), _RESNET_FC),
    "resnet50": Arch((512, 1024, 2048), _RESNET_FC),
    "resnet101": Arch((512, 1024, 2048), _RESNET_FC),
    # layer4 ends with the 1x1 320->1280 conv + ReLU6: non-negative like ResNet's post-ReLU layer4
    "mobilenet_v2": Arch((32, 96, 1280), frozenset({"classifier.1.weight", "classifier.1.bias"})),
}
MOBILENET_STAGE_ENDS = (2, 4, 7, 14, 19)  # features[a:b] of layer0..layer4


class MissingWeightsError(WeightsError, FileNotFoundError):
    """The weights file does not exist; the message says what to put where."""


def arch_info(arch: str, key: str = "arch") -> Arch:
    """The table entry of ``arch``; an unknown name is a WeightsError naming ``key`` and the choices."""
    if arch not in ARCHS:
        raise WeightsError(f"{key}={arch!r} is not a known architecture; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch]


def torchvision_net(arch: str, norm_layer: Callable[..., nn.Module] | None = None) -> nn.Module:
    """``torchvision.models.<arch>(weights=None)``, optionally with another normalisation layer."""
    arch_info(arch)
    kwargs = {"norm_layer": norm_layer} if norm_layer is not None else {}
    return getattr(torchvision.models, arch)(weights=None, **kwargs)


def stages(net: nn.Module, arch: str, deep_stem: bool = False) -> list[nn.Module]:
    """The five stages ``layer0..layer4`` of a torchvision network (modules shared with ``net``, not copies).

    ``deep_stem``: the PSPNet ResNet stem (conv1..conv3 with bn1..bn3, see ``finetune.model.backbones``).
    """
    if arch.startswith("resnet"):
        stem = [net.conv1, net.bn1, nn.ReLU(inplace=True)]
        if deep_stem:
            stem += [net.conv2, net.bn2, nn.ReLU(inplace=True), net.conv3, net.bn3, nn.ReLU(inplace=True)]
        return [nn.Sequential(*stem, net.maxpool), net.layer1, net.layer2, net.layer3, net.layer4]
    starts = (0, *MOBILENET_STAGE_ENDS[:-1])
    return [net.features[a:b] for a, b in zip(starts, MOBILENET_STAGE_ENDS)]


def trunk_features(net: nn.Module, x: Tensor, last: int = 4) -> Tensor:
    """Run a torchvision ResNet / MobileNetV2 up to stage ``last`` (3: stride 16, 4: stride 32).

    ``[B,3,H,W] -> [B,C,H/2^(last+1),W/2^(last+1)]``; no module is created per call.
    """
    if hasattr(net, "layer4"):
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4)[:last]:
            x = layer(x)
        return x
    return net.features[:MOBILENET_STAGE_ENDS[last]](x)


def read_metadata(path: str | Path, key: str = "") -> dict[str, str]:
    """The string metadata of a safetensors file ({} for other files or none); ``key`` names the config key."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        where = f"{key}: " if key else ""
        raise WeightsError(f"{where}{path}: not a readable safetensors file ({err})") from err


def export_arch(path: str | Path, key: str = "") -> str | None:
    """The ``arch`` recorded by ``python -m pretrain.export`` in a prior file's metadata, or None."""
    return read_metadata(path, key).get("arch")


def load_state_dict_file(path: str | Path, hint: str = "", key: str = "") -> dict[str, Tensor]:
    """Read a flat ``name -> tensor`` dict from ``path`` without executing code.

    Args:
        path: ``.safetensors`` file, or a torch file (``.pth``/``.pt``/``.pth.tar``) holding a state dict or
            ``{"state_dict": state_dict}``.
        hint: appended to the error when the file is missing (what to put there, which key to set).
        key: the config key that named the file, for messages (``model.init_weights``).

    Raises:
        MissingWeightsError: no file at ``path``.
        WeightsError: the file cannot be read safely or does not hold a dict of tensors.
    """
    path = Path(path)
    where = f"{key}: " if key else ""
    if not path.is_file():
        raise MissingWeightsError(f"{where}weights file not found: {path}" + (f". {hint}" if hint else ""))
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors / unpickler errors carry no file name
        raise WeightsError(f"{where}{path}: cannot be read as a state dict without executing code ({err})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{where}{path}: expected a non-empty dict of tensors, got {type(state).__name__}")
    out = {}
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise WeightsError(f"{where}{path}: entry '{name}' is a {type(value).__name__}, not a tensor")
        name = str(name)
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        out[name] = value
    return out


def load_into(model: nn.Module, state: dict[str, Tensor], expected_missing: set[str] | frozenset[str],
              source: str = "") -> None:
    """Load ``state`` into ``model``; the keys it leaves missing must be exactly ``expected_missing``.

    This is the MoCo linear-probe check: a classifier is expected to be absent, anything else absent or
    extra means the file is not the network it claims to be.

    Raises:
        WeightsError: listing the unexpectedly missing, wrongly present, extra or wrongly shaped keys.
    """
    where = f"{source}: " if source else ""
    own = model.state_dict()
    bad_shape = sorted(f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})"
                       for k, v in state.items() if k in own and own[k].shape != v.shape)
    if bad_shape:
        raise WeightsError(f"{where}shape mismatch with {type(model).__name__}: {', '.join(bad_shape[:5])}"
                           + (f" and {len(bad_shape) - 5} more" if len(bad_shape) > 5 else ""))
    missing, unexpected = model.load_state_dict(state, strict=False)
    problems = []
    if set(missing) - set(expected_missing):
        problems.append(f"missing {sorted(set(missing) - set(expected_missing))}")
    if set(expected_missing) - set(missing):
        problems.append(f"present but expected absent {sorted(set(expected_missing) - set(missing))}")
    if unexpected:
        problems.append(f"unexpected {sorted(unexpected)}")
    if problems:
        raise WeightsError(f"{where}does not match {type(model).__name__} "
                           f"(expected exactly {sorted(expected_missing)} missing): {'; '.join(problems)}")


def load_torchvision_weights(net: nn.Module, arch: str, path: str | Path, hint: str = "", key: str = "",
                             adapt: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None) -> None:
    """Fill a torchvision ``net`` of ``arch`` from a file: the classifier may be present or not, nothing else
    may differ. ``adapt`` rewrites the state first (e.g. repeating BN statistics for SplitBatchNorm)."""
    head = arch_info(arch).classifier
    state = {k: v for k, v in load_state_dict_file(path, hint, key).items() if k not in head}
    if adapt is not None:
        state = adapt(state)
    where = f"{key}={path}" if key else str(path)
    load_into(net, state, expected_missing=head & set(net.state_dict()), source=where)
