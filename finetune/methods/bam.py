"""``model.method=bam``: Learning What Not to Segment (BAM, CVPR 2022): a base learner that knows the training
classes tells a few-shot meta learner where *not* to look.

Two stages, both ``accelerate launch finetune/run.py``:

1. ``train.stage=base``: :class:`BaseLearner` = the backbone + a PSPNet head (pyramid pooling, bins 1/2/3/6, and a
   classifier), trained as an ordinary semantic segmenter of the training split's classes + background
   (:mod:`fewshot.data.base_labels`: novel-class pixels -> background, 255 kept), with plain cross-entropy;
   ``model.train_layers`` fine-tunes backbone stages as the reference does (its whole ResNet), [] keeps the
   backbone frozen. Its ``last_model.safetensors`` records the class -> channel table in its metadata.
2. the meta stage (``model.base_learner=RUN_DIR``): :class:`BAM`, whose backbone and base head are loaded from
   that run and frozen (BatchNorm in eval mode: the base learner is used as it was trained).

Shape walk (h = (S-1)/8+1, n base channels, K shots):

    meta learner = PFENet (QGNet without the prior; + QGNet's prior map with ``model.extra_maps: [prior]``)
                   -> meta logits [B,2,h,w]
    base learner = base_head(layer4 of the query) -> [B,1+n,h,w]
    Gram: psi_k = ||G(q2) - G(s2_k)||_F / ||1||_F, G = cosines between the C channels of layer2 [B,C,C]
          K > 1 (``model.kshot`` = K): w = softmax(unsort(kshot_rw(sorted psi))); psi = sum_k w_k psi_k   [B]
    ensemble on probabilities: p = softmax(meta), b = softmax(base)
          fg = gram_merge([p_fg, psi]),  bg = cls_merge([gram_merge([p_bg, psi]), sum_{c >= 1} b_c])
          1x1 convolutions without bias, initialised to [1, 0] (so the ensemble starts as the meta learner);
          in training the episode's own class is left out of the base sum (:meth:`BAM.loss` gets the class ids)
    logits [B,2,S,S] = upsample([bg, fg])

Loss: ``CE(final) + CE(meta) + aux_weight * mean CE(FEM aux)`` (``model.balanced_loss`` as for qgnet).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import WeightsError
from common.weights import load_state_dict_file, read_metadata
from fewshot.segmenter import SegmenterOutput
from finetune.methods.base import register
from finetune.methods.qgnet import QGNet, QueryFeatures, SupportFeatures, balanced_cross_entropy, qgnet_loss
from finetune.model.backbones import FrozenBackbone, build_backbone, build_prior
from finetune.model.config import ModelConfig

PPM_BINS = (1, 2, 3, 6)
KSHOT_HIDDEN = 2          # the reference's kshot_trans_dim
GRAM_EPS = 1e-7
BASE_WEIGHTS = "last_model.safetensors"   # the base stage has no validation: its last weights are the learner
META_CHANNELS = "bam_base_channels"       # weights metadata: JSON {class id: channel}


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: the input and, per bin, avg-pool -> 1x1 conv + BN + ReLU -> upsample, concatenated.
    ``[B,C,h,w] -> [B, C + len(bins) * reduction, h, w]``."""

    def __init__(self, channels: int, reduction: int, bins: tuple[int, ...] = PPM_BINS) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(channels, reduction, 1, bias=False),
                          nn.BatchNorm2d(reduction), nn.ReLU(inplace=True)) for b in bins)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        return torch.cat([x, *(F.interpolate(s(x), size=size, mode="bilinear", align_corners=True)
                               for s in self.stages)], dim=1)


class BaseHead(nn.Module):
    """PSPNet's head: pyramid pooling + 3x3 conv, BN, ReLU, Dropout2d(0.1), 1x1 conv to ``classes`` (1 + n)."""

    def __init__(self, channels: int, classes: int, hidden: int = 512) -> None:
        super().__init__()
        self.ppm = PyramidPooling(channels, channels // len(PPM_BINS))
        self.cls = nn.Sequential(nn.Conv2d(2 * channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                                 nn.ReLU(inplace=True), nn.Dropout2d(0.1), nn.Conv2d(hidden, classes, 1))

    def forward(self, layer4: Tensor) -> Tensor:
        """``[B,C4,h,w] -> [B,classes,h,w]`` logits."""
        return self.cls(self.ppm(layer4))


class BaseLearner(nn.Module):
    """The base stage's model: backbone + :class:`BaseHead` over the base classes; ``channel_of``: class id ->
    channel 1..n (0 = background)."""

    def __init__(self, backbone: FrozenBackbone, channel_of: dict[int, int], hidden: int = 512) -> None:
        super().__init__()
        self.backbone, self.channel_of = backbone, dict(channel_of)
        self.head = BaseHead(backbone.layer4_channels, 1 + max(channel_of.values(), default=0), hidden)

    def forward(self, images: Tensor) -> Tensor:
        """``[B,3,S,S] -> [B,1+n,S,S]`` logits."""
        logits = self.head(self.backbone(images)[2])
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=True)

    def loss(self, logits: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy against ``target [B,S,S]`` (channels, 255 ignored)."""
        ce = F.cross_entropy(logits, target.long(), ignore_index=255)
        return ce, {"base": ce.detach()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def weights_metadata(self) -> dict[str, str]:
        """What the meta stage checks: the class -> channel table and the backbone."""
        return {META_CHANNELS: json.dumps({str(c): j for c, j in self.channel_of.items()}),
                "bam_backbone": self.backbone.arch}


def gram_matrix(features: Tensor) -> Tensor:
    """``[B,C,h,w] -> [B,C,C]``: cosine similarity between every pair of channels (spatial vectors)."""
    f = features.float().flatten(2)
    norms = f.norm(dim=2, keepdim=True)
    return torch.bmm(f, f.transpose(1, 2)) / (torch.bmm(norms, norms.transpose(1, 2)) + GRAM_EPS)


def gram_distance(query: Tensor, support: Tensor) -> Tensor:
    """psi = ``||G_q - G_s||_F / ||1||_F`` (``||1||_F = C`` for C x C): ``[B,C,h,w]`` x 2 -> ``[B]`` in [0, ~2]."""
    with torch.autocast(query.device.type, enabled=False):
        diff = gram_matrix(query) - gram_matrix(support)
        return diff.flatten(1).norm(dim=1) / query.shape[1]


def identity_merge() -> nn.Conv2d:
    """A 1x1 convolution 2 -> 1 without bias, initialised to weights [1, 0] (passes its first input through)."""
    conv = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
    return conv


class BAM(QGNet):
    """BAM's meta stage: PFENet meta learner, frozen base learner, Gram adjustment, ensemble (module docstring).

    Args:
        backbone, prior, bins, reduce_dim, dropout, sim_chunk, aux_weight, balanced_loss: as :class:`QGNet`
            (``prior`` = the optional extra prior map).
        base_head: the base stage's head, frozen here.
        channel_of: class id -> base channel (1..n) of the base stage's training classes.
        kshot: the shot count the k-shot reweighting is built for (1 = none; other shot counts average psi).
    """

    keep_support_layer2 = True

    def __init__(self, backbone: FrozenBackbone, prior: FrozenBackbone | None, base_head: BaseHead,
                 channel_of: dict[int, int], bins: list[float], reduce_dim: int = 256, dropout: float = 0.5,
                 sim_chunk: int = 0, aux_weight: float = 1.0, balanced_loss: bool = False, kshot: int = 1) -> None:
        super().__init__(backbone, prior, bins, reduce_dim, dropout, sim_chunk=sim_chunk, aux_weight=aux_weight,
                         balanced_loss=balanced_loss)
        self.backbone.requires_grad_(False)
        self.base_head = base_head.requires_grad_(False)
        self.channel_of = dict(channel_of)
        self.gram_merge, self.cls_merge = identity_merge(), identity_merge()
        self.kshot = kshot
        self.kshot_rw = (nn.Sequential(nn.Conv2d(kshot, KSHOT_HIDDEN, 1), nn.ReLU(inplace=True),
                                       nn.Conv2d(KSHOT_HIDDEN, kshot, 1)) if kshot > 1 else None)

    def train(self, mode: bool = True) -> BAM:
        """The backbone and the base head stay in eval mode: they are the base learner as it was trained."""
        super().train(mode)
        self.backbone.eval()
        self.base_head.eval()
        return self

    def shot_weights(self, psi: Tensor) -> Tensor:
        """``psi [B,K]`` -> weights ``[B,K]`` summing to 1: the reference's reweighting of the sorted distances when
        K == ``kshot`` > 1, else uniform."""
        k = psi.shape[1]
        if self.kshot_rw is None or k != self.kshot:
            return torch.full_like(psi, 1.0 / k)
        ordered, order = psi.sort(dim=1)
        w_sorted = self.kshot_rw(ordered[:, :, None, None])[:, :, 0, 0]
        return torch.empty_like(w_sorted).scatter_(1, order, w_sorted).softmax(dim=1)

    def ensemble(self, meta_logits: Tensor, base_logits: Tensor, psi: Tensor, drop: Tensor | None = None) -> Tensor:
        """``meta [B,2,h,w]``, ``base [B,1+n,h,w]``, ``psi [B]``, ``drop [B]`` (a base channel per episode left out
        of the base sum, 0 = none) -> ``[B,2,h,w]`` (background, foreground) scores."""
        meta, base = meta_logits.float().softmax(1), base_logits.float().softmax(1)
        base_sum = base[:, 1:].sum(1, keepdim=True)
        if drop is not None:
            own = base.gather(1, drop.view(-1, 1, 1, 1).expand(-1, 1, *base.shape[-2:]))
            base_sum = base_sum - own * (drop > 0).view(-1, 1, 1, 1)
        psi_map = psi.float().view(-1, 1, 1, 1).expand_as(meta[:, :1])
        bg = self.gram_merge(torch.cat([meta[:, :1], psi_map], 1))
        fg = self.gram_merge(torch.cat([meta[:, 1:], psi_map], 1))
        return torch.cat([self.cls_merge(torch.cat([bg, base_sum], 1)), fg], 1)

    def decode(self, query: QueryFeatures, supports: SupportFeatures) -> SegmenterOutput:
        """Meta and base learner, Gram adjustment, ensemble; maps: guided (prior), base_background."""
        meta = self.decode_features(query, supports)
        supports = supports.expand(query.taps[0].shape[0])
        with torch.no_grad():
            base_logits = self.base_head(query.taps[2])                            # [B,1+n,h,w]
        distances = torch.stack([gram_distance(query.taps[0], s2) for s2 in supports.layer2], 1)  # [B,K]
        psi = (self.shot_weights(distances) * distances).sum(1)                     # [B]
        final = self.ensemble(meta.logits, base_logits, psi)
        maps = {**meta.maps, "base_background": base_logits.float().softmax(1)[:, :1]}
        out = SegmenterOutput(F.interpolate(final, size=query.size, mode="bilinear", align_corners=True), maps,
                              aux_logits=meta.aux_logits)
        out.loss_inputs = {"meta_logits": meta.logits, "base_logits": base_logits, "psi": psi}
        return out

    def base_channels_of(self, classes: Tensor) -> Tensor:
        """Episode class ids ``[B]`` -> their base channels; a class the base learner never learnt is an error."""
        unknown = [int(c) for c in classes.tolist() if int(c) not in self.channel_of]
        if unknown:
            raise ValueError(f"bam: training class {unknown[0]} is not a class of the base learner "
                             "(model.base_learner was trained on other training classes: rerun train.stage=base "
                             "with this config)")
        return torch.tensor([self.channel_of[int(c)] for c in classes.tolist()], device=classes.device)

    def loss(self, out: SegmenterOutput, target: Tensor,
             classes: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``CE(final) + CE(meta) + aux_weight * aux``; the final answer is recomputed without the episodes' own
        classes in the base sum (``classes [B]``; without them, as at test time, nothing is left out)."""
        extra, size = out.loss_inputs, target.shape[-2:]
        drop = self.base_channels_of(classes) if classes is not None else None
        final = self.ensemble(extra["meta_logits"], extra["base_logits"], extra["psi"], drop)
        meta_out = SegmenterOutput(F.interpolate(extra["meta_logits"], size=size, mode="bilinear",
                                                 align_corners=True), aux_logits=out.aux_logits)
        meta_total, parts = qgnet_loss(meta_out, target, self.aux_weight, balanced=self.balanced_loss)
        final = F.interpolate(final, size=size, mode="bilinear", align_corners=True)
        target = target.long()
        main = (balanced_cross_entropy(final, target) if self.balanced_loss
                else F.cross_entropy(final, target, ignore_index=255))
        parts = {"main": main.detach(), "meta": parts["main"], "aux": parts["aux"]}
        return self.add_adapter_loss(main + meta_total, parts)

    @torch.no_grad()
    def gfss_scores(self, query: Tensor, supports: Tensor, support_masks: Tensor) -> tuple[Tensor, Tensor]:
        """Generalized FSS: (final scores ``[B,2,S,S]``, base-learner logits ``[B,1+n,S,S]``)."""
        q = self.encode_query(query)
        out = self.decode(q, self.encode_supports(supports, support_masks))
        base = F.interpolate(out.loss_inputs["base_logits"], size=q.size, mode="bilinear", align_corners=True)
        return out.logits, base


def load_base_learner(source: str) -> tuple[Path, dict[str, Tensor], dict[int, int]]:
    """(weights file, state dict, class -> channel) of a base-stage run folder or weights file."""
    path = Path(source)
    path = path / BASE_WEIGHTS if path.is_dir() else path
    hint = ("train it first: accelerate launch finetune/run.py --config CONFIG train.stage=base, then pass that "
            "run folder")
    if not path.is_file():
        raise WeightsError(f"model.base_learner={source}: no base-stage weights at {path} ({hint})")
    meta = read_metadata(path, "model.base_learner")
    if META_CHANNELS not in meta:
        raise WeightsError(f"model.base_learner={source}: {path} is not a BAM base-stage run (its metadata has no "
                           f"{META_CHANNELS}; {hint})")
    channel_of = {int(c): int(j) for c, j in json.loads(meta[META_CHANNELS]).items()}
    return path, load_state_dict_file(path, key="model.base_learner"), channel_of


def build_base_learner(cfg: ModelConfig, channel_of: dict[int, int]) -> BaseLearner:
    """The base stage's model (``train.stage=base``): ``model.backbone`` (``model.train_layers`` trained)."""
    backbone = build_backbone(cfg.backbone, cfg.backbone_weights, cfg.deep_stem, cfg.freeze_bn_stats,
                              tuple(cfg.train_layers))
    return BaseLearner(backbone, channel_of, 2 * cfg.reduce_dim)


@register("bam")
def build_bam(cfg: ModelConfig) -> BAM:
    """BAM's meta stage over the base learner of ``model.base_learner`` (``extra_maps: [prior]``: + the prior)."""
    unknown = [m for m in cfg.extra_maps if m != "prior"]
    if unknown:
        raise ValueError(f"model.extra_maps: bam takes [prior] (QGNet's prior region map), not {unknown[0]!r}")
    if not cfg.base_learner:
        raise ValueError("model.method=bam needs model.base_learner=RUN_DIR, the run folder of its base stage "
                         "(accelerate launch finetune/run.py --config CONFIG train.stage=base)")
    path, state, channel_of = load_base_learner(cfg.base_learner)
    learner = build_base_learner(dataclasses.replace(cfg, train_layers=[]), channel_of)  # frozen in this stage
    try:
        learner.load_state_dict(state)
    except RuntimeError as err:
        raise WeightsError(f"model.base_learner={cfg.base_learner}: {path} does not fit model.backbone="
                           f"{cfg.backbone} / model.reduce_dim={cfg.reduce_dim} ({str(err).splitlines()[0]} ...)"
                           ) from err
    prior = build_prior(cfg.prior, cfg.prior_arch, cfg.freeze_bn_stats) if "prior" in cfg.extra_maps else None
    return BAM(learner.backbone, prior, learner.head, channel_of, cfg.bins, cfg.reduce_dim, cfg.dropout,
               cfg.sim_chunk, cfg.aux_weight, cfg.balanced_loss, cfg.kshot)
