"""Test-time support tuning (``eval.support_tuning=N``): a few steps on the episode's own supports, then predict.

The cross-domain literature's strongest numbers (IFA, ABCDFSS) adapt the trained head to the target episode.
Per episode: the method's trainable parameters (its head, or its adapters) take ``N`` Adam steps of
cross-entropy on the support set used as its own query (1 shot: the support against its horizontal flip,
alternating with the unflipped one; K shots: each shot in turn against the other K-1), then the query is
predicted, and every parameter is restored before the next episode. No random number is drawn, so the
numbers stay a function of the episodes. Results record ``support_tuning`` (the step count) so a tuned number
is never mistaken for a plain one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.segmenter import SegmenterOutput


class SupportTuned(nn.Module):
    """Wrap a trained method so that each forward tunes on the supports first (see the module docstring).

    Args:
        model: a method with trainable parameters (``trainable_parameters()``).
        steps: Adam steps per episode.
        lr: their learning rate.
    """

    def __init__(self, model: nn.Module, steps: int, lr: float = 1e-4) -> None:
        super().__init__()
        if steps <= 0:
            raise ValueError(f"eval.support_tuning must be > 0 steps to wrap a model, got {steps}")
        params = list(model.trainable_parameters())
        if not params:
            raise ValueError(f"eval.support_tuning: {type(model).__name__} has no trainable parameter to tune")
        self.model, self.steps, self.lr = model, steps, lr

    @property
    def reads_class_names(self) -> bool:
        """The wrapped method's: a text-guided method gets the class names for its tuning steps too."""
        return getattr(self.model, "reads_class_names", False)

    def forward(self, query: Tensor, supports: Tensor, support_masks: Tensor,
                class_names: list[str] | None = None) -> SegmenterOutput:
        """``query [B,3,S,S]``, ``supports [B,K,3,S,S]``, ``support_masks [B,K,S,S]``: each episode tuned alone."""
        outs = [self._episode(query[b:b + 1], supports[b:b + 1], support_masks[b:b + 1],
                              {"class_names": class_names[b:b + 1]} if class_names is not None else {})
                for b in range(query.shape[0])]
        if len(outs) == 1:
            return outs[0]
        return SegmenterOutput(logits=torch.cat([o.logits for o in outs]),
                               maps={k: torch.cat([o.maps[k] for o in outs]) for k in outs[0].maps})

    def _episode(self, query: Tensor, supports: Tensor, support_masks: Tensor,
                 names: dict[str, list[str]]) -> SegmenterOutput:
        params = list(self.model.trainable_parameters())
        saved = [p.detach().clone() for p in params]
        optimizer = torch.optim.Adam(params, lr=self.lr)
        k = supports.shape[1]
        with torch.enable_grad():
            for step in range(self.steps):
                if k == 1:  # the support against itself, flipped on every other step
                    flip = step % 2 == 0
                    q = supports[:, 0].flip(-1) if flip else supports[:, 0]
                    target = support_masks[:, 0].flip(-1) if flip else support_masks[:, 0]
                    s, m = supports, support_masks
                else:       # shot i against the other shots
                    i = step % k
                    rest = [j for j in range(k) if j != i]
                    q, target = supports[:, i], support_masks[:, i]
                    s, m = supports[:, rest], support_masks[:, rest]
                out = self.model(q, s, m, **names)
                loss = F.cross_entropy(out.logits, target.long(), ignore_index=255)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            out = self.model(query, supports, support_masks, **names)
            for p, value in zip(params, saved):  # the next episode starts from the trained weights again
                p.copy_(value)
        return out
