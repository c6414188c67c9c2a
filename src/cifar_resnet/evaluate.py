"""Inference over a whole split: mean loss, accuracy and every image's class probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cifar_resnet.loader import EvalLoader


@torch.no_grad()
def evaluate(model, loader: EvalLoader, runtime) -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy, softmax probabilities) over every image of `loader`; the model's mode is restored.
    Per-batch loss sums stay on the device until the end; the float64 total is made on the host (MPS has none)."""
    was_training = model.training
    model.eval()
    batch_losses, probs = [], []
    for x, y in loader:
        with runtime.autocast():
            logits = model(x)
        logits = logits.float()
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
