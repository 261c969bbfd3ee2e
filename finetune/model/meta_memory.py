"""MMT's meta-memory (Wang et al., "Remember the Difference", CVPR 2022): remember the source's feature styles
and lend them to every image, source or target. No public code exists; these are the paper's equations as we
read them, the choices the paper leaves open marked (ours).

The memory sits after one backbone stage (``model.meta_memory_layer``) of the feature extractor, on the hook
the DR-Adapters use (:meth:`finetune.model.backbones.FrozenBackbone._run`). It holds N slots, each a channel
mean ``m_j`` and a channel std ``e_j`` ``[N,C]``. For features ``f [B,C,H,W]`` with channel statistics
``mu_b, v_b [B,C]`` (spatial mean and std):

    read   s_b^{Mj} = softmax_j cos~(mu_b, m_j) / T        mu_b^M = sum_j s_b^{Mj} m_j,  v_b^M = sum_j s_b^{Mj} e_j
    mix    mu_mix = alpha mu_b + (1 - alpha) mu_b^M          v_mix = alpha v_b + (1 - alpha) v_b^M
    enhance f_enh = f_norm * v_mix + mu_mix,                 f_norm = (f - mu_b) / v_b
    write  s_M^{jb} = softmax_b cos~(m_j, mu_b) / T          (training only, after the read)
           m_j <- lambda m_j + (1 - lambda) sum_b s_M^{jb} mu_b,    e_j <- lambda e_j + (1 - lambda) sum_b s_M^{jb} v_b
    L_orth = mean_{j != k} cos(m_j, m_k)  (and the same of the e_j; their mean)

(ours) cos~ is the cosine of the two vectors minus the slots' mean ``sum_j m_j / N`` (uncentred, every slot
collapsed to one running mean in our runs: the channel means of all images point nearly the same way); the
temperature T = 0.1; the empty memory is filled by the first N samples seen, in order (identical
slots would stay identical under the update), and until a slot is filled it is neither read nor written; an
empty memory reads back the sample's own statistics (the enhancement is then the identity). The statistics
are gathered over processes before the write, in rank order, so every process keeps the same memory (the slots
are buffers: saved with checkpoints and weights). In evaluation mode nothing is written.

The other two losses act on the trained head's features, which the memory-enhanced backbone features feed
(:func:`memory_losses`; the method hands them over in ``SegmenterOutput.loss_inputs``):

    L_pro  = CE(upsampled 10 cos(query pixel, [support bg, support fg] prototypes), query mask)
    L_cont = InfoNCE (tau 0.1): anchor the query's foreground prototype (its ground-truth mask), positive the
             support's foreground prototype, negatives the support's and the query's background prototypes and
             the support prototypes of the batch's episodes of other classes
    L      = method loss + w_orth L_orth + w_cont L_cont + w_pro L_pro       (w = 1, 1, 1: the paper's sum)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from finetune.model.adapters import STAT_EPS, channel_stats, stage_channels
from finetune.model.config import ModelConfig

ATTENTION_TEMPERATURE = 0.1  # (ours) cosine attention between statistics and slots
CONTRAST_TEMPERATURE = 0.1   # (ours) InfoNCE temperature of L_cont
PROTOTYPE_SCALE = 10.0       # (ours) cosine scale of L_pro's prototype logits (SSP's 10)
MEMORY_LAYERS = ("layer0", "layer1", "layer2", "layer3")


def orthogonality_loss(slots: Tensor) -> Tensor:
    """Mean cosine similarity over the ordered pairs ``j != k`` of ``slots [N,C]``: 0 when orthogonal, 1 when
    identical (0 for fewer than two slots)."""
    n = slots.shape[0]
    if n < 2:
        return slots.sum() * 0.0
    unit = F.normalize(slots, dim=1)
    sim = unit @ unit.t()                                                   # [N,N]
    return (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))


def attention(a: Tensor, b: Tensor, center: Tensor) -> Tensor:
    """``softmax`` over ``b``'s rows of ``cos(a_i - c, b_k - c) / T``: ``a [P,C]``, ``b [Q,C]``, ``c [C]`` ->
    ``[P,Q]``. (ours) Centring on the slots' mean: the raw channel means of post-ReLU features all point the same
    way (cosines ~0.95), so uncentred weights are uniform and every slot converges to the same running mean."""
    a, b = F.normalize(a - center, dim=1), F.normalize(b - center, dim=1)
    return (a @ b.t() / ATTENTION_TEMPERATURE).softmax(dim=1)


def read_memory(mean: Tensor, mean_slots: Tensor, std_slots: Tensor) -> tuple[Tensor, Tensor]:
    """``mu_b [B,C]`` read from ``n >= 1`` slots ``[n,C]`` -> ``(mu_b^M, v_b^M)``, each ``[B,C]``."""
    if mean_slots.shape[0] == 0:
        raise ValueError("read_memory needs at least one slot")
    weights = attention(mean, mean_slots, mean_slots.mean(0))               # [B,n]
    return weights @ mean_slots, weights @ std_slots


def update_memory(mean_slots: Tensor, std_slots: Tensor, mean: Tensor, std: Tensor,
                  momentum: float) -> tuple[Tensor, Tensor]:
    """One write of the batch statistics ``mu, v [B,C]`` into slots ``[n,C]``: the new ``(m, e)``, each ``[n,C]``."""
    weights = attention(mean_slots, mean, mean_slots.mean(0))               # [n,B], rows sum to 1
    return (momentum * mean_slots + (1 - momentum) * weights @ mean,
            momentum * std_slots + (1 - momentum) * weights @ std)


def enhance(x: Tensor, mean: Tensor, std: Tensor, mem_mean: Tensor, mem_std: Tensor, alpha: float) -> Tensor:
    """``f_norm * v_mix + mu_mix`` for ``x [B,C,H,W]``, its statistics and the memory's ``[B,C,1,1]``."""
    mix_mean = alpha * mean + (1 - alpha) * mem_mean
    mix_std = alpha * std + (1 - alpha) * mem_std
    return (x - mean) / (std + STAT_EPS) * mix_std + mix_mean


def gather_rows(local: Tensor) -> Tensor:
    """``[B,C]`` of every process in rank order (this process's rows keep their graph); alone: ``local``."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.detach().contiguous())
    parts[dist.get_rank()] = local
    return torch.cat(parts)


class MetaMemory(nn.Module):
    """The meta-memory after one backbone stage (see the module docstring).

    Args:
        channels: channels of the stage's output.
        slots: N, the number of memory slots.
        momentum: lambda of the slot update.
        alpha: weight of the sample's own statistics in the mix (1 = no enhancement).
        loss_weights: weights of (L_orth, L_cont, L_pro).
    """

    def __init__(self, channels: int, slots: int = 16, momentum: float = 0.9, alpha: float = 0.5,
                 loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        if slots < 1 or not 0.0 <= momentum < 1.0 or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"meta-memory needs slots >= 1, 0 <= momentum < 1, 0 <= alpha <= 1; got {slots}, "
                             f"{momentum}, {alpha}")
        self.momentum, self.alpha, self.loss_weights = momentum, alpha, tuple(loss_weights)
        self.register_buffer("mean_slots", torch.zeros(slots, channels))
        self.register_buffer("std_slots", torch.zeros(slots, channels))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.orth_terms: list[Tensor] = []  # filled by training forwards, emptied by pop_orthogonality_loss

    def forward(self, x: Tensor) -> Tensor:
        """``x [B,C,H,W]`` -> memory-enhanced features of the same shape; training also writes the memory."""
        mean, std = channel_stats(x)                                        # [B,C,1,1]
        n = int(self.filled)
        if n == 0:
            mem_mean, mem_std = mean, std
        else:
            # copies: the write below changes the buffers in place, and autograd may hold what the read used
            read = read_memory(mean.flatten(1).float(), self.mean_slots[:n].clone(), self.std_slots[:n].clone())
            mem_mean, mem_std = (t.to(mean.dtype).view_as(mean) for t in read)
        out = enhance(x, mean, std, mem_mean, mem_std, self.alpha)
        if self.training:
            self.write(mean.flatten(1), std.flatten(1))
        return out

    def write(self, mean: Tensor, std: Tensor) -> None:
        """Write the batch statistics ``[B,C]`` (gathered over processes): the first free slots take the first
        rows as they are, the rows left update every slot; records ``L_orth`` of the new memory."""
        mean, std = gather_rows(mean.float()), gather_rows(std.float())
        n, slots = int(self.filled), self.mean_slots.shape[0]
        fill = min(slots - n, mean.shape[0])
        new_mean = torch.cat([self.mean_slots[:n], mean[:fill]])
        new_std = torch.cat([self.std_slots[:n], std[:fill]])
        if fill < mean.shape[0]:  # the memory is full: the remaining rows update every slot
            new_mean, new_std = update_memory(new_mean, new_std, mean[fill:], std[fill:], self.momentum)
        self.orth_terms.append(0.5 * (orthogonality_loss(new_mean) + orthogonality_loss(new_std)))
        with torch.no_grad():
            self.mean_slots[: n + fill].copy_(new_mean)
            self.std_slots[: n + fill].copy_(new_std)
            self.filled.fill_(n + fill)

    def pop_orthogonality_loss(self, device: torch.device) -> Tensor:
        """The mean ``L_orth`` recorded since the last call (0 when none); empties the records."""
        terms, self.orth_terms = self.orth_terms, []
        return torch.stack(terms).mean().to(device) if terms else torch.zeros((), device=device)


def masked_prototype(features: Tensor, mask: Tensor) -> Tensor:
    """``features [B,D,h,w]``, ``mask [B,1,h,w]`` in [0, 1] -> the masked average ``[B,D]`` (0 where empty)."""
    return (features * mask).sum((2, 3)) / mask.sum((2, 3)).clamp(min=STAT_EPS)


def memory_losses(query: Tensor, support_fg: Tensor, support_bg: Tensor, target: Tensor,
                  classes: Tensor | None = None) -> dict[str, Tensor]:
    """``L_cont`` and ``L_pro`` on the head's memory-enhanced features.

    Args:
        query: the query's trained features ``[B,D,h,w]``.
        support_fg, support_bg: the supports' foreground / background prototypes in that space ``[B,D]``.
        target: the query mask ``[B,H,W]`` (0 / 1 / 255 = ignore).
        classes: the episodes' class ids ``[B]``; episodes of the same class are not each other's negatives
            (None: every other episode is a negative).

    Returns:
        ``{"cont": scalar, "pro": scalar}``.
    """
    target = target.long()
    protos = torch.stack([support_bg, support_fg], dim=1)                   # [B,2,D]
    cos = torch.einsum("bkd,bdhw->bkhw", F.normalize(protos, dim=2), F.normalize(query, dim=1))
    logits = F.interpolate(PROTOTYPE_SCALE * cos, size=target.shape[-2:], mode="bilinear", align_corners=True)
    pro = F.cross_entropy(logits, target, ignore_index=255)

    small = F.interpolate(target.unsqueeze(1).float(), size=query.shape[-2:], mode="nearest")  # [B,1,h,w]
    fg, bg = (small == 1).float(), (small == 0).float()
    anchor = F.normalize(masked_prototype(query, fg), dim=1)                # [B,D]
    query_bg = F.normalize(masked_prototype(query, bg), dim=1)
    sfg, sbg = F.normalize(support_fg, dim=1), F.normalize(support_bg, dim=1)
    b = query.shape[0]
    pos = (anchor * sfg).sum(1, keepdim=True)                               # [B,1]
    own_neg = torch.stack([(anchor * sbg).sum(1), (anchor * query_bg).sum(1)], dim=1)  # [B,2]
    cross = anchor @ sfg.t()                                                # [B,B]: other episodes' supports
    ids = classes.view(-1) if classes is not None else torch.arange(b, device=query.device)
    other = ids.view(-1, 1) != ids.view(1, -1)
    cross = cross.masked_fill(~other, float("-inf"))
    scores = torch.cat([pos, own_neg, cross], dim=1) / CONTRAST_TEMPERATURE  # positive in column 0
    valid = fg.sum((1, 2, 3)) > 0
    if valid.any():
        cont = F.cross_entropy(scores[valid], torch.zeros(int(valid.sum()), dtype=torch.long, device=query.device))
    else:  # no query foreground in the batch: nothing to contrast
        cont = scores.nan_to_num(0.0, 0.0, 0.0).sum() * 0.0
    return {"cont": cont, "pro": pro}


def attach_meta_memory(backbone: nn.Module, cfg: ModelConfig) -> None:
    """Put a :class:`MetaMemory` after ``cfg.meta_memory_layer`` of ``backbone`` (a ``FrozenBackbone``) when
    ``cfg.meta_memory`` (a ``ModelConfig``); the one line a method's builder needs."""
    if not cfg.meta_memory:
        return
    if cfg.meta_memory_layer not in MEMORY_LAYERS:
        raise ValueError(f"model.meta_memory_layer: {cfg.meta_memory_layer!r} is not one of {', '.join(MEMORY_LAYERS)}")
    memory = MetaMemory(stage_channels(getattr(backbone, cfg.meta_memory_layer)), cfg.meta_memory_slots,
                        cfg.meta_memory_momentum, cfg.meta_memory_alpha, tuple(cfg.meta_memory_loss_weights))
    backbone.add_memory(memory, cfg.meta_memory_layer)
