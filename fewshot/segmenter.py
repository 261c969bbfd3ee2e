"""What the evaluation core asks of a few-shot segmenter, whichever method it is.

A segmenter is a callable ``(query [B,3,S,S], supports [B,K,3,S,S], support_masks [B,K,S,S]) ->``
:class:`SegmenterOutput`. Support masks hold 1 = foreground, 0 = background, 255 = ignore (counted as
background). Inputs are normalised with ImageNet statistics (``fewshot.data.transforms``); S = 8n+1.
``finetune.methods`` registers the project's segmenters; anything with this signature can be scored. A
segmenter whose ``reads_class_names`` is true (text guidance) is also given ``class_names=[...]``, the
episodes' benchmark class names (:func:`class_name_kwargs`); every other one keeps the three-tensor call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor


@dataclass
class SegmenterOutput:
    """A segmenter's answer for a batch of episodes.

    Attributes:
        logits: ``[B,2,S,S]`` (background, foreground) at the input size; the prediction is their argmax.
        maps: named ``[B,1,h,w]`` maps in [0, 1] (e.g. QGNet's ``prior`` and ``guided`` region maps), drawn in
            the PNG grids in this order and scored by the region-map recall analysis.
        aux_logits: extra ``[B,2,b,b]`` logits that only a training loss uses.
        loss_inputs: other tensors only the method's own training loss reads (e.g. SSP's query features for
            its self-matching term); empty at evaluation.
    """

    logits: Tensor
    maps: dict[str, Tensor] = field(default_factory=dict)
    aux_logits: list[Tensor] = field(default_factory=list)
    loss_inputs: dict[str, Tensor] = field(default_factory=dict)


class Segmenter(Protocol):
    """Anything the evaluation core can score (an ``nn.Module`` in practice: it is moved and set to eval)."""

    def __call__(self, query: Tensor, supports: Tensor, support_masks: Tensor) -> SegmenterOutput: ...


def class_name_kwargs(model: Any, benchmark: Any, class_ids: Tensor | list[int]) -> dict[str, list[str]]:
    """``{"class_names": [B names]}`` for a segmenter that reads them (``reads_class_names``), else ``{}``.

    ``benchmark.class_names`` maps the episodes' ``class_ids [B]`` to names (a several-source benchmark's names
    carry their ``source:`` prefix).
    """
    if not getattr(model, "reads_class_names", False):
        return {}
    return {"class_names": [str(benchmark.class_names.get(int(c), int(c))) for c in class_ids]}
