"""Stage-2 training images finished on the accelerator (``data.augment_on=device``).

A loader worker runs :class:`~fewshot.data.transforms.DeviceTrainTransform`: the same random draws as the worker path,
the masks made there (bit-identical), and per image its uint8 pixels, one affine matrix (resize, rotation, flip, pad and
crop composed), the resized image's frame in the crop (outside it is pad) and a blur flag;
:func:`~fewshot.data.loader.collate` pads the images into one batch. :class:`DeviceAugment` then makes every query and
support of the batch in one pass with :mod:`common.batch_augment`: a bilinear warp filled with the ImageNet mean outside
the image, PFENet's 5x5 blur where flagged (``torch.where``, no branch on values, nothing read back to the host) and the
normalisation.

Away from the image's borders the result is the worker path's to float rounding plus the difference between one
bilinear resampling and two (the worker path resizes, then rotates); within about two pixels of the image's
edges and of the crop's the fill blending and the blur's border handling differ (measured in
tests/test_stage2_device_aug.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms.v2.functional import normalize  # batched: [N,3,S,S]

from common.batch_augment import gaussian_blur, warp_affine
from fewshot.data.transforms import BLUR_SIGMA, MEAN, STD, check_size

DEVICE_KEYS = ("device_sources", "device_sizes", "device_matrices", "device_frames", "device_blur")


class DeviceAugment:
    """Turns a collated ``augment_on=device`` batch into the worker path's ``query`` / ``supports``.

    Args:
        size: the training crop S (``data.train_size``).
    """

    def __init__(self, size: int) -> None:
        self.size = check_size(size)

    def images(self, sources: torch.Tensor, sizes: torch.Tensor, matrices: torch.Tensor, frames: torch.Tensor,
               blur: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N,3,Hp,Wp]`` padded sources, int64 ``[N,2]`` sizes, ``[N,2,3]`` matrices, ``[N,4]`` frames,
        bool ``[N]`` blur (see :func:`fewshot.data.loader.collate_device_images`) -> normalised ``[N,3,S,S]``."""
        x = warp_affine(sources, sizes, matrices, self.size, MEAN, frames)  # 0-255, as the worker path
        sigma = torch.where(blur.to(x.device), BLUR_SIGMA, 0.0).to(x.dtype)
        x = gaussian_blur(x, sigma, BLUR_SIGMA, kernel_size=5)
        return normalize(x, list(MEAN), list(STD))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with ``device_*`` replaced by ``query [B,3,S,S]`` and ``supports [B,K,3,S,S]``."""
        out = {k: v for k, v in batch.items() if k not in DEVICE_KEYS}
        images = self.images(*(batch[k] for k in DEVICE_KEYS))
        b, k = batch["support_masks"].shape[:2]
        out["query"], out["supports"] = images[:b], images[b:].view(b, k, *images.shape[1:])
        return out
