"""Inference over a whole split: mean loss, accuracy and every image's class probabilities, with optional
test-time augmentation (TTA: `evaluate.tta`).

- flip: the mean of the logits of the image and of its mirror image.
- flip+translate: also the image shifted by one pixel diagonally each way (reflect-padded), mirrored too
  (airbench's multi-view TTA): 1/2 the unshifted pair, 1/4 each shifted pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cifar_resnet.loader import EvalLoader


@torch.no_grad()
def evaluate(model, loader: EvalLoader, runtime, tta: str = "none") -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy, softmax probabilities) over every image of `loader`; the model's mode is restored.
    Per-batch loss sums stay on the device until the end; the float64 total is made on the host (MPS has none)."""
    was_training = model.training
    model.eval()
    batch_losses, probs = [], []
    for x, y in loader:
        logits = tta_logits(model, x, runtime, tta)
        batch_losses.append(F.cross_entropy(logits, y, reduction="sum"))
        probs.append(torch.softmax(logits, dim=1))
    model.train(was_training)
    probs = torch.cat(probs)
    correct = int((probs.argmax(1) == loader.labels).sum().item())
    loss_sum = 0.0
    for value in torch.stack(batch_losses).cpu().tolist():
        loss_sum += value
    n = len(loader.labels)
    return loss_sum / n, correct / n, probs


def tta_logits(model, x: torch.Tensor, runtime, tta: str = "none") -> torch.Tensor:
    """float32 logits of a normalised batch, averaged over the views `tta` names."""
    def forward(batch):
        with runtime.autocast():
            return model(batch).float()

    def flip_pair(batch):
        return (forward(batch) + forward(batch.flip(3))) / 2 if tta != "none" else forward(batch)

    logits = flip_pair(x)
    if tta == "flip+translate":
        logits = logits / 2 + (flip_pair(translate(x, 1)) + flip_pair(translate(x, -1))) / 4
    return logits


def translate(x: torch.Tensor, shift: int) -> torch.Tensor:
    """The batch moved `shift` pixels down and right (up and left when negative), the border reflected."""
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    start = 1 - shift
    return padded[:, :, start:start + x.shape[2], start:start + x.shape[3]].contiguous(
        memory_format=torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format)
