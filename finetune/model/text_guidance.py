"""CD-TG text guidance (``model.text_guidance``): class captions steer a method's support prototypes.

After "Leveraging Language to Generalize Natural Images to Few-shot Medical Image Segmentation" (public code
Lilacis/CD_TG). Three parts, each usable by any method whose head pools support features into prototypes:

* **Semantic-guided unit** (:class:`SemanticGuidedUnit`): every pixel of a feature map ``[B,D,h,w]`` attends to
  its class's text keys ``[B,M,d]`` (a learned MLP maps the text width d to the head width D first); the
  attention output is added back (residual) and LayerNorm'ed over channels. With one key (one caption) the
  softmax has a single entry, so the attended value is the same for every pixel: the unit is then
  ``LayerNorm(f + b(class))``, a learned class-conditioned bias (tested); several captions make it a real
  per-pixel attention.
* **Text prototypes and fusion**: the guided support features are mask-pooled into a text prototype (the
  class's keys over the foreground, the background caption's over the background) and fused with the
  method's own prototype, ``P = alpha * P_img + (1 - alpha) * P_text`` (``model.text_alpha``, 0.7: the
  paper's best on Lung, whose mIoU spans 69.4-73.7 across alpha).
* **ADaIN** (training only, ``model.text_adain``): support features are restyled by AdaIN to a random
  "medical" style made from themselves (noise, contrast, boundary or low contrast, strength
  ``model.text_adain_strength`` = 0.3).

How the class reaches the unit: a method with text guidance has ``reads_class_names = True``; the engine and
the evaluation core then call it with ``class_names=[...]`` (the episodes' benchmark class names, see
:func:`fewshot.segmenter.class_name_kwargs`), and :meth:`TextGuidance.rows` maps them to text rows. Methods
without it are called exactly as before. The embeddings are buffers outside the state dict: weights trained
with one captions file evaluate with another that covers the target classes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import DataError
from finetune.model.region_maps import weighted_gap
from finetune.model.text_embeddings import TextEmbeddings, load_text_embeddings

STYLES = ("noise", "contrast", "boundary", "low_contrast")
TEXT_GUIDED_METHODS = ("qgnet", "pfenet")  # methods whose builders pass a TextGuidance to their head
ADAIN_EPS = 1e-5


class SemanticGuidedUnit(nn.Module):
    """Pixels attend to text keys: ``LayerNorm(f + MHA(f, mlp(t), mlp(t)))`` (see the module docstring).

    Args:
        text_dim: width d of the text embeddings.
        dim: width D of the features (the head's).
        heads: attention heads (must divide ``dim``).
    """

    def __init__(self, text_dim: int, dim: int, heads: int = 8) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.text_heads={heads} must divide the head width {dim}")
        self.text_mlp = nn.Sequential(nn.Linear(text_dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: Tensor, keys: Tensor, padding: Tensor | None = None) -> Tensor:
        """``features [B,D,h,w]``, ``keys [B,M,d]``, ``padding [B,M]`` (True = no caption) -> ``[B,D,h,w]``."""
        b, d, h, w = features.shape
        pixels = features.flatten(2).transpose(1, 2)                     # [B,hw,D]
        text = self.text_mlp(keys.to(features.dtype))                    # [B,M,D]
        attended, _ = self.attn(pixels, text, text, key_padding_mask=padding, need_weights=False)
        return self.norm(pixels + attended).transpose(1, 2).reshape(b, d, h, w)

    def single_key_bias(self, key: Tensor) -> Tensor:
        """``key [B,d]`` -> ``[B,D]``: what the attention adds to every pixel when the class has one caption."""
        text = self.text_mlp(key)
        _, _, w_v = self.attn.in_proj_weight.chunk(3)
        _, _, b_v = self.attn.in_proj_bias.chunk(3)
        return self.attn.out_proj(F.linear(text, w_v, b_v))


def fuse(image: Tensor, text: Tensor, alpha: float) -> Tensor:
    """``alpha * image + (1 - alpha) * text`` (CD-TG's fusion of image and text prototypes)."""
    return alpha * image + (1.0 - alpha) * text


def adain(content: Tensor, style: Tensor, eps: float = ADAIN_EPS) -> Tensor:
    """AdaIN: ``content [B,C,h,w]`` with each channel's mean and std replaced by ``style``'s (unbiased std)."""
    mu_c, sd_c = content.mean((2, 3), keepdim=True), content.std((2, 3), keepdim=True)
    mu_s, sd_s = style.mean((2, 3), keepdim=True), style.std((2, 3), keepdim=True)
    return (content - mu_c) / (sd_c + eps) * sd_s + mu_s


def high_pass(content: Tensor) -> Tensor:
    """Per-channel 3x3 Laplacian (replicate padding): the high frequencies of ``content [B,C,h,w]``."""
    kernel = content.new_tensor([[-1.0, -1.0, -1.0], [-1.0, 8.0, -1.0], [-1.0, -1.0, -1.0]]) / 8.0
    c = content.shape[1]
    return F.conv2d(F.pad(content, (1, 1, 1, 1), mode="replicate"), kernel.expand(c, 1, 3, 3), groups=c)


def medical_style(content: Tensor, kind: str, strength: float) -> Tensor:
    """A "medical" style made from ``content [B,C,h,w]`` (its statistics are what AdaIN transfers).

    ``noise``: + strength * N(0, 1); ``contrast``: ReLU(content * (1 + strength)); ``boundary``: + strength *
    high frequencies (:func:`high_pass`); ``low_contrast``: the mean + strength * (content - mean).
    """
    if kind == "noise":
        return content + strength * torch.randn_like(content)
    if kind == "contrast":
        return F.relu(content * (1.0 + strength))
    if kind == "boundary":
        return content + strength * high_pass(content)
    if kind == "low_contrast":
        mean = content.mean((2, 3), keepdim=True)
        return mean + strength * (content - mean)
    raise ValueError(f"unknown medical style {kind!r}; one of {', '.join(STYLES)}")


def random_medical_adain(features: tuple[Tensor, ...], strength: float) -> tuple[Tensor, ...]:
    """ADaIN: one style kind drawn (torch's RNG: checkpointed, so resumes are exact) for all ``features``."""
    kind = STYLES[int(torch.randint(len(STYLES), ()))]
    return tuple(adain(f, medical_style(f, kind, strength)) for f in features)


class TextGuidance(nn.Module):
    """The plug-in a method's head holds: text rows, the semantic-guided unit, fusion and ADaIN.

    Args:
        embeddings: the text-embedding file's contents (:func:`load_text_embeddings`).
        dim: the width of the features it guides (the head's).
        alpha: weight of the image prototype in the fusion.
        heads: attention heads.
        adain: restyle support features while training.
        adain_strength: strength of the medical styles.
    """

    def __init__(self, embeddings: TextEmbeddings, dim: int, alpha: float = 0.7, heads: int = 8,
                 adain: bool = True, adain_strength: float = 0.3) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"model.text_alpha must be in [0, 1], got {alpha}")
        self.embeddings, self.alpha = embeddings, alpha
        self.adain, self.adain_strength = adain, adain_strength
        self.unit = SemanticGuidedUnit(embeddings.dim, dim, heads)
        groups = [embeddings.vectors[embeddings.class_index == i] for i in range(len(embeddings.names))]
        groups.append(embeddings.background)                  # the last row: the background caption(s)
        width = max(len(g) for g in groups)
        keys = torch.zeros(len(groups), width, embeddings.dim)
        padding = torch.ones(len(groups), width, dtype=torch.bool)
        for i, g in enumerate(groups):
            keys[i, :len(g)], padding[i, :len(g)] = g, False
        # not in the state dict: the weights do not depend on which classes the file happens to list
        self.register_buffer("keys", keys, persistent=False)         # [K+1, M, d]
        self.register_buffer("padding", padding, persistent=False)   # [K+1, M]

    @property
    def background_row(self) -> int:
        return self.keys.shape[0] - 1

    def missing(self, class_names: list[str]) -> list[str]:
        """The names that have no caption in the file."""
        return [n for n in class_names if self.embeddings.row(n) is None]

    def rows(self, class_names: list[str] | None) -> Tensor:
        """``class_names`` (B benchmark names) -> text rows ``[B]``.

        Raises:
            ValueError: no names given (the caller must pass ``class_names``).
            DataError: a name without a caption, naming the file.
        """
        if class_names is None or None in class_names:
            raise ValueError("model.text_guidance needs the supports' class names (class_names=[...]; "
                             "finetune.predict: --class-name NAME); this call gave none")
        missing = self.missing(class_names)
        if missing:
            raise DataError(f"{self.embeddings.path}: no caption for class {missing[0]!r}; add it to a captions "
                            "file and rerun python -m finetune.tools.embed_text")
        return torch.tensor([self.embeddings.row(n) for n in class_names], device=self.keys.device)

    def guide(self, features: Tensor, rows: Tensor) -> Tensor:
        """``features [B,D,h,w]`` guided by the captions of ``rows [B]``."""
        return self.unit(features, self.keys[rows], self.padding[rows])

    def prototypes(self, features: Tensor, fg: Tensor, rows: Tensor,
                   bg: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Text prototypes ``[B,D,1,1]``: guided by the class over ``fg [B,1,h,w]`` (and by the background
        caption over ``bg``, when given: for methods that also keep a background prototype)."""
        fg_proto = weighted_gap(self.guide(features, rows), fg)
        if bg is None:
            return fg_proto, None
        back = torch.full_like(rows, self.background_row)
        return fg_proto, weighted_gap(self.guide(features, back), bg)

    def fuse(self, image: Tensor, text: Tensor) -> Tensor:
        """:func:`fuse` with ``model.text_alpha``."""
        return fuse(image, text, self.alpha)

    def restyle(self, *features: Tensor) -> tuple[Tensor, ...]:
        """ADaIN on support features while training (when on); unchanged otherwise."""
        if not (self.training and self.adain):
            return features
        return random_medical_adain(features, self.adain_strength)

    def describe(self) -> dict[str, Any]:
        """What the results record about the text side."""
        e = self.embeddings
        return {"file": e.path, "encoder": e.encoder, "captions_sha256": e.captions_sha256, "classes": len(e.names),
                "alpha": self.alpha, "adain": self.adain, "adain_strength": self.adain_strength}


def build_text_guidance(path: str, dim: int, alpha: float, heads: int, adain: bool,
                        adain_strength: float) -> TextGuidance | None:
    """The plug-in from ``model.text_*`` (None when ``model.text_guidance`` is empty)."""
    if not path:
        return None
    return TextGuidance(load_text_embeddings(path), dim, alpha, heads, adain, adain_strength)


def check_text_classes(model: nn.Module, benchmarks: list[Any]) -> None:
    """Before any work: every class of ``benchmarks`` (None entries skipped) has a caption in the model's file.

    Raises:
        DataError: naming the file, the benchmark and the classes without a caption.
    """
    guidance = getattr(model, "text_guidance", None)
    if guidance is None:
        return
    for bench in benchmarks:
        if bench is None:
            continue
        missing = guidance.missing([str(bench.class_names.get(c, c)) for c in bench.class_ids])
        if missing:
            raise DataError(f"{guidance.embeddings.path}: no caption for {len(missing)} class(es) of {bench!r}: "
                            f"{', '.join(missing[:8])}; add them to a captions file in configs/finetune/captions/ "
                            "and rerun python -m finetune.tools.embed_text")
