"""Inference over a whole split: mean loss, accuracy and every image's class probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cifar_resnet.loader import EvalLoader


@torch.no_grad()
def evaluate(model, loader: EvalLoader, runtime) -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy, softmax probabilities) over every image of `loader`; the model's mode is restored."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    probs = []
    for x, y in loader:
        with runtime.autocast():
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        probs.append(torch.softmax(logits, dim=1))
    model.train(was_training)
    probs = torch.cat(probs)
    correct = (probs.argmax(1) == loader.labels).sum()
    n = len(loader.labels)
    return (loss_sum / n).item(), (correct.double() / n).item(), probs
