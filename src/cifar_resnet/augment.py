"""The training augmentation: pad + random crop, horizontal flip, one cutout hole; then normalisation.

Two implementations of one semantics:
- `albumentations_pipeline`: per image, with albumentations (the reference; `augment.backend: albumentations`).
- `BatchAugment`: whole batches with tensor ops on the data's own device (the default: fast on CPU and GPU).
Normalising first and then padding/cropping is the same as the other way round for reflect/replicate padding, and
lets the cutout hole (and constant padding) be exactly the dataset mean, i.e. 0 after normalisation.
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks its version online at import


def albumentations_pipeline(aug, mean, std, seed: int | None = None):
    """Per-image pipeline on HWC uint8 arrays -> normalised float32 HWC arrays."""
    import albumentations as A
    import cv2

    border = {"reflect": cv2.BORDER_REFLECT_101, "constant": cv2.BORDER_CONSTANT,
              "replicate": cv2.BORDER_REPLICATE}[aug.pad_mode]
    size = 32 + 2 * aug.pad
    transforms = [
        A.Normalize(mean=[m / 255 for m in mean], std=[s / 255 for s in std], max_pixel_value=255.0),
        A.PadIfNeeded(min_height=size, min_width=size, border_mode=border, fill=0),
        A.RandomCrop(height=aug.crop, width=aug.crop),
        A.HorizontalFlip(p=aug.flip_p),
    ]
    if aug.cutout:
        transforms.append(A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(aug.cutout, aug.cutout),
                                          hole_width_range=(aug.cutout, aug.cutout), fill=0, p=1.0))
    return A.Compose(transforms, seed=seed)


def _pad_index(pad: int, mode: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Source row (or column) of every row of the padded 32 + 2*pad image, and whether it is real (not fill)."""
    pos = torch.arange(-pad, 32 + pad, device=device)
    if mode == "reflect":  # like cv2.BORDER_REFLECT_101 and torch's 'reflect': no edge repeat
        src = pos.abs()
        src = torch.where(src > 31, 62 - src, src)
    else:
        src = pos.clamp(0, 31)
    valid = torch.ones_like(pos, dtype=torch.bool) if mode != "constant" else (pos >= 0) & (pos <= 31)
    return src, valid


class BatchAugment:
    """Draws an epoch's augmentation parameters at once from (seed, epoch, rank) and applies them per batch."""

    def __init__(self, aug, mean, std, device):
        self.aug = aug
        self.device = device
        self.src, self.valid = _pad_index(aug.pad, aug.pad_mode, device)
        self.mean, self.std = channel_stats(mean, device), channel_stats(std, device)
        self.window = torch.arange(aug.crop, device=device)

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Crop offsets uniform over the (padded - crop + 1)^2 positions, flips with p = flip_p, one hole each."""
        a = self.aug
        span = 32 + 2 * a.pad - a.crop + 1
        hole_span = a.crop - a.cutout + 1
        host = {"generator": generator, "device": "cpu"}  # drawn on the host: the same numbers on every device
        params = {
            "dy": torch.randint(span, (n,), **host),
            "dx": torch.randint(span, (n,), **host),
            "flip": torch.rand(n, **host) < a.flip_p,
            "hy": torch.randint(hole_span, (n,), **host),
            "hx": torch.randint(hole_span, (n,), **host),
        }
        return {k: v.to(self.device) for k, v in params.items()}

    def __call__(self, images: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """uint8 (B, 3, 32, 32) -> augmented, normalised float32 (B, 3, crop, crop)."""
        rows = p["dy"][:, None] + self.window  # (B, crop) positions in the padded image
        cols = p["dx"][:, None] + self.window
        cols = torch.where(p["flip"][:, None], cols.flip(1), cols)  # flipping the crop = reading it backwards
        b = torch.arange(len(images), device=images.device)[:, None, None]
        out = images[b, :, self.src[rows][:, :, None], self.src[cols][:, None, :]]  # (B, crop, crop, 3)
        out = (out.permute(0, 3, 1, 2).float() - self.mean) / self.std
        keep = self.valid[rows][:, :, None] & self.valid[cols][:, None, :]  # constant padding -> mean (0)
        if self.aug.cutout:
            hole_r = (self.window >= p["hy"][:, None]) & (self.window < p["hy"][:, None] + self.aug.cutout)
            hole_c = (self.window >= p["hx"][:, None]) & (self.window < p["hx"][:, None] + self.aug.cutout)
            keep = keep & ~(hole_r[:, :, None] & hole_c[:, None, :])
        return out * keep[:, None]


def channel_stats(values, device) -> torch.Tensor:
    """Per-channel mean or std (0-255 scale) as a float32 (1, 3, 1, 1) tensor on `device`."""
    return torch.as_tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images -> float32, standardised per channel (mean and std: sequences, or `channel_stats` tensors)."""
    return (images.float() - channel_stats(mean, images.device)) / channel_stats(std, images.device)
