"""``model.method=ntrenet``: non-target region eliminating (NTRENet, CVPR 2022), PFENet with background and
distracting objects taken out of the query before it is matched.

Shape walk (D = ``model.reduce_dim``, h = (S-1)/8+1; bins as PFENet's FEM):

    bridge X_q = down_query(cat[l3, l2])  [B,D,h,w];  guider g, guided map Mg as PFENet (mean over shots)
    BGMM  P_bg [1,D,1,1] learnable;  bg_out = bg_cls(res(down_bg(cat[X_q, P_bg])))   [B,2,h,w] (1 = background)
    per bin b:
      BGEM  x = merge_bg(cat[X_q^b, P_bg])                     (``bgem``; else x = X_q^b)
            x = merge_fg(cat[x, g, maps^b]);  x = beta0(x) + x;  init_b = cls0(x)        [B,2,b,b]
      DOEM  M_do = relu(1 - argmax bg_out^b - argmax init_b)     the pixels neither background nor target
            P_do = GAP(M_do * X_q^b);  x = merge_do(cat[x, P_do])  (``doem``)
      PFENet's inter-scale alpha / beta convolutions and per-bin classifier
    res1 / res2 / cls over the bins -> logits [B,2,h,w]

Loss: ``CE(main) + bg + 0.4 mean CE(aux) + 0.6 mean CE(aux_init) + 0.01 PCL`` (``model.balanced_loss``: the
segmentation terms weigh foreground and background equally per episode, as for qgnet). The background loss, for the
query and each support: ``bg_out -> 0`` on the target's pixels (a per-episode mean) + ``0.5 * (bg_out -> 1)`` on
every pixel. PCL (``pcl``): InfoNCE (tau = 1) with the predicted query foreground prototype as anchor, the
support's ground-truth prototype as positive, and up to 1,000 prototypes of distracting objects of the same
class from a bank of 2,000 (:class:`finetune.model.prototype_bank.PrototypeBank`, saved with the weights).
``model.ntre_modules`` switches BGEM / DOEM / PCL (the paper's ablation); ``model.extra_maps: [prior]`` adds
QGNet's prior region map (a stage-1 prior) to the merged maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.segmenter import SegmenterOutput
from finetune.methods.base import FewShotMethod, register
from finetune.methods.qgnet import balanced_cross_entropy, check_episode_shapes, reduction
from finetune.model.backbones import FrozenBackbone, build_backbone, build_prior
from finetune.model.config import ModelConfig
from finetune.model.fem import classifier_head, conv_relu, resolve_bins
from finetune.model.prototype_bank import PrototypeBank
from finetune.model.region_maps import guided_region_map, prior_region_map, projection, weighted_gap

MODULES = ("bgem", "doem", "pcl")
BG_ALL_WEIGHT = 0.5     # weight of "everything is background" in the background loss (the reference's erfa)
AUX_WEIGHT, AUX_INIT_WEIGHT, PCL_WEIGHT = 0.4, 0.6, 0.01
PCL_CAPACITY, PCL_SAMPLES, PCL_TAU = 2000, 1000, 1.0


def distractor_mask(bg_logits: Tensor, fg_logits: Tensor) -> Tensor:
    """``relu(1 - argmax bg - argmax fg)``: 1 where the background miner says "not background" and the initial
    prediction says "not target". ``[B,2,b,b]`` each -> ``[B,1,b,b]`` 0/1."""
    return F.relu(1 - bg_logits.argmax(1, keepdim=True) - fg_logits.argmax(1, keepdim=True)).float()


def pcl_loss(anchor: Tensor, positive: Tensor, negatives: list[Tensor], tau: float = PCL_TAU) -> Tensor:
    """Mean over episodes of InfoNCE ``-log(e^{cos(a,p)/tau} / (e^{cos(a,p)/tau} + sum_n e^{cos(a,n)/tau}))``.

    ``anchor, positive [B,D]``, ``negatives``: per episode ``[n_b, D]`` (an episode without negatives scores 0:
    nothing to contrast with yet)."""
    terms = []
    for a, p, neg in zip(anchor, positive, negatives):
        if len(neg) == 0:
            terms.append(a.sum() * 0.0)
            continue
        pos = F.cosine_similarity(a, p, dim=0)[None] / tau
        negs = F.cosine_similarity(a[None], neg.to(a.device, a.dtype), dim=1) / tau
        terms.append(-(pos - torch.logsumexp(torch.cat([pos, negs]), dim=0)).squeeze())
    return torch.stack(terms).mean()


def background_loss(bg_logits: Tensor, target: Tensor) -> Tensor:
    """``[B,2,S,S]`` background-miner logits against ``target [B,S,S]``: ``bg -> 0`` averaged over each episode's
    target pixels (then over episodes), plus ``0.5 * (bg -> 1)`` over every pixel."""
    target = target.long()
    not_bg = F.cross_entropy(bg_logits, torch.zeros_like(target), reduction="none")      # [B,S,S]
    fg = (target == 1).float()
    on_target = ((not_bg * fg).sum((1, 2)) / (fg.sum((1, 2)) + 1e-5)).mean()
    return on_target + BG_ALL_WEIGHT * F.cross_entropy(bg_logits, torch.ones_like(target))


class NTREDecoder(nn.Module):
    """The per-bin BGEM / DOEM merges and PFENet's inter-scale path (see the module docstring)."""

    def __init__(self, bins: list[float], num_maps: int, dim: int, bgem: bool = True, doem: bool = True) -> None:
        super().__init__()
        self.bins, self.bgem, self.doem = list(bins), bgem, doem
        n = len(bins)

        def stack(make) -> nn.ModuleList:
            return nn.ModuleList(make() for _ in range(n))

        self.merge_bg = stack(lambda: nn.Sequential(*conv_relu(2 * dim, dim, 1))) if bgem else None
        self.merge_fg = stack(lambda: nn.Sequential(*conv_relu(2 * dim + num_maps, dim, 1)))
        self.beta0 = stack(lambda: nn.Sequential(*conv_relu(dim, dim, 3), *conv_relu(dim, dim, 3)))
        self.cls0 = stack(lambda: classifier_head(dim, 2))
        self.merge_do = stack(lambda: nn.Sequential(*conv_relu(2 * dim, dim, 1))) if doem else None
        self.alpha_conv = nn.ModuleList(nn.Sequential(*conv_relu(2 * dim, dim, 1)) for _ in range(n - 1))
        self.beta_conv = stack(lambda: nn.Sequential(*conv_relu(dim, dim, 3), *conv_relu(dim, dim, 3)))
        self.inner_cls = stack(lambda: classifier_head(dim, 2))
        self.res1 = nn.Sequential(*conv_relu(n * dim, dim, 1))
        self.res2 = nn.Sequential(*conv_relu(dim, dim, 3), *conv_relu(dim, dim, 3))
        self.cls = classifier_head(dim, 2)

    def forward(self, query: Tensor, guide: Tensor, maps: list[Tensor], bg_proto: Tensor,
                bg_logits: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
        """``query [B,D,h,w]``, ``guide [B,D,1,1]``, maps ``[B,1,h,w]``, ``bg_proto [1,D,1,1]``, ``bg_logits
        [B,2,h,w]`` -> (logits ``[B,2,h,w]``, aux per bin, initial aux per bin, the finest bin's DO mask
        ``[B,1,b,b]``)."""
        size = query.shape[-2:]
        b_size = query.shape[0]
        pyramid, aux, aux_init, do_mask = [], [], [], None
        for j, b in enumerate(resolve_bins(self.bins, size[0])):
            q = F.adaptive_avg_pool2d(query, b)
            x = self.merge_bg[j](torch.cat([q, bg_proto.expand(b_size, -1, b, b)], 1)) if self.bgem else q
            maps_b = [F.interpolate(m, size=(b, b), mode="bilinear", align_corners=True) for m in maps]
            x = self.merge_fg[j](torch.cat([x, guide.expand(-1, -1, b, b), *maps_b], 1))
            x = self.beta0[j](x) + x
            init = self.cls0[j](x)
            aux_init.append(init)
            if self.doem:
                bg_b = F.interpolate(bg_logits, size=(b, b), mode="bilinear", align_corners=True)
                mask = distractor_mask(bg_b, init)
                do_mask = mask if do_mask is None else do_mask
                proto = F.adaptive_avg_pool2d(mask * q, 1)  # the reference: a mean over all b*b positions
                x = self.merge_do[j](torch.cat([x, proto.expand(-1, -1, b, b)], 1))
            if j > 0:
                finer = F.interpolate(pyramid[-1], size=(b, b), mode="bilinear", align_corners=True)
                x = self.alpha_conv[j - 1](torch.cat([x, finer], 1)) + x
            x = self.beta_conv[j](x) + x
            aux.append(self.inner_cls[j](x))
            pyramid.append(F.interpolate(x, size=size, mode="bilinear", align_corners=True))
        x = self.res1(torch.cat(pyramid, 1))
        x = self.res2(x) + x
        return self.cls(x), aux, aux_init, do_mask


@dataclass
class NTREQuery:
    taps: tuple[Tensor, Tensor, Tensor]   # backbone layer2 / layer3 / layer4 [B,C,h,w]
    bridge: Tensor                        # [B,D,h,w]
    prior: Tensor | None                  # the prior's layer4, with extra_maps [prior]
    size: tuple[int, int]


@dataclass
class NTRESupports:
    masked_l4: list[Tensor]               # per shot [B,C4,h,w]
    guide: Tensor                         # [B,D,1,1], mean over shots
    features: Tensor                      # unmasked support bridge features, mean over shots [B,D,h,w]
    features_per_shot: list[Tensor]       # the same per shot (training: background loss)
    masks: Tensor                         # [B,K,S,S]

    def expand(self, batch: int) -> NTRESupports:
        if self.guide.shape[0] == batch:
            return self

        def grow(t: Tensor) -> Tensor:
            return t.expand(batch, *t.shape[1:])

        return NTRESupports([grow(t) for t in self.masked_l4], grow(self.guide), grow(self.features),
                            [grow(t) for t in self.features_per_shot], grow(self.masks))


class NTRENet(FewShotMethod):
    """NTRENet on a frozen backbone (optionally with QGNet's prior region map); see the module docstring."""

    def __init__(self, backbone: FrozenBackbone, bins: list[float], reduce_dim: int = 256, dropout: float = 0.5,
                 modules: list[str] | None = None, prior: FrozenBackbone | None = None, sim_chunk: int = 0,
                 balanced_loss: bool = False) -> None:
        super().__init__()
        self.modules_on = set(MODULES if modules is None else modules)
        unknown = self.modules_on - set(MODULES)
        if unknown:
            raise ValueError(f"model.ntre_modules: {sorted(unknown)[0]!r} is not one of {', '.join(MODULES)}")
        self.backbone, self.prior, self.sim_chunk, self.balanced_loss = backbone, prior, sim_chunk, balanced_loss
        bridge_in = backbone.layer2_channels + backbone.layer3_channels
        self.down_query = reduction(bridge_in, reduce_dim, dropout)
        self.down_supp = reduction(bridge_in, reduce_dim, dropout)
        self.bg_proto = nn.Parameter(torch.zeros(1, reduce_dim, 1, 1))
        self.down_bg = reduction(2 * reduce_dim, reduce_dim, dropout)
        self.bg_res = nn.Sequential(*conv_relu(reduce_dim, reduce_dim, 3), *conv_relu(reduce_dim, reduce_dim, 3))
        self.bg_cls = classifier_head(reduce_dim, 2)
        self.down_learn_super = self.down_learn_unsuper = None
        if prior is not None:
            self.down_learn_super = projection(backbone.layer4_channels, reduce_dim, dropout)
            self.down_learn_unsuper = projection(prior.layer4_channels, reduce_dim, dropout)
        self.decoder = NTREDecoder(bins, 1 + (prior is not None), reduce_dim, "bgem" in self.modules_on,
                                   "doem" in self.modules_on)
        self.bank = PrototypeBank(reduce_dim, PCL_CAPACITY)

    def background_logits(self, features: Tensor) -> Tensor:
        """BGMM: ``[B,D,h,w] -> [B,2,h,w]`` (channel 1 = background) against the learned background prototype."""
        x = self.down_bg(torch.cat([features, self.bg_proto.expand(features.shape[0], -1, *features.shape[-2:])], 1))
        return self.bg_cls(self.bg_res(x) + x)

    def forward(self, query: Tensor, supports: Tensor, support_masks: Tensor) -> SegmenterOutput:
        """``query [B,3,S,S]``, ``supports [B,K,3,S,S]``, ``support_masks [B,K,S,S]`` -> logits ``[B,2,S,S]``."""
        check_episode_shapes(query, supports, support_masks)
        return self.decode(self.encode_query(query), self.encode_supports(supports, support_masks))

    def encode_query(self, query: Tensor) -> NTREQuery:
        """Backbone taps, the bridge ``[B,D,h,w]`` and (with the prior map) the prior's layer4."""
        q2, q3, q4 = self.backbone(query)
        bridge = self.down_query(torch.cat([q3, q2], 1))
        prior = self.prior(query)[2] if self.prior is not None else None
        return NTREQuery((q2, q3, q4), bridge, prior, tuple(query.shape[-2:]))

    def encode_supports(self, supports: Tensor, support_masks: Tensor) -> NTRESupports:
        """Per shot: masked layer4 (guided map), guider; the unmasked bridge features (background loss, PCL)."""
        masked_l4, guides, feats = [], [], []
        for i in range(supports.shape[1]):
            s2, s3 = self.backbone.to_layer3(supports[:, i])
            fg = (support_masks[:, i] == 1).unsqueeze(1).float()
            mask = F.interpolate(fg, size=s3.shape[-2:], mode="bilinear", align_corners=True)
            masked_l4.append(self.backbone.run_layer4(s3 * mask) * mask)
            f = self.down_supp(torch.cat([s3, s2], 1))
            feats.append(f)
            guides.append(weighted_gap(f, mask))
        return NTRESupports(masked_l4, torch.stack(guides).mean(0), torch.stack(feats).mean(0), feats, support_masks)

    def decode(self, query: NTREQuery, supports: NTRESupports) -> SegmenterOutput:
        """Region maps, BGMM, the BGEM / DOEM decoder; maps: guided (prior), background, distractor."""
        supports = supports.expand(query.bridge.shape[0])
        q4 = query.taps[2]
        guided = torch.stack([guided_region_map(q4, s4, self.sim_chunk) for s4 in supports.masked_l4]).mean(0)
        maps = {"guided": guided}
        if self.prior is not None:
            maps["prior"] = prior_region_map(q4, query.prior, self.down_learn_super, self.down_learn_unsuper,
                                             self.sim_chunk)
        bg_logits = self.background_logits(query.bridge)
        logits, aux, aux_init, do_mask = self.decoder(query.bridge, supports.guide, list(maps.values()),
                                                      self.bg_proto, bg_logits)
        h = query.bridge.shape[-2:]
        maps["background"] = bg_logits.softmax(1)[:, 1:]
        if do_mask is not None:
            maps["distractor"] = F.interpolate(do_mask, size=h, mode="nearest")
        out = SegmenterOutput(F.interpolate(logits, size=query.size, mode="bilinear", align_corners=True),
                              maps, aux_logits=aux)
        if self.training:
            out.loss_inputs = {"bg_logits": bg_logits, "query_features": query.bridge, "logits_low": logits,
                               "support_features": supports.features_per_shot[0], "support_masks": supports.masks,
                               **{f"aux_init_{j}": a for j, a in enumerate(aux_init)},
                               **{f"support_bg_{i}": self.background_logits(f)
                                  for i, f in enumerate(supports.features_per_shot)}}
        return out

    def loss(self, out: SegmenterOutput, target: Tensor,
             classes: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``CE + bg + 0.4 aux + 0.6 aux_init + 0.01 PCL`` (PCL needs the episodes' ``classes [B]``)."""
        size, target = target.shape[-2:], target.long()
        extra = out.loss_inputs

        def up(t: Tensor) -> Tensor:
            return F.interpolate(t, size=size, mode="bilinear", align_corners=True)

        def segmentation_ce(logits: Tensor) -> Tensor:  # model.balanced_loss: fg and bg weigh equally per episode
            if self.balanced_loss:
                return balanced_cross_entropy(logits, target)
            return F.cross_entropy(logits, target, ignore_index=255)

        def ce(logits: Tensor) -> Tensor:
            return segmentation_ce(up(logits))

        parts = {"main": segmentation_ce(out.logits),
                 "aux": torch.stack([ce(a) for a in out.aux_logits]).mean(),
                 "aux_init": torch.stack([ce(v) for k, v in extra.items() if k.startswith("aux_init_")]).mean()}
        support_masks = extra["support_masks"].long()
        bg_terms = [background_loss(up(extra["bg_logits"]), target)]
        bg_terms += [background_loss(up(v), support_masks[:, int(k.rsplit("_", 1)[1])])
                     for k, v in extra.items() if k.startswith("support_bg_")]
        parts["bg"] = torch.stack(bg_terms).mean()
        total = parts["main"] + parts["bg"] + AUX_WEIGHT * parts["aux"] + AUX_INIT_WEIGHT * parts["aux_init"]
        if "pcl" in self.modules_on:
            if classes is None:
                raise ValueError("ntrenet's PCL needs the episodes' class ids (loss(..., classes=...))")
            parts["pcl"] = self.contrastive(extra, target, classes)
            total = total + PCL_WEIGHT * parts["pcl"]
        return self.add_adapter_loss(total, {k: v.detach() for k, v in parts.items()})

    def contrastive(self, extra: dict[str, Tensor], target: Tensor, classes: Tensor) -> Tensor:
        """PCL: add this batch's distracting-object prototypes to the bank, then InfoNCE against the bank."""
        fq, fs = extra["query_features"], extra["support_features"]
        h = fq.shape[-2:]

        def labels(t: Tensor) -> Tensor:  # nearest-resized ground truth, 255 counted as background
            small = F.interpolate(t[:, None].float(), size=h, mode="nearest")
            return torch.where(small == 255, torch.zeros_like(small), small)

        q_lab, s_lab = labels(target), labels(extra["support_masks"][:, 0])
        q_do = F.relu(1 - extra["bg_logits"].argmax(1, keepdim=True) - q_lab)
        s_do = F.relu(1 - extra["support_bg_0"].argmax(1, keepdim=True) - s_lab)
        self.bank.add(torch.cat([classes, classes]),
                      torch.cat([weighted_gap(fq, q_do), weighted_gap(fs, s_do)]).flatten(1))
        anchor = weighted_gap(fq, extra["logits_low"].argmax(1, keepdim=True).float()).flatten(1)
        positive = weighted_gap(fs, s_lab).flatten(1)
        negatives = []
        for c in classes.tolist():
            bank = self.bank.get(c)
            if len(bank) > PCL_SAMPLES:
                bank = bank[torch.randperm(len(bank))[:PCL_SAMPLES]]
            negatives.append(bank)
        return pcl_loss(anchor, positive, negatives)


@register("ntrenet")
def build_ntrenet(cfg: ModelConfig) -> NTRENet:
    """NTRENet from ``model.*`` (``ntre_modules``; ``extra_maps: [prior]`` builds the stage-1 prior too)."""
    unknown = [m for m in cfg.extra_maps if m != "prior"]
    if unknown:
        raise ValueError(f"model.extra_maps: ntrenet takes [prior] (QGNet's prior region map), not {unknown[0]!r}")
    backbone = build_backbone(cfg.backbone, cfg.backbone_weights, cfg.deep_stem, cfg.freeze_bn_stats,
                              adapter=cfg.adapter)
    prior = build_prior(cfg.prior, cfg.prior_arch, cfg.freeze_bn_stats) if "prior" in cfg.extra_maps else None
    return NTRENet(backbone, cfg.bins, cfg.reduce_dim, cfg.dropout, cfg.ntre_modules, prior, cfg.sim_chunk,
                   cfg.balanced_loss)
