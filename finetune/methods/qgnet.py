"""QGNet: PFENet with a query-only prior region map from a frozen self-supervised prior extractor.

Registered as ``model.method=qgnet`` (and ``pfenet``: the same network without the prior). Shape walk at
473x473, k shots; h = (473-1)/8+1 = 60:

    query [B,3,473,473] -> backbone layer2/3/4 [B,512|1024|2048,60,60]
    bridge Xq = down_query(cat[l3, l2])                              [B,256,60,60]
    per shot: mask m_i [B,1,60,60]; s4_i = layer4(s3_i * m_i)
              g_i = weighted_gap(down_supp(cat[s3_i, s2_i]), m_i)    [B,256,1,1]
              Mg_i = guided_region_map(q4, s4_i * m_i)               [B,1,60,60]
    k-shot fusion: g = mean_i g_i, Mg = mean_i Mg_i; Mp computed once from the query
    Mp = prior_region_map(q4, prior l4, down_learn_super, down_learn_unsuper)   [B,1,60,60]
    FEM([Xq, g, Mg, Mp]) -> logits [B,2,60,60] -> bilinear to [B,2,473,473]

With ``prior: none`` the same code is PFENet (FEM input 513 instead of 514 channels). With
``model.text_guidance`` (CD-TG, :mod:`finetune.model.text_guidance`) each shot's guider is fused with a
caption-guided prototype of the same bridge features, ``g_i = a * g_i + (1 - a) * gap(unit(bridge_s, text), m_i)``,
and, while training, the supports' layer2/3 are ADaIN-restyled first; the method then takes ``class_names``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.segmenter import SegmenterOutput
from finetune.methods.base import FewShotMethod, register
from finetune.methods.prototype import masked_average, prototype_logits
from finetune.methods.ssp import cosine_logits, ssp_match
from finetune.model.backbones import FrozenBackbone, build_backbone, build_prior
from finetune.model.config import ModelConfig
from finetune.model.fem import FEM
from finetune.model.meta_memory import attach_meta_memory
from finetune.model.region_maps import guided_region_map, minmax_normalize, prior_region_map, projection, weighted_gap
from finetune.model.text_guidance import TextGuidance, build_text_guidance


@dataclass
class QueryFeatures:
    """What :meth:`QGNet.encode_query` keeps of a query batch."""

    taps: tuple[Tensor, Tensor, Tensor]   # backbone layer2 / layer3 / layer4, each [B,C,h,w]
    bridge: Tensor | None                 # down_query(cat[layer3, layer2]) [B,D,h,w]; None with head_inputs=maps
    prior: Tensor | None                  # the prior's layer4 [B,C',h,w]
    size: tuple[int, int]                 # the input size (H, W)


@dataclass
class SupportFeatures:
    """What :meth:`QGNet.encode_supports` keeps of the supports; batch 1 is shared by every query."""

    masked_l4: list[Tensor]               # per shot: layer4 of the masked support, times the mask [B,C4,h,w]
    guide: Tensor | None                  # category guider, mean over shots [B,D,1,1]; None with head_inputs=maps
    fg: Tensor | None = None              # prototype cue, mean over shots [B,C]
    bg: Tensor | None = None
    guide_bg: Tensor | None = None        # the guider's background twin [B,D,1,1] (meta-memory losses, training)
    layer2: list[Tensor] = dataclasses.field(default_factory=list)  # per shot, unmasked layer2 (BAM's Gram)

    def expand(self, batch: int) -> SupportFeatures:
        """The same supports for ``batch`` queries (a no-op when the batch already matches)."""
        if self.masked_l4[0].shape[0] == batch:
            return self

        def grow(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.expand(batch, *t.shape[1:])

        return SupportFeatures([grow(t) for t in self.masked_l4], grow(self.guide), grow(self.fg), grow(self.bg),
                               grow(self.guide_bg), [grow(t) for t in self.layer2])


# query-side cues that can join the FEM's region maps (model.extra_maps), and the maps each one adds
EXTRA_MAPS = {"prototype": ("prototype",), "ssp": ("ssp_fg", "ssp_bg")}
RESIDUALS = ("none", "prototype", "ssp")


def reduction(cin: int, cout: int, dropout: float) -> nn.Sequential:
    """PFENet's 1x1 bridge reduction: conv (no bias) + ReLU + Dropout2d."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(dropout))


class QGNet(FewShotMethod):
    """Few-shot segmenter: frozen backbone (+ frozen prior) and a trainable PFENet/QGNet head.

    Args:
        backbone: frozen feature extractor F.
        prior: frozen prior extractor F_p, or None for the PFENet baseline.
        bins: FEM bins (absolute or relative).
        reduce_dim: head channels.
        dropout: Dropout2d after ``down_query``/``down_supp`` and the prior projections.
        paper_literal: prior map from raw layer4 cosines (no ``down_learn_*``).
        sim_chunk: chunk size of the max-cosine (0 = full matrix).
        aux_weight: weight of the per-bin auxiliary losses.
        extra_maps: query cues added to the FEM's maps (``prototype``: the baseline's foreground probability;
            ``ssp``: min-max normalised cosines to SSP's first-round fg and per-pixel bg prototypes).
        residual: add a training-free answer's logits (``prototype`` or ``ssp``) to the head's, whose last
            layer is then zero-initialised; ``none`` = the reference head.
        prototype_layer, prototype_scale: the tap (layer2 / layer3) of both cues and the prototype's temperature.
        balanced_loss: foreground and background pixels weigh equally per episode (:func:`balanced_cross_entropy`).
        head_inputs: ``features`` (the reference FEM input) or ``maps`` (the maps alone; no bridge, no guider).
        text_guidance: the CD-TG plug-in (fuses the guider with caption-guided prototypes), or None.
    """

    def __init__(self, backbone: FrozenBackbone, prior: FrozenBackbone | None, bins: list[float],
                 reduce_dim: int = 256, dropout: float = 0.5, paper_literal: bool = False,
                 sim_chunk: int = 0, aux_weight: float = 1.0, extra_maps: list[str] | None = None,
                 residual: str = "none", prototype_layer: str = "layer3",
                 prototype_scale: float = 20.0, balanced_loss: bool = False, head_inputs: str = "features",
                 text_guidance: TextGuidance | None = None) -> None:
        super().__init__()
        self.backbone, self.prior, self.sim_chunk, self.aux_weight = backbone, prior, sim_chunk, aux_weight
        self.extra_maps = list(extra_maps or [])
        unknown = [m for m in self.extra_maps if m not in EXTRA_MAPS]
        if unknown:
            raise ValueError(f"model.extra_maps: {unknown[0]!r} is not one of {', '.join(EXTRA_MAPS)}")
        if residual not in RESIDUALS:
            raise ValueError(f"model.residual: {residual!r} is not one of {', '.join(RESIDUALS)}")
        if prototype_layer not in ("layer2", "layer3"):
            raise ValueError(f"qgnet computes its prototype cue on layer2 or layer3, not {prototype_layer!r}")
        self.residual, self.prototype_layer = residual, prototype_layer
        self.prototype_scale, self.balanced_loss = prototype_scale, balanced_loss
        bridge_in = backbone.layer2_channels + backbone.layer3_channels
        # with head_inputs=maps nothing reads the bridge or the guider: they are not built (DDP rejects unused weights)
        features = head_inputs == "features"
        if text_guidance is not None and not features:
            raise ValueError("model.text_guidance fuses the category guider, which model.head_inputs=maps drops")
        self.text_guidance = text_guidance
        self.down_query = reduction(bridge_in, reduce_dim, dropout) if features else None
        self.down_supp = reduction(bridge_in, reduce_dim, dropout) if features else None
        self.down_learn_super: nn.Module | None = None
        self.down_learn_unsuper: nn.Module | None = None
        if prior is not None and paper_literal and prior.layer4_channels != backbone.layer4_channels:
            raise ValueError(f"model.paper_literal compares raw layer4 features, but the backbone has "
                             f"{backbone.layer4_channels} channels and the prior {prior.layer4_channels}")
        if prior is not None and not paper_literal:
            self.down_learn_super = projection(backbone.layer4_channels, reduce_dim, dropout)
            self.down_learn_unsuper = projection(prior.layer4_channels, reduce_dim, dropout)
        extra_channels = sum(len(EXTRA_MAPS[m]) for m in self.extra_maps)
        self.fem = FEM(bins, num_maps=(1 if prior is None else 2) + extra_channels, dim=reduce_dim,
                       with_features=head_inputs == "features")
        if residual != "none":  # the head starts as the training-free answer and learns a correction
            nn.init.zeros_(self.fem.cls[-1].weight)
            nn.init.zeros_(self.fem.cls[-1].bias)

    def loss(self, out: SegmenterOutput, target: Tensor,
             classes: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """:func:`qgnet_loss` with ``model.aux_weight``."""
        return self.add_adapter_loss(*qgnet_loss(out, target, self.aux_weight, balanced=self.balanced_loss),
                                     out, target, classes)

    @property
    def reads_class_names(self) -> bool:
        """With text guidance the supports' class names are an input (``class_names``)."""
        return self.text_guidance is not None

    def forward(self, query: Tensor, supports: Tensor, support_masks: Tensor,
                class_names: list[str] | None = None) -> SegmenterOutput:
        """Segment the query's foreground class given k annotated supports.

        Args:
            query: ``[B,3,H,W]`` normalised image, H and W of the form 8n+1.
            supports: ``[B,K,3,H,W]``.
            support_masks: ``[B,K,H,W]`` with values {0, 1, 255}; foreground is ``== 1`` (255 counts as
                background, as in the reference).
            class_names: the episodes' class names (B), read only with ``model.text_guidance``.
        """
        check_episode_shapes(query, supports, support_masks)
        # this order (query trunk + bridge, then the shots, then the decoder) keeps the reference's order of
        # BatchNorm updates and dropout draws, so training is the same as an unsplit forward
        encoded = self.encode_query(query)
        return self.decode(encoded, self.encode_supports(supports, support_masks, class_names))

    def encode_query(self, query: Tensor) -> QueryFeatures:
        """``query [B,3,H,W]`` -> backbone taps, the bridge ``[B,D,h,w]`` and the prior's layer4."""
        q2, q3, q4 = self.backbone(query)                                    # [B,C2|C3|C4,h,w]
        bridge = self.down_query(torch.cat([q3, q2], dim=1)) if self.down_query is not None else None  # [B,D,h,w]
        p4 = self.prior(query)[2] if self.prior is not None else None        # [B,C',h,w]
        return QueryFeatures((q2, q3, q4), bridge, p4, tuple(query.shape[-2:]))

    def encode_supports(self, supports: Tensor, support_masks: Tensor,
                        class_names: list[str] | None = None) -> SupportFeatures:
        """``supports [B,K,3,H,W]``, ``support_masks [B,K,H,W]`` -> per-shot masked layer4, the category guider
        (mean over shots) and, when used, the prototype cue; independent of any query (encode once, reuse).
        ``class_names`` (B) are read only with text guidance."""
        masked_l4, prototypes, fg_protos, bg_protos, bg_guides, taps2 = [], [], [], [], [], []
        text = self.text_guidance
        rows = text.rows(class_names) if text is not None else None
        for i in range(supports.shape[1]):  # one trunk pass per shot: with train-mode BN, stats are per shot
            s2, s3 = self.backbone.to_layer3(supports[:, i])
            if text is not None:
                s2, s3 = text.restyle(s2, s3)                                # ADaIN: training only
            taps2.append(s2)
            fg = (support_masks[:, i] == 1).unsqueeze(1).float()             # [B,1,H,W]
            mask = F.interpolate(fg, size=s3.shape[-2:], mode="bilinear", align_corners=True)
            masked_l4.append(self.backbone.run_layer4(s3 * mask) * mask)     # [B,C4,h,w]
            if self.down_supp is not None:
                bridge = self.down_supp(torch.cat([s3, s2], dim=1))                                # [B,D,h,w]
                proto = weighted_gap(bridge, mask)                                                  # [B,D,1,1]
                if text is not None:
                    proto = text.fuse(proto, text.prototypes(bridge, mask, rows)[0])
                prototypes.append(proto)
                if self.training and self.backbone.memory is not None:  # the meta-memory's L_pro, L_cont
                    bg_guides.append(weighted_gap(bridge, F.interpolate(
                        (support_masks[:, i] == 0).unsqueeze(1).float(), size=s3.shape[-2:], mode="bilinear",
                        align_corners=True)))
            if self.uses_support_prototypes:  # the training-free baselines' prototypes (prototype, ssp)
                tap = s3 if self.prototype_layer == "layer3" else s2
                bg = F.interpolate((support_masks[:, i] == 0).unsqueeze(1).float(), size=tap.shape[-2:],
                                   mode="bilinear", align_corners=True)
                fg_protos.append(masked_average(tap, mask))
                bg_protos.append(masked_average(tap, bg))
        cue = (torch.stack(fg_protos).mean(0), torch.stack(bg_protos).mean(0)) if fg_protos else (None, None)
        guide = torch.stack(prototypes).mean(dim=0) if prototypes else None
        guide_bg = torch.stack(bg_guides).mean(dim=0) if bg_guides else None
        return SupportFeatures(masked_l4, guide, *cue, guide_bg=guide_bg,
                               layer2=taps2 if self.keep_support_layer2 else [])

    keep_support_layer2 = False  # BAM's Gram distance reads the supports' layer2 features

    def decode(self, query: QueryFeatures, supports: SupportFeatures) -> SegmenterOutput:
        """Region maps, FEM and logits ``[B,2,H,W]``; supports encoded once (batch 1) serve every query."""
        out = self.decode_features(query, supports)
        out.logits = F.interpolate(out.logits, size=query.size, mode="bilinear", align_corners=True)
        return out

    def decode_features(self, query: QueryFeatures, supports: SupportFeatures) -> SegmenterOutput:
        """:meth:`decode` at feature resolution: logits ``[B,2,h,w]``."""
        supports = supports.expand(query.taps[0].shape[0])
        q2, q3, q4 = query.taps
        guided = [guided_region_map(q4, s4, self.sim_chunk) for s4 in supports.masked_l4]  # each [B,1,h,w]
        maps = {"guided": torch.stack(guided).mean(dim=0)}
        tap = q3 if self.prototype_layer == "layer3" else q2
        answers = {}  # the training-free answers a residual can start from, [B,2,h,w]
        if "prototype" in self.extra_maps or self.residual == "prototype":
            answers["prototype"] = prototype_logits(tap, supports.fg, supports.bg, self.prototype_scale)
            maps["prototype"] = answers["prototype"].softmax(dim=1)[:, 1:]
        if "ssp" in self.extra_maps or self.residual == "ssp":
            match = ssp_match(tap, supports.fg, supports.bg)
            answers["ssp"] = match["out"]
            cosines = cosine_logits(tap, match["fg1"], match["bg1"], scale=1.0)             # [B,2,h,w]
            for i, name in ((1, "ssp_fg"), (0, "ssp_bg")):
                maps[name] = minmax_normalize(cosines[:, i].flatten(1)).view_as(cosines[:, :1])
        if self.prior is not None:
            maps = {"prior": prior_region_map(q4, query.prior, self.down_learn_super, self.down_learn_unsuper,
                                              self.sim_chunk), **maps}
        # FEM input order: [bridge, prototype, guided, prior] (the reference concatenation), then extra maps
        fem_maps = [maps[k] for k in ("guided", "prior") if k in maps]
        fem_maps += [maps[name] for m in self.extra_maps for name in EXTRA_MAPS[m]]
        logits, aux = self.fem(query.bridge, supports.guide, fem_maps)
        if self.residual != "none":
            logits = logits + answers[self.residual].to(logits.dtype)
        memory_inputs = {} if supports.guide_bg is None else {
            "mmt_query": query.bridge, "mmt_fg": supports.guide.flatten(1), "mmt_bg": supports.guide_bg.flatten(1)}
        return SegmenterOutput(logits=logits, maps=maps, aux_logits=aux, loss_inputs=memory_inputs)

    @property
    def uses_support_prototypes(self) -> bool:
        """Whether the supports' masked-average prototypes are needed (an extra map or a residual)."""
        return self.residual != "none" or bool(self.extra_maps)


def check_episode_shapes(query: Tensor, supports: Tensor, support_masks: Tensor) -> int:
    """Validate episode shapes; returns the number of shots."""
    if query.dim() != 4 or query.shape[1] != 3:
        raise ValueError(f"query must be [B,3,H,W], got {tuple(query.shape)}")
    b, _, h, w = query.shape
    if (h - 1) % 8 or (w - 1) % 8:
        raise ValueError(f"input height and width must be 8n+1 (e.g. 473, 321, 97), got {h}x{w}")
    if supports.dim() != 5 or supports.shape[0] != b or supports.shape[2:] != query.shape[1:]:
        raise ValueError(f"supports must be [B,K,3,H,W] = [{b},K,3,{h},{w}], got {tuple(supports.shape)}")
    if support_masks.shape != (b, supports.shape[1], h, w):
        raise ValueError(f"support_masks must be [B,K,H,W] = [{b},{supports.shape[1]},{h},{w}], "
                         f"got {tuple(support_masks.shape)}")
    return supports.shape[1]


@register("qgnet")
def build_qgnet(cfg: ModelConfig) -> QGNet:
    """QGNet (or the PFENet baseline when ``cfg.prior == "none"``) from the ``model.*`` config."""
    backbone = build_backbone(cfg.backbone, cfg.backbone_weights, cfg.deep_stem, cfg.freeze_bn_stats,
                              adapter=cfg.adapter)
    attach_meta_memory(backbone, cfg)  # model.meta_memory (MMT), on the feature extractor only
    prior = None if cfg.prior == "none" else build_prior(cfg.prior, cfg.prior_arch, cfg.freeze_bn_stats)
    model = QGNet(backbone, prior, cfg.bins, cfg.reduce_dim, cfg.dropout, cfg.paper_literal, cfg.sim_chunk,
                  cfg.aux_weight, cfg.extra_maps, cfg.residual, cfg.prototype_layer, cfg.prototype_scale,
                  cfg.balanced_loss, cfg.head_inputs)
    # built after the head, so the head starts from the same random draws with and without text guidance
    model.text_guidance = build_text_guidance(cfg.text_guidance, cfg.reduce_dim, cfg.text_alpha, cfg.text_heads,
                                              cfg.text_adain, cfg.text_adain_strength)
    return model


@register("pfenet")
def build_pfenet(cfg: ModelConfig) -> QGNet:
    """PFENet: QGNet without the prior region map (``model.prior`` is not read)."""
    return build_qgnet(dataclasses.replace(cfg, prior="none", paper_literal=False))


def balanced_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """Per episode, the mean CE of its foreground pixels and the mean CE of its background pixels, averaged.

    ``logits [B,2,H,W]``, ``target [B,H,W]``. A small object then weighs as much as the background around it, so
    answering "all background" stops being cheap (plain CE on small COCO objects collapses to it). A class
    absent from an episode's target contributes nothing.
    """
    pixel = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")  # [B,H,W]
    terms = []
    for cls in (0, 1):
        mask = (target == cls).float()
        count = mask.sum((1, 2))                                                           # [B]
        terms.append(torch.where(count > 0, (pixel * mask).sum((1, 2)) / count.clamp(min=1), torch.nan))
    per_episode = torch.stack(terms, dim=1).nanmean(dim=1)                                 # [B]
    return per_episode.nanmean() if torch.isfinite(per_episode).any() else pixel.sum() * 0.0


def qgnet_loss(out: SegmenterOutput, target: Tensor, aux_weight: float = 1.0, ignore_index: int = 255,
               balanced: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """``CE(logits) + aux_weight * mean_j CE(upsampled aux_j)``, pixels equal to ``ignore_index`` ignored.

    Args:
        out: the model output (logits ``[B,2,H,W]``).
        target: ``[B,H,W]`` with 0 = background, 1 = foreground, ``ignore_index`` = ignore.
        balanced: :func:`balanced_cross_entropy` instead of the plain pixel mean.

    Returns:
        the scalar loss and its detached parts ``{"main", "aux"}``.
    """
    if out.logits.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"logits {tuple(out.logits.shape)} and target {tuple(target.shape)} differ in size")
    target = target.long()

    def ce(logits: Tensor) -> Tensor:
        if balanced:
            return balanced_cross_entropy(logits, target, ignore_index)
        return F.cross_entropy(logits, target, ignore_index=ignore_index)

    main = ce(out.logits)
    aux = torch.stack([ce(F.interpolate(a, size=target.shape[-2:], mode="bilinear", align_corners=True))
                       for a in out.aux_logits]).mean()
    return main + aux_weight * aux, {"main": main.detach(), "aux": aux.detach()}
