"""Figures (matplotlib, PNG): the range test, the training curves, the LR schedule and the misclassification gallery.

PNGs render anywhere, unlike `dvc plots show` HTML, which loads its chart library from a CDN.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cifar_resnet.atomic import atomic_path  # noqa: E402

_META = {"Software": None}  # no version stamp: the same run draws the same bytes


def _save(fig, path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight", metadata=_META)
    plt.close(fig)


def lr_range_figure(path, curve: list[dict], result: dict) -> None:
    lrs = [p["lr"] for p in curve]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, [p["loss"] for p in curve], alpha=0.3, label="loss")
    ax.plot(lrs, [p["smoothed_loss"] for p in curve], label="smoothed loss")
    if result["lr_at_climb"] is not None:
        ax.axvline(result["lr_at_climb"], color="grey", linestyle=":", label=f"climb {result['lr_at_climb']:.3g}")
    if result["lr_max"] is not None:
        ax.axvline(result["lr_max"], color="red", linestyle="--", label=f"LRMAX {result['lr_max']:.3g}")
        ax.axvline(result["lr_min"], color="green", linestyle="--", label=f"LRMIN {result['lr_min']:.3g}")
    title = f"LR range test ({result['rule']})" if result["lr_max"] is not None else \
        f"LR range test: no LRMAX picked ({result['no_pick'].removeprefix('lr_range_test: ')})"
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title=title)
    ax.title.set_fontsize(8)
    ax.legend()
    _save(fig, path)


def curves_figure(path, history: list[dict]) -> None:
    epochs = [r["epoch"] for r in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for split in ("train", "val", "test"):
        if f"{split}_loss" in history[0]:
            loss_ax.plot(epochs, [r[f"{split}_loss"] for r in history], marker=".", label=split)
            acc_ax.plot(epochs, [r[f"{split}_acc"] for r in history], marker=".", label=split)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    final = history[-1].get("test_acc")
    if final is not None:
        acc_ax.annotate(f"{final:.2%}", (epochs[-1], final), textcoords="offset points", xytext=(-30, -15))
    _save(fig, path)


def schedule_figure(path, lrs: list[float], steps_per_epoch: int) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(np.arange(1, len(lrs) + 1) / steps_per_epoch, lrs)
    ax.set(xlabel="epoch", ylabel="learning rate", title=f"One Cycle: {lrs[0]:.3g} -> {max(lrs):.3g} -> {lrs[-1]:.3g}")
    ax.grid(alpha=0.3)
    _save(fig, path)


def gallery_figure(path, images: np.ndarray, true: np.ndarray, pred: np.ndarray, confidence: np.ndarray,
                   classes, columns: int) -> None:
    """images: uint8 (N, 3, 32, 32), the misclassified ones to show."""
    n = len(images)
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.9, rows * 2.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, im, t, p, c in zip(axes.flat, images, true, pred, confidence):
        ax.imshow(np.transpose(im, (1, 2, 0)), interpolation="nearest")
        ax.set_title(f"true: {classes[t]}\npred: {classes[p]} ({c:.0%})", fontsize=8)
    fig.suptitle(f"Most confident mistakes ({n} shown)")
    _save(fig, path)
