"""Episodes as tensors: a Dataset over an episode list and its collate.

Every random choice of an item (its augmentation) comes from a generator seeded by
``(seed, epoch, episode_index, slot)``, so a batch is the same whatever ``num_workers`` is. Bad input
(missing or corrupt file, image / mask size mismatch, label values out of range, a query without its class,
a support without foreground) raises :class:`~fewshot.data.base.DataError` naming the file, or with
``on_bad_sample='skip'`` the episode is dropped from its batch and listed in ``batch["skipped"]``.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fewshot.data.base import IGNORE_INDEX, DataError, EpisodeSpec, FewShotBenchmark, Sample

Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[Tensor, Tensor]]
STACKED = ("query", "query_mask", "supports", "support_masks", "class_id", "episode_index")


class EpisodeDataset(Dataset):
    """Item ``i`` is episode ``episodes[i]`` loaded and transformed.

    Returns a dict: ``query`` float ``[3, S, S]``, ``query_mask`` int64 ``[S, S]`` in {0, 1, 255},
    ``supports`` ``[K, 3, S, S]``, ``support_masks`` int64 ``[K, S, S]``, ``class_id``, ``episode_index``,
    ``query_key``, ``support_keys``, and for evaluation the query's original-resolution mask
    ``query_mask_orig`` uint8 ``[H0, W0]`` with ``orig_size`` ``(H0, W0)``. With a
    :class:`~fewshot.data.transforms.DeviceTrainTransform` (``data.augment_on=device``) ``query`` and
    ``supports`` are replaced by ``device_images``: the query's and each support's uint8 image with its
    parameters, which :func:`collate` pads into one batch for the device.
    """

    def __init__(self, benchmark: FewShotBenchmark, episodes: list[EpisodeSpec], transform: Transform,
                 shot: int | None = None, seed: int = 0, epoch: int = 0,
                 on_bad_sample: Literal["error", "skip"] = "error") -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be error or skip, got {on_bad_sample!r}")
        wrong = [i for i, e in enumerate(episodes) if shot is not None and len(e.supports) != shot]
        if wrong:
            raise ValueError(f"episode {wrong[0]} has {len(episodes[wrong[0]].supports)} supports, expected {shot}")
        self.benchmark, self.episodes, self.transform = benchmark, episodes, transform
        self.seed, self.epoch, self.on_bad_sample = seed, epoch, on_bad_sample

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            with single_thread():
                return self.build(index)
        except DataError as err:
            if self.on_bad_sample == "error":
                raise
            warnings.warn(f"skipped episode {index}: {err}", stacklevel=2)
            return {"skipped": f"episode {index}: {err}", "episode_index": index}

    def build(self, index: int) -> dict[str, Any]:
        """Load, check and transform one episode (raises DataError on bad input)."""
        episode = self.episodes[index]
        c = episode.class_id
        image, mask, sample = self.read(episode.query, c, "query")
        query, query_mask = self.transform(image, mask, self.rng(index, 0))
        supports, support_masks = [], []
        for slot, key in enumerate(episode.supports, start=1):
            s_image, s_mask, _ = self.read(key, c, "support")
            s_image, s_mask = self.transform(s_image, s_mask, self.rng(index, slot))
            supports.append(s_image)
            support_masks.append(s_mask)
        item = {"query_mask": query_mask, "support_masks": torch.stack(support_masks), "class_id": torch.tensor(c),
                "episode_index": torch.tensor(index), "query_key": episode.query,
                "support_keys": list(episode.supports), "query_mask_orig": torch.from_numpy(mask),
                "orig_size": tuple(mask.shape)}
        if isinstance(query, dict):  # DeviceTrainTransform: the images and their parameters, finished on the device
            item["device_images"] = [query, *supports]
        else:
            item["query"], item["supports"] = query, torch.stack(supports)
        return item

    def read(self, key: str, class_id: int, role: str) -> tuple[np.ndarray, np.ndarray, Sample]:
        """Load one sample for the class and check what the transforms and the loss rely on."""
        try:
            sample = self.benchmark.sample(key)
        except KeyError:
            raise DataError(f"{role} key {key!r} is not in {self.benchmark!r}") from None
        image, mask = self.benchmark.load(sample, class_id)
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != mask.shape:
            raise DataError(f"{sample.image_path}: image {image.shape} and mask {mask.shape} ({sample.mask_path}) "
                            f"do not match")
        values = np.unique(mask)
        if not set(values.tolist()) <= {0, 1, IGNORE_INDEX}:
            raise DataError(f"{sample.mask_path}: mask values {values.tolist()} outside {{0, 1, 255}} for class "
                            f"{class_id}")
        if not (mask == 1).any():
            what = "has no pixel of its episode class" if role == "query" else "has no foreground"
            raise DataError(f"{sample.mask_path}: {role} mask {what} (class {class_id}, "
                            f"{self.benchmark.class_names.get(class_id, '?')})")
        return image, np.array(mask, np.uint8), sample  # a writable copy: it becomes query_mask_orig

    def rng(self, index: int, slot: int) -> np.random.Generator:
        """The generator of one image of one episode: a function of (seed, epoch, episode, slot) only."""
        return np.random.default_rng([self.seed, self.epoch, index, slot])


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one thread, as DataLoader workers do: multi-threaded resampling rounds differently in
    the last bit, and items must not depend on ``num_workers`` (0 = the main process)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the fixed-size fields; keep keys, original masks and sizes as lists; list skipped episodes.

    ``batch["size"]`` is the number of episodes kept (0 when every one was skipped, then nothing is stacked).
    """
    kept = [x for x in items if "skipped" not in x]
    batch: dict[str, Any] = {"size": len(kept), "skipped": [x["skipped"] for x in items if "skipped" in x]}
    if kept:
        for name in STACKED:
            if name in kept[0]:
                batch[name] = torch.stack([x[name] for x in kept])
        for name in ("query_key", "support_keys", "query_mask_orig", "orig_size"):
            batch[name] = [x[name] for x in kept]
        if "device_images" in kept[0]:
            batch.update(collate_device_images([x["device_images"] for x in kept]))
    return batch


def collate_device_images(episodes: list[list[dict[str, Tensor]]]) -> dict[str, Tensor]:
    """The images of ``data.augment_on=device`` episodes (query first, then its K supports) as one padded batch.

    Returns ``device_sources`` uint8 ``[N, 3, Hmax, Wmax]`` (each image at the top-left, zeros around it),
    ``device_sizes`` int64 ``[N, 2]`` (h, w), ``device_matrices`` float32 ``[N, 2, 3]``, ``device_frames`` float32 ``[N,
    4]`` and ``device_blur`` bool ``[N]``, with N = B (1 + K): the B queries first, then the supports episode by
    episode, so :class:`fewshot.data.device_augment.DeviceAugment` splits its output with one slice and one view.
    """
    images = [e[0] for e in episodes] + [s for e in episodes for s in e[1:]]
    sizes = torch.tensor([tuple(x["source"].shape[1:]) for x in images], dtype=torch.int64)
    height, width = (int(v) for v in sizes.max(0).values)
    sources = torch.zeros(len(images), 3, height, width, dtype=torch.uint8)
    for out, x in zip(sources, images):
        out[:, :x["source"].shape[1], :x["source"].shape[2]] = x["source"]
    return {"device_sources": sources, "device_sizes": sizes,
            "device_matrices": torch.stack([x["matrix"] for x in images]),
            "device_frames": torch.stack([x["frame"] for x in images]),
            "device_blur": torch.stack([x["blur"] for x in images])}
