"""The MoCo-v2 prior extractor: query and key encoders, global and local projection heads.

The encoders are plain torchvision networks (ResNet-50 / ResNet-18 / MobileNetV2, classifier removed), so
the exported key encoder loads into the matching torchvision constructor unchanged. On a single process
the BatchNorm layers are lightly's ``SplitBatchNorm`` (emulating per-GPU statistics) and the key batch is
shuffled inside the process; with several processes the key batch is shuffled across processes
(MoCo's shuffle-BN) and BN is plain. Either way the query and its positive key never share BN statistics.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from lightly.models.batchnorm import SplitBatchNorm
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import batch_shuffle, batch_unshuffle, deactivate_requires_grad, update_momentum
from torch import Tensor, nn

from common.weights import ARCHS, load_torchvision_weights, torchvision_net, trunk_features
from pretrain.config import PretrainConfig
from superpixels.pooling import labels_to_grid, pool_regions, sample_shared_ids


def build_encoder(arch: str, split_bn: int = 0) -> nn.Module:
    """A torchvision backbone without its classifier; ``split_bn > 1`` swaps in SplitBatchNorm."""
    norm = partial(SplitBatchNorm, num_splits=split_bn) if split_bn > 1 else None
    net = torchvision_net(arch, norm)
    if arch.startswith("resnet"):
        net.fc = nn.Identity()  # state_dict then holds exactly torchvision's keys minus fc.*
    else:
        net.classifier = nn.Identity()
    return net


def _repeat_split_bn_stats(encoder: nn.Module) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """A state rewrite that repeats plain BN statistics for SplitBatchNorm, which keeps one copy per split."""
    own = encoder.state_dict()

    def adapt(state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.repeat(own[k].numel() // v.numel())
                if k in own and k.endswith(("running_mean", "running_var")) and own[k].numel() != v.numel() else v
                for k, v in state.items()}
    return adapt


class MoCoPrior(nn.Module):
    """Query encoder + heads (trained) and their EMA key copies (updated by momentum only).

    Attributes:
        query_encoder, key_encoder: torchvision trunks.
        global_head_q/_k: 2-layer MLP C -> hidden -> out_dim (MoCo-v2 head, lightly's MoCoProjectionHead).
        local_head_q/_k: a separate head of the same shape for superpixel embeddings.
    """

    def __init__(self, cfg: PretrainConfig, world_size: int = 1) -> None:
        super().__init__()
        m = cfg.model
        bn_mode = m.bn_mode if m.bn_mode != "auto" else ("shuffle" if world_size > 1 else "split")
        if bn_mode == "shuffle" and world_size == 1:
            raise ValueError("model.bn_mode=shuffle needs several processes; use split on one process")
        self.bn_mode = bn_mode
        self.distributed_shuffle = bn_mode == "shuffle"
        self.shuffle_keys = bn_mode in ("shuffle", "split")
        self.momentum = m.momentum
        dim = ARCHS[m.arch].feature_dim
        self.query_encoder = build_encoder(m.arch, m.split_bn_splits if bn_mode == "split" else 0)
        if m.init_weights:  # a partial load would silently train from a half-random network: exact or error
            load_torchvision_weights(self.query_encoder, m.arch, m.init_weights, key="model.init_weights",
                                     adapt=_repeat_split_bn_stats(self.query_encoder))
        self.global_head_q = MoCoProjectionHead(dim, m.head_hidden_dim, m.out_dim)
        self.local_head_q = MoCoProjectionHead(dim, m.head_hidden_dim, m.out_dim)
        self.key_encoder = copy.deepcopy(self.query_encoder)
        self.global_head_k = copy.deepcopy(self.global_head_q)
        self.local_head_k = copy.deepcopy(self.local_head_q)
        for key_part in self.key_modules():
            deactivate_requires_grad(key_part)
        self.uses_global, self.uses_local = cfg.uses_global, cfg.uses_local
        self.local_mode = cfg.loss.local_mode
        self.pooled_regions = cfg.loss.pooled_regions

    def key_modules(self) -> list[nn.Module]:
        return [self.key_encoder, self.global_head_k, self.local_head_k]

    def query_modules(self) -> list[nn.Module]:
        return [self.query_encoder, self.global_head_q, self.local_head_q]

    @torch.no_grad()
    def momentum_update(self, momentum: float | None = None) -> None:
        """key = m * key + (1 - m) * query, parameters only (BN buffers are not averaged, as in MoCo)."""
        m = self.momentum if momentum is None else momentum
        for q, k in zip(self.query_modules(), self.key_modules()):
            update_momentum(q, k, m)

    @torch.no_grad()
    def _encode_keys(self, x: Tensor) -> Tensor:
        """Key-encoder feature maps with the batch shuffled across BN groups, returned in input order."""
        if not self.shuffle_keys:
            return trunk_features(self.key_encoder, x)
        x, idx = batch_shuffle(x, distributed=self.distributed_shuffle)
        return batch_unshuffle(trunk_features(self.key_encoder, x), idx, distributed=self.distributed_shuffle)

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Embed one batch; call :meth:`momentum_update` first (MoCo order: update, then encode keys).

        Returns L2-normalised embeddings:
            ``q``, ``k``: ``[B, D]`` global query / key (when the global loss is on);
            ``local_q``, ``local_k``: ``[N, D]`` local query / key with ``local_valid [N]`` (N = B for patch
            mode, B * pooled_regions for pooled mode; invalid rows have no region shared by both views).
        """
        out: dict[str, Tensor] = {}
        if "view_q" in batch:
            fq = trunk_features(self.query_encoder, batch["view_q"])  # [B, C, h, w]
            fk = self._encode_keys(batch["view_k"])
            if self.uses_global:
                out["q"] = F.normalize(self.global_head_q(fq.mean((2, 3))), dim=1)
                with torch.no_grad():
                    out["k"] = F.normalize(self.global_head_k(fk.mean((2, 3))), dim=1)
        if self.uses_local and self.local_mode == "patch":
            pq = trunk_features(self.query_encoder, batch["patch_q"]).mean((2, 3))
            pk = self._encode_keys(batch["patch_k"]).mean((2, 3))
            out["local_q"] = F.normalize(self.local_head_q(pq), dim=1)
            with torch.no_grad():
                out["local_k"] = F.normalize(self.local_head_k(pk), dim=1)
            out["local_valid"] = torch.ones(pq.shape[0], dtype=torch.bool, device=pq.device)
        elif self.uses_local:
            out.update(self._pooled_local(fq, fk, batch["labels_q"], batch["labels_k"], generator,
                                          batch.get("region_count")))
        return out

    def _pooled_local(self, fq: Tensor, fk: Tensor, labels_q: Tensor, labels_k: Tensor,
                      generator: torch.Generator | None, region_count: int | None = None) -> dict[str, Tensor]:
        """DetCon-style: mean-pool each view's features per superpixel, pair the same id across views.

        ``region_count`` (from the loader: 1 + the batch's largest id) sizes the pooling without reading the
        label maps back from the device; without it the maps are read (and checked).
        """
        known = region_count is not None
        num_ids = int(region_count) if known else int(max(labels_q.max(), labels_k.max())) + 1
        grid = fq.shape[-1]
        grid_q = labels_to_grid(labels_q, grid, num_ids, check=not known)  # [B, h, w]
        grid_k = labels_to_grid(labels_k, grid, num_ids, check=not known)
        pooled_q, present_q = pool_regions(fq, grid_q, num_ids, check=not known)  # [B, num_ids, C], [B, num_ids]
        with torch.no_grad():
            pooled_k, present_k = pool_regions(fk, grid_k, num_ids, check=not known)
        ids, valid = sample_shared_ids(present_q, present_k, self.pooled_regions, generator)  # [B, n]
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
        emb_q = self.local_head_q(pooled_q[rows, ids].flatten(0, 1))  # [B*n, D]
        with torch.no_grad():
            emb_k = self.local_head_k(pooled_k[rows, ids].flatten(0, 1))
        return {"local_q": F.normalize(emb_q, dim=1), "local_k": F.normalize(emb_k, dim=1),
                "local_valid": valid.flatten()}
