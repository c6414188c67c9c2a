"""Batches on the device (airbench's CifarLoader idea): the whole split is one uint8 tensor on the device.

- `TrainLoader`: each epoch shuffled by (seed, epoch), the same order on every rank, and augmented by
  (seed, epoch, rank); a rank takes its share of every global batch; the last partial batch is dropped.
- `EvalLoader`: every image once, in order, normalised and not augmented.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from cifar_resnet.augment import BatchAugment, albumentations_pipeline, channel_stats, normalise


def derive_seed(*keys) -> int:
    """A 63-bit seed from any tuple of keys, e.g. (seed, "augment", epoch, rank): no generator state to carry."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class EvalLoader:
    def __init__(self, images, labels, batch_size: int, mean, std, device, memory_format=torch.contiguous_format):
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.mean, self.std, self.device = batch_size, mean, std, device
        self.memory_format = memory_format
        self._mean, self._std = channel_stats(mean, device), channel_stats(std, device)  # made once, not per batch

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.images), self.batch_size):
            x = normalise(self.images[i:i + self.batch_size], self._mean, self._std)
            yield x.contiguous(memory_format=self.memory_format), self.labels[i:i + self.batch_size]


class TrainLoader(EvalLoader):
    def __init__(self, images, labels, batch_size: int, mean, std, device, aug, seed: int, rank: int = 0,
                 world_size: int = 1, memory_format=torch.contiguous_format):
        super().__init__(images, labels, batch_size, mean, std, device, memory_format)
        self.aug, self.seed, self.rank, self.world_size = aug, seed, rank, world_size
        self.share = batch_size // world_size
        self.batch_augment = BatchAugment(aug, mean, std, device) if aug.backend == "batched" else None

    def __len__(self) -> int:
        return len(self.images) // self.batch_size

    def epoch(self, epoch: int):
        """This rank's (images, labels) batches of training epoch `epoch` (1-based)."""
        order_gen = torch.Generator().manual_seed(derive_seed(self.seed, "shuffle", epoch))
        order = torch.randperm(len(self.images), generator=order_gen, device="cpu").to(self.device)
        augment = self._augmenter(epoch)
        bs, share = self.batch_size, self.share
        for i in range(len(self)):
            idx = order[i * bs:(i + 1) * bs][self.rank * share:(self.rank + 1) * share]
            x = augment(i, idx, self.images[idx])
            yield x.contiguous(memory_format=self.memory_format), self.labels[idx]

    def _augmenter(self, epoch: int):
        """A function (batch index, uint8 images) -> augmented, normalised images, for this epoch and rank."""
        seed = derive_seed(self.seed, "augment", epoch, self.rank)
        if self.batch_augment is not None:
            drawn = self.batch_augment.draw(len(self) * self.share, torch.Generator().manual_seed(seed))
            flips = self._alternate_flips(epoch) if self.aug.flip == "alternate" else None
            share = self.share

            def batched(i, idx, images):
                batch = {k: v[i * share:(i + 1) * share] for k, v in drawn.items()}
                if flips is not None:
                    batch["flip"] = flips[idx]
                return self.batch_augment(images, batch)

            return batched
        pipeline = albumentations_pipeline(self.aug, self.mean, self.std, seed=seed % 2**32)

        def per_image(_i, _idx, images):
            hwc = images.permute(0, 2, 3, 1).cpu().numpy()
            x = torch.from_numpy(np.stack([pipeline(image=im)["image"] for im in hwc]))
            return x.permute(0, 3, 1, 2).to(self.device)

        return per_image

    def _alternate_flips(self, epoch: int) -> torch.Tensor:
        """Alternating flip (airbench): each image's flip is drawn once (p = flip_p) and inverted every other
        epoch, so over two epochs every image is seen both ways."""
        base = torch.rand(len(self.images), generator=torch.Generator().manual_seed(derive_seed(self.seed, "flip")),
                          device="cpu") < self.aug.flip_p
        return (base ^ (epoch % 2 == 0)).to(self.device)
