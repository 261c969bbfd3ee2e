"""Frozen, dilated (output stride 8) torchvision backbones with PFENet's layer2/3/4 taps.

Both the feature extractor F and the stage-1 prior extractor F_p are built here :

* ResNet-18/50/101 from torchvision, optionally with the PSPNet deep stem (three 3x3 convs 64, 64, 128) that
  PFENet's ``resnet50_v2.pth`` uses. Weights are loaded first, then layers 3 and 4 are dilated explicitly:
  every 3x3 conv gets stride 1 and dilation = padding = 2 (layer3) or 4 (layer4), the strided 1x1 shortcut
  gets stride 1. torchvision's ``replace_stride_with_dilation`` keeps dilation 1 in each stage's first
  block, which is a different network from the reference.
* MobileNetV2 (light backbone), same surgery on the stride-2 stages after stride 8. Taps:
  ``layer2`` = features[:7] (32 ch, stride 8), ``layer3`` = features[7:14] (96 ch, dilation 2),
  ``layer4`` = features[14:19] (1280 ch, dilation 4). layer4 ends with the 1x1 320->1280 conv + ReLU6 so
  that, like ResNet's post-ReLU layer4, it is non-negative (cosines in [0, 1], masked-out support pixels
  score the minimum 0) and is the map stage 1 trained on (``net.features``).

With input H = 8n+1 every tap is ``(H-1)/8+1`` pixels high. All parameters are frozen and the taps run
under ``torch.no_grad()``, except the stages named in ``train_layers`` (SSP's reference trains layer2/3):
their convolutions train, their BatchNorm affine parameters stay frozen, and every stage from the first
trained one on runs with autograd. BatchNorm follows the module's train/eval mode (the reference: frozen
backbones still use batch statistics and update running stats while training) unless ``freeze_bn_stats``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from common.errors import WeightsError
from common.weights import (
    ARCHS,
    MissingWeightsError,
    arch_info,
    export_arch,
    load_torchvision_weights,
    stages,
    torchvision_net,
)
from finetune.model.adapters import DRAdapter, stage_channels
from finetune.model.meta_memory import MEMORY_LAYERS


def classifier_keys(arch: str) -> set[str]:
    """State-dict keys of the ImageNet classifier, which the backbones never use."""
    return set(arch_info(arch).classifier)


STAGES = ("layer0", "layer1", "layer2", "layer3", "layer4")
ADAPTED_STAGES = ("layer0", "layer1", "layer2")  # DR-Adapter follows each of the first three stages


class FrozenBackbone(nn.Module):
    """A stride-8 trunk ``layer0 -> layer4``, frozen except the stages in ``train_layers``.

    Attributes:
        arch: torchvision architecture name.
        layer2_channels, layer3_channels, layer4_channels: channels of the three taps.
        freeze_bn_stats: keep BatchNorm in eval mode even when the module is in train mode.
        train_layers: the stages whose convolutions train (BatchNorm affine parameters stay frozen).
        adapters: trained modules applied to a stage's output, by stage name (``adapter="dr"``: a DR-Adapter
            after layer0, layer1 and layer2; :mod:`finetune.model.adapters`).
        memory, memory_layer: MMT's meta-memory and the stage it follows (:meth:`add_memory`), or None.
    """

    def __init__(self, arch: str, stages: list[nn.Module], freeze_bn_stats: bool = False,
                 train_layers: tuple[str, ...] = (), adapter: str = "none") -> None:
        super().__init__()
        self.arch = arch
        self.layer0, self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.layer2_channels, self.layer3_channels, self.layer4_channels = ARCHS[arch].taps
        self.freeze_bn_stats = freeze_bn_stats
        unknown = [name for name in train_layers if name not in STAGES]
        if unknown:
            raise ValueError(f"model.train_layers: {unknown[0]!r} is not one of {', '.join(STAGES)}")
        self.train_layers = tuple(name for name in STAGES if name in train_layers)
        self.requires_grad_(False)
        for name in self.train_layers:
            stage = getattr(self, name).requires_grad_(True)
            for module in stage.modules():
                if isinstance(module, nn.BatchNorm2d):  # the reference keeps every BatchNorm frozen
                    module.requires_grad_(False)
        if adapter not in ("none", "dr"):
            raise ValueError(f"model.adapter: {adapter!r} is not one of none, dr")
        self.adapters = nn.ModuleDict(
            {n: DRAdapter(stage_channels(getattr(self, n))) for n in ADAPTED_STAGES} if adapter == "dr" else {})
        self.memory: nn.Module | None = None  # model.meta_memory (add_memory), on the same hook as the adapters
        self.memory_layer = ""
        # autograd from the first trained stage on (or the stage after the first adapter: its gradient flows
        # back through the frozen stages); the stages before it never need a graph
        first = min([STAGES.index(n) for n in self.train_layers]
                    + [STAGES.index(n) + 1 for n in self.adapters], default=len(STAGES))
        self._graph_stages = set(STAGES[first:])

    def _run(self, name: str, x: Tensor) -> Tensor:
        """One stage, with autograd only where a trained stage needs it."""
        if name in self._graph_stages and torch.is_grad_enabled():
            x = getattr(self, name)(x)
        else:
            with torch.no_grad():
                x = getattr(self, name)(x)
        x = self.adapters[name](x) if name in self.adapters else x
        return self.memory(x) if self.memory is not None and name == self.memory_layer else x

    def add_memory(self, memory: nn.Module, layer: str) -> None:
        """Enhance ``layer``'s output with ``memory`` (MMT's meta-memory, after the stage's adapter if any)."""
        if layer not in MEMORY_LAYERS:
            raise ValueError(f"model.meta_memory_layer: {layer!r} is not one of {', '.join(MEMORY_LAYERS)}")
        self.memory, self.memory_layer = memory, layer

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Set the mode; BatchNorm stays in eval mode when ``freeze_bn_stats``."""
        super().train(mode)
        if self.freeze_bn_stats:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def to_layer3(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B,3,H,W] -> (layer2 [B,C2,h,w], layer3 [B,C3,h,w])`` with h = (H-1)/8+1."""
        x2 = self._run("layer2", self._run("layer1", self._run("layer0", x)))
        return x2, self._run("layer3", x2)

    def run_layer4(self, x3: Tensor) -> Tensor:
        """``layer3 features [B,C3,h,w] -> layer4 [B,C4,h,w]``; the support path feeds masked layer3 here."""
        return self._run("layer4", x3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B,3,H,W] -> (layer2, layer3, layer4)``, each ``[B,C,h,w]`` (gradients only through trained stages)."""
        x2, x3 = self.to_layer3(x)
        return x2, x3, self.run_layer4(x3)


def build_backbone(name: str, weights: str, deep_stem: bool = False, freeze_bn_stats: bool = False,
                   train_layers: tuple[str, ...] = (), adapter: str = "none") -> FrozenBackbone:
    """The feature extractor F.

    Args:
        name: ``resnet50``, ``resnet101``, ``resnet18`` or ``mobilenet_v2``.
        weights: path of a torchvision-format state dict (the classifier may be present or not),
            ``"torchvision"`` (torchvision's IMAGENET1K_V1 weights; downloads) or ``"random"``.
        deep_stem: ResNet with the PSPNet deep stem (the weights file must have ``conv1..conv3, bn1..bn3``).
        freeze_bn_stats: BatchNorm always in eval mode.
        train_layers: stages whose convolutions train (``model.train_layers``); none by default.
        adapter: ``dr`` = DR-Adapters after the first three stages (``model.adapter``).
    """
    arch_info(name, "model.backbone")
    if deep_stem and name not in ("resnet50", "resnet101"):
        raise ValueError(f"deep_stem is a ResNet-50/101 option, backbone is {name}")
    if weights == "torchvision":
        if deep_stem:
            raise ValueError("torchvision has no deep-stem ResNet weights")
        net = getattr(torchvision.models, name)(weights="IMAGENET1K_V1")
    else:
        net = _torchvision_net(name, deep_stem)
        if weights != "random":
            hint = (f"Put a torchvision-format {name}{' (PSPNet deep-stem)' if deep_stem else ''} ImageNet "
                    f"state dict (.safetensors or .pth) there, or set model.backbone_weights=<file>, "
                    f"'torchvision' (needs the network) or 'random'")
            try:
                load_torchvision_weights(net, name, weights, hint, "model.backbone_weights")
            except ValueError as err:
                if name.startswith("resnet") and "conv1.weight" in str(err):
                    raise ValueError(f"{err}. Is model.deep_stem={deep_stem} right for this file?") from err
                raise
    return FrozenBackbone(name, _stages(net, name, deep_stem), freeze_bn_stats, tuple(train_layers), adapter)


def resolve_prior_arch(path: str, arch: str = "auto") -> str:
    """The prior's architecture: the one its export records, checked against an explicit ``arch``.

    Raises:
        WeightsError: the two disagree (both named), or neither names one.
        MissingWeightsError: ``path`` does not exist (with what to put there).
    """
    if path == "random":  # no file to read an architecture from: the reference prior's, unless named
        return "resnet50" if arch == "auto" else arch
    if not Path(path).is_file():
        raise MissingWeightsError(f"model.prior: weights file not found: {path}. Export a stage-1 prior there with "
                                  f"`python -m pretrain.export RUN_DIR --out {path}`, or set model.prior=<file> "
                                  "(model.method=pfenet trains the baseline without a prior)")
    recorded = export_arch(path, "model.prior")
    if arch == "auto":
        if recorded is None:
            raise WeightsError(f"model.prior={path} records no architecture in its metadata; set model.prior_arch")
        return recorded
    if recorded is not None and recorded != arch:
        raise WeightsError(f"model.prior_arch={arch}, but model.prior={path} records arch={recorded}; "
                           "drop model.prior_arch or set it to the recorded one")
    return arch


def build_prior(path: str, arch: str = "auto", freeze_bn_stats: bool = False) -> FrozenBackbone:
    """The stage-1 prior extractor F_p (torchvision 7x7 stem), loaded from ``pretrain.export``'s file.

    Args:
        path: the exported state dict; only the classifier may be missing. ``"random"`` = random init.
        arch: the stage-1 architecture; ``auto`` reads it from the export (:func:`resolve_prior_arch`).
    """
    arch = resolve_prior_arch(path, arch)
    arch_info(arch, "model.prior_arch")
    net = _torchvision_net(arch, deep_stem=False)
    if path != "random":
        load_torchvision_weights(net, arch, path, key="model.prior")
    return FrozenBackbone(arch, _stages(net, arch, deep_stem=False), freeze_bn_stats)


def _torchvision_net(name: str, deep_stem: bool) -> nn.Module:
    net = torchvision_net(name)
    if deep_stem:  # PSPNet layout: conv1/bn1 .. conv3/bn3 at the top level, layer1 fed 128 channels
        net.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        net.conv2 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        net.bn2 = nn.BatchNorm2d(64)
        net.conv3 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        net.bn3 = nn.BatchNorm2d(128)
        first = net.layer1[0]
        first.conv1 = nn.Conv2d(128, first.conv1.out_channels, 1, bias=False)
        first.downsample[0] = nn.Conv2d(128, first.downsample[0].out_channels, 1, bias=False)
    return net


def _dilate(stage: nn.Module, dilation: int) -> None:
    """PFENet surgery: every 3x3 conv -> stride 1, dilation = padding = ``dilation``; strided 1x1 -> stride 1."""
    for module in stage.modules():
        if not isinstance(module, nn.Conv2d):
            continue
        if module.kernel_size == (3, 3):
            module.dilation, module.padding = (dilation, dilation), (dilation, dilation)
        module.stride = (1, 1)


def _stages(net: nn.Module, name: str, deep_stem: bool) -> list[nn.Module]:
    """torchvision's five stages with PFENet's dilation of layer3 (2) and layer4 (4): output stride 8."""
    layers = stages(net, name, deep_stem)
    _dilate(layers[3], 2)
    _dilate(layers[4], 4)
    return layers
