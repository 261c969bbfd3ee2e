"""Config keys of the stage-2 model (``model.*``): which method, its backbones and weights, the prior, the head.

Defaults are the reference PASCAL-5i QGNet: a frozen ResNet-50 feature extractor, a frozen stage-1 ResNet-50
prior, learned 3x3 projections for the prior region map, FEM bins 60/30/15/8. Keys a method does not use are
ignored by it (``prototype`` reads only the backbone and ``prototype_*`` keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.config import field


@dataclass
class ModelConfig:
    method: str = field(
        "qgnet", help="the registered few-shot method (finetune.methods): qgnet | pfenet (qgnet without the prior) "
                      "| prototype (training-free masked-average prototypes) | ssp (self-support prototypes) "
                      "| qsm (query self-similarity prototyping) | ntrenet (non-target region eliminating) "
                      "| bam (base + meta learner; its base stage: train.stage=base)")
    backbone: Literal["resnet50", "resnet101", "mobilenet_v2"] = field(
        "resnet50", help="frozen feature extractor F (bridge and support features), dilated to output stride 8")
    backbone_weights: str = field(
        "weights/resnet50_imagenet.pth",
        help="ImageNet weights of the backbone: a torchvision-format state dict (.safetensors or .pth); "
             "'torchvision' = torchvision's IMAGENET1K_V1 enum (needs the network); "
             "'random' = random init (smoke tests only, must be asked for)")
    deep_stem: bool = field(
        False, help="PSPNet deep-stem ResNet (3x 3x3 convs 64,64,128) as in PFENet's resnet50_v2.pth; "
                    "set it only when backbone_weights are such a file")
    prior: str = field(
        "prior_r50.safetensors",
        help="stage-1 prior extractor exported by `python -m pretrain.export` (torchvision state dict); "
             "'none' = the PFENet baseline through the same code; 'random' = random init (smoke tests only)")
    prior_arch: Literal["auto", "resnet50", "resnet18", "mobilenet_v2"] = field(
        "auto", help="architecture of the prior; auto = the 'arch' the stage-1 export records in its metadata "
                     "(an explicit value must agree with it)")
    paper_literal: bool = field(
        False, help="prior map from the raw cosine of the frozen layer4 features (the paper's text) instead of "
                    "the reference code's trainable 3x3 projections; needs equal channel counts")
    bins: list[float] = field(
        [60, 30, 15, 8], help="FEM pyramid bins: absolute sizes, or fractions of the feature size when all <= 1 "
                              "(COCO: [1.0, 0.5, 0.25, 0.125])")
    reduce_dim: int = field(256, help="channels of the head (bridge, prototype, FEM)")
    aux_weight: float = field(1.0, help="weight of the mean auxiliary (per-bin) cross-entropy")
    balanced_loss: bool = field(
        False, help="qgnet / pfenet / ntrenet: per episode, foreground and background pixels weigh equally in the "
                    "cross-entropy "
                    "(false = the reference's pixel mean, which small objects push towards 'all background')")
    freeze_bn_stats: bool = field(
        False, help="false = reference behaviour: frozen backbones still run BatchNorm in train mode (batch "
                    "statistics, running stats drift); true = BatchNorm always in eval mode")
    sim_chunk: int = field(
        0, help="0 = full [N x N] cosine matrix per sample (reference); >0 = max-cosine in chunks of this many "
                "query pixels, bounding memory at large inputs (same values)")
    dropout: float = field(0.5, help="Dropout2d after the 1x1 bridge reductions and the 3x3 prior projections")
    extra_maps: list[str] = field(
        [], help="qgnet / pfenet: extra query maps for the FEM beside the guided (and prior) map; 'prototype' = the "
                 "training-free baseline's foreground probability, 'ssp' = SSP's min-max normalised cosines to its "
                 "first-round self-support fg and per-pixel bg prototypes (both on model.prototype_layer)")
    residual: Literal["none", "prototype", "ssp"] = field(
        "none", help="qgnet / pfenet: add a training-free method's logits (prototype, or ssp's final answer) to the "
                     "head's, with the head's last layer zero-initialised, so training starts from the no-learning "
                     "answer and learns a correction")
    head_inputs: Literal["features", "maps"] = field(
        "features", help="qgnet / pfenet: what the FEM decodes: 'features' = the reference (bridge features, category "
                         "guider and region maps); 'maps' = the region / extra maps alone (class-agnostic: the head "
                         "cannot learn what the training classes look like)")
    train_layers: list[str] = field(
        [], help="ssp: backbone stages whose convolutions train (the reference: [layer2, layer3]); BatchNorm stays "
                 "frozen; [] = the training-free variant. bam: the stages its base stage fine-tunes (the reference: "
                 "the whole ResNet); the meta stage keeps them frozen")
    base_learner: str = field(
        "", help="bam: the run folder (or its last_model.safetensors) of the base stage (train.stage=base) whose "
                 "backbone and PSPNet head the meta stage loads, frozen")
    kshot: int = field(
        1, help="bam: the shot count its k-shot reweighting of the Gram distances is built for (the reference "
                "trains one model per shot); 1 = none; episodes of another shot count average the distances")
    ntre_modules: list[str] = field(
        ["bgem", "doem", "pcl"], help="ntrenet: the modules on (the paper's ablation): bgem (background elimination), "
                                      "doem (distracting-object elimination), pcl (prototypical contrastive loss)")
    adapter: Literal["none", "dr"] = field(
        "none", help="dr = DR-Adapters (domain-rectifying, CVPR 2024) after the backbone's first three stages: "
                     "trained, with style perturbation and a cyclic statistics loss (ssp, qsm, qgnet, pfenet)")
    meta_memory: bool = field(
        False, help="qgnet / pfenet: MMT's meta-memory (CVPR 2022) after the backbone stage model.meta_memory_layer: "
                    "slots of source channel statistics mixed into every image's, written while training, frozen "
                    "at evaluation; adds L_orth, L_cont, L_pro to the loss (docs/methods.md, MMT)")
    meta_memory_slots: int = field(16, help="meta_memory: N, the number of memory slots (mean and std each)")
    meta_memory_momentum: float = field(
        0.9, help="meta_memory: lambda, each slot keeps lambda of itself per write (1 - lambda: the batch's share)")
    meta_memory_alpha: float = field(
        0.5, help="meta_memory: alpha, the image's own statistics' weight in the mix with the memory's "
                  "(1 = no enhancement, 0 = the memory's statistics alone)")
    meta_memory_layer: Literal["layer0", "layer1", "layer2", "layer3"] = field(
        "layer2", help="meta_memory: the feature extractor's stage whose output the memory enhances")
    meta_memory_loss_weights: list[float] = field(
        [1.0, 1.0, 1.0], help="meta_memory: weights of L_orth, L_cont, L_pro (the paper: their plain sum)")
    init_from: str = field(
        "", help="start training from a run folder's best (else last) weights or a weights file; keys the file "
                 "lacks (e.g. adapters, QSM's modules) keep their initialisation, keys it has must fit")
    ssp_refine: bool = field(True, help="ssp: the second self-support round (the reference's refine=True)")
    prototype_layer: Literal["layer2", "layer3", "layer4", "layer3+layer4"] = field(
        "layer3", help="prototype: the frozen backbone tap the prototypes are pooled on (all at output stride 8)")
    prototype_scale: float = field(20.0, help="prototype: cosine temperature (PANet's 20; the argmax ignores it)")
    text_guidance: str = field(
        "", help="CD-TG text guidance (qgnet / pfenet): a text-embedding file of the run's class captions made by "
                 "`python -m finetune.tools.embed_text CAPTIONS.json ... --out FILE`; support prototypes are fused "
                 "with caption-guided ones (finetune/model/text_guidance.py); '' = off")
    text_alpha: float = field(0.7, help="text guidance: weight of the image prototype, P = a*P_img + (1-a)*P_text "
                                        "(the paper's best: 0.7)")
    text_heads: int = field(8, help="text guidance: attention heads of the semantic-guided unit (divide reduce_dim)")
    text_adain: bool = field(True, help="text guidance, training only: restyle support features by AdaIN to a "
                                        "random medical style (noise / contrast / boundary / low contrast)")
    text_adain_strength: float = field(0.3, help="text guidance: strength of the ADaIN medical styles")

    def validate(self) -> None:
        """Reject combinations that cannot build (raises ValueError naming the key)."""
        from finetune.methods import METHODS  # the registry imports this module: resolve it at check time

        if self.method not in METHODS:
            raise ValueError(f"model.method={self.method!r} is not registered; choose one of "
                             f"{', '.join(sorted(METHODS))}")
        if not self.bins or any(b <= 0 for b in self.bins):
            raise ValueError(f"model.bins must be a non-empty list of positive numbers, got {self.bins}")
        if any(b <= 1 for b in self.bins) and not all(b <= 1 for b in self.bins):
            raise ValueError(f"model.bins mixes relative (<= 1) and absolute sizes: {self.bins}")
        if not all(b <= 1 for b in self.bins) and any(b != int(b) for b in self.bins):
            raise ValueError(f"absolute model.bins must be whole numbers, got {self.bins}")
        if self.deep_stem and self.backbone == "mobilenet_v2":
            raise ValueError("model.deep_stem is a ResNet option; model.backbone is mobilenet_v2")
        if self.deep_stem and self.backbone_weights == "torchvision":
            raise ValueError("torchvision has no deep-stem ResNet weights: set model.deep_stem=false or give a "
                             "PSPNet-style state dict in model.backbone_weights")
        if self.paper_literal and (self.prior == "none" or self.method != "qgnet"):
            raise ValueError("model.paper_literal changes qgnet's prior map, but model.prior is 'none' or "
                             f"model.method is {self.method!r}")
        if self.reduce_dim <= 0 or self.sim_chunk < 0 or self.aux_weight < 0:
            raise ValueError("model.reduce_dim must be > 0, model.sim_chunk and model.aux_weight >= 0")
        if self.adapter != "none" and self.method == "prototype":
            raise ValueError("model.adapter trains DR-Adapters, but model.method=prototype is training-free")
        if self.meta_memory and (self.method not in ("qgnet", "pfenet") or self.head_inputs != "features"):
            raise ValueError("model.meta_memory is a qgnet / pfenet option with model.head_inputs=features (its "
                             f"losses read the head's features); model.method is {self.method!r}")
        if len(self.meta_memory_loss_weights) != 3 or min(self.meta_memory_loss_weights) < 0:
            raise ValueError("model.meta_memory_loss_weights must be three weights >= 0 (L_orth, L_cont, L_pro), "
                             f"got {self.meta_memory_loss_weights}")
        if self.meta_memory_slots < 1 or not 0 <= self.meta_memory_momentum < 1 or not 0 <= self.meta_memory_alpha <= 1:
            raise ValueError("model.meta_memory_slots must be >= 1, model.meta_memory_momentum in [0, 1) and "
                             "model.meta_memory_alpha in [0, 1]")
        if self.text_guidance:
            from finetune.model.text_guidance import TEXT_GUIDED_METHODS
            if self.method not in TEXT_GUIDED_METHODS:
                raise ValueError(f"model.text_guidance works with {', '.join(TEXT_GUIDED_METHODS)}; "
                                 f"model.method is {self.method!r}")
            if self.head_inputs != "features" or not 0.0 <= self.text_alpha <= 1.0 or self.text_heads <= 0:
                raise ValueError("model.text_guidance fuses the category guider: it needs model.head_inputs="
                                 "features, model.text_alpha in [0, 1] and model.text_heads > 0")
        if self.train_layers and self.method not in ("ssp", "qsm", "bam"):
            raise ValueError(f"model.train_layers is an ssp / qsm / bam option; model.method is {self.method!r}")
        if self.kshot < 1:
            raise ValueError(f"model.kshot={self.kshot} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
