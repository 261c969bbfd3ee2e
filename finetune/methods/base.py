"""The interface every registered few-shot method implements, and the registry that names them.

A method is an ``nn.Module`` built from the ``model.*`` config by a function registered under its name::

    @register("prototype")
    def build_prototype(cfg: ModelConfig) -> PrototypeBaseline: ...

``forward(query [B,3,S,S], supports [B,K,3,S,S], support_masks [B,K,S,S]) -> SegmenterOutput`` (logits
``[B,2,S,S]`` plus named maps for the PNG grids and the recall analysis, see :mod:`fewshot.segmenter`) is
``decode(encode_query(query), encode_supports(supports, support_masks))``: the supports' state does not depend
on the query, so ``finetune.predict`` encodes them once and decodes any number of queries against a batch-1
state;
``loss(out, target [B,S,S], classes [B]) -> (scalar, {name: detached part})``; ``trainable_parameters()`` is what the
optimiser gets; a method with none is training-free and is evaluated without a training run.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from fewshot.segmenter import SegmenterOutput
from finetune.model.adapters import pop_cyclic_loss
from finetune.model.config import ModelConfig
from finetune.model.meta_memory import memory_losses

ADAPTER_WEIGHT = 2.0  # weight of the DR-Adapters' cyclic statistics loss (DR-Adapter and QSM: 2 * L1)


class FewShotMethod(nn.Module):
    """Base class of the registered methods (see the module docstring for the contract)."""

    # True: forward / encode_supports also take ``class_names`` (B benchmark class names; model.text_guidance)
    reads_class_names: bool = False

    def forward(self, query: Tensor, supports: Tensor, support_masks: Tensor) -> SegmenterOutput:
        """Segment B episodes: ``decode(encode_query(query), encode_supports(supports, support_masks))``."""
        return self.decode(self.encode_query(query), self.encode_supports(supports, support_masks))

    def encode_query(self, query: Tensor) -> Any:
        """``query [B,3,S,S]`` -> the method's query state (features)."""
        raise NotImplementedError

    def encode_supports(self, supports: Tensor, support_masks: Tensor) -> Any:
        """``supports [B,K,3,S,S]``, ``support_masks [B,K,S,S]`` -> the method's support state."""
        raise NotImplementedError

    def decode(self, query: Any, supports: Any) -> SegmenterOutput:
        """The episodes' output; a support state of batch 1 serves a query state of any batch."""
        raise NotImplementedError

    def loss(self, out: SegmenterOutput, target: Tensor,
             classes: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Training loss of ``out`` against ``target [B,S,S]`` (0 / 1 / 255 = ignore); ``classes [B]`` are the
        episodes' class ids, for methods that keep per-class state (NTRENet's prototype bank)."""
        raise NotImplementedError(f"{type(self).__name__} is training-free: it has no loss")

    def add_adapter_loss(self, total: Tensor, parts: dict[str, Tensor], out: SegmenterOutput | None = None,
                         target: Tensor | None = None,
                         classes: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``total + 2 * cyclic`` when ``self.backbone`` has DR-Adapters (their terms since the last call); with
        a meta-memory also ``+ w . (L_orth, L_cont, L_pro)``, the last two from ``out.loss_inputs`` (``mmt_query
        [B,D,h,w]``, ``mmt_fg``, ``mmt_bg [B,D]``) against ``target [B,S,S]``."""
        backbone = getattr(self, "backbone", None)
        adapters, memory = getattr(backbone, "adapters", None), getattr(backbone, "memory", None)
        if adapters:
            cyclic = pop_cyclic_loss(adapters, total.device)
            total, parts = total + ADAPTER_WEIGHT * cyclic, {**parts, "cyclic": cyclic.detach()}
        if memory is not None:
            terms = {"orth": memory.pop_orthogonality_loss(total.device)}
            if out is None or "mmt_query" not in out.loss_inputs:
                raise ValueError(f"{type(self).__name__} hands no features to the meta-memory's losses")
            inputs = out.loss_inputs
            terms.update(memory_losses(inputs["mmt_query"], inputs["mmt_fg"], inputs["mmt_bg"], target, classes))
            for weight, name in zip(memory.loss_weights, ("orth", "cont", "pro")):
                total = total + weight * terms[name]
            parts = {**parts, **{k: v.detach() for k, v in terms.items()}}
        return total, parts

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser updates (frozen backbones excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def trains(self) -> bool:
        """Whether the method has anything to train."""
        return bool(self.trainable_parameters())


Builder = Callable[[ModelConfig], FewShotMethod]
METHODS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Register a builder under ``model.method=<name>``; a name is registered once."""
    def wrap(builder: Builder) -> Builder:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice ({METHODS[name].__module__}, {builder.__module__})")
        METHODS[name] = builder
        return builder
    return wrap
