"""The LR range test (Smith) and the rule that picks LRMAX from it.

A fresh model trains on the training split with the LR growing exponentially from `start_lr` to `end_lr` over
`num_iter` batches; the loss is smoothed with a bias-corrected EMA. The test stops early when the smoothed loss
exceeds `divergence` times its minimum (or is not finite): that is its normal end.

Pick rule: LRMAX = (LR at the minimum of the smoothed loss) / `divisor` (default 1). This is Smith's rule for the
1cycle policy: the largest LR at which the loss still falls. The minimum of the smoothed curve is robust to the early
noise that fools the raw steepest-gradient point; the EMA (beta 0.98, as in fastai's lr_find) lags the raw loss, which
places the pick near the end of the falling stretch rather than at a single noisy dip. On the full data set this
picks about 0.43, next to the 0.4 that Page's cifar10-fast uses for a mean loss. LRMIN = LRMAX * `lr_min_factor`.
A minimum in the first or last tenth of the iterations run means the range did not bracket the useful LRs: then
there is no pick (never one at the range's edge). The stage still writes the curve and its PNG, and its JSON says
why under `no_pick` with `lr_max: null`; the train stage fails on it only when `lr_max` is `auto`, naming that
reason. A set that pins `lr_max` to a number (the tricks' whitening and frozen BatchNorm scales, whose curves keep
falling or pick a collapsing LR; README, "Tricks") trains without a pick.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from cifar_resnet.errors import CifarResnetError
from cifar_resnet.loader import TrainLoader
from cifar_resnet.model import build_model, fit_whitening
from cifar_resnet.step import make_optimizer, make_scaler, train_step

RULE = "lr_max = lr_at_min_smoothed_loss / divisor; lr_min = lr_max * lr_min_factor"


class RangeTestError(CifarResnetError):
    """The range test could not bracket a sensible LRMAX."""


def lr_at(i: int, start_lr: float, end_lr: float, num_iter: int) -> float:
    return start_lr * (end_lr / start_lr) ** (i / (num_iter - 1))


def pick_lr_max(lrs: list[float], smoothed: list[float], divisor: float, stopped_early: bool) -> tuple[float, int]:
    """(LRMAX, index of the smoothed-loss minimum), or RangeTestError when the minimum sits at an edge or the test
    diverged before it had a curve to read."""
    if len(smoothed) < 10:
        raise RangeTestError(f"lr_range_test: diverged after {len(smoothed)} iterations, before any minimum: "
                             "lower lr_range_test.start_lr")
    best = min(range(len(smoothed)), key=smoothed.__getitem__)
    edge = max(1, len(smoothed) // 10)
    if best < edge:
        raise RangeTestError(
            f"lr_range_test: the smoothed loss was lowest at LR {lrs[best]:.3g}, in the first tenth of the range "
            f"(of {len(smoothed)} iterations): lower lr_range_test.start_lr or check the data")
    if best >= len(smoothed) - edge and not stopped_early:
        raise RangeTestError(
            f"lr_range_test: the smoothed loss was still falling at the end of the range (LR {lrs[best]:.3g}): "
            "raise lr_range_test.end_lr or num_iter")
    return lrs[best] / divisor, best


def run_range_test(params, data, mean, std, runtime, log=print, progress: bool = True) -> dict:
    """Train a fresh model with an exponentially growing LR; pick LRMAX from the smoothed loss curve (or say why
    there is no pick: `pick_result`)."""
    test, train_params = params.lr_range_test, params.train
    torch.manual_seed(params.seed)
    with torch.device("cpu"):  # as in training: weights drawn on the host, whitening fitted on the training split
        model = build_model(params.model)
        fit_whitening(model, data.train_images, mean, std)
    model = model.to(runtime.device, memory_format=runtime.memory_format).train()
    optimizer, scaler = make_optimizer(model, train_params), make_scaler(runtime)
    loader = TrainLoader(data.train_images, data.train_labels, train_params.batch_size, mean, std, runtime.device,
                         aug=params.augment, seed=params.seed, memory_format=runtime.memory_format)
    if len(loader) == 0:
        raise RangeTestError(f"lr_range_test: train.batch_size {train_params.batch_size} exceeds the "
                             f"{len(data.train_images)} training images")
    lrs, losses, smoothed = [], [], []
    avg, best, stopped_early, i, epoch = 0.0, math.inf, False, 0, 0
    bar = tqdm(total=test.num_iter, desc="lr range test", leave=False, disable=not progress)
    while i < test.num_iter and not stopped_early:
        epoch += 1
        for x, y in loader.epoch(epoch):
            if i >= test.num_iter:
                break
            lr = lr_at(i, test.start_lr, test.end_lr, test.num_iter)
            loss, _ = train_step(model, optimizer, scaler, runtime, x, y, lr,
                                 label_smoothing=train_params.label_smoothing)
            value = loss.item()  # the curve is read on the host anyway: one sync per step is the test's nature
            if not math.isfinite(value):
                stopped_early = True
                break
            avg = test.smoothing * avg + (1 - test.smoothing) * value
            debiased = avg / (1 - test.smoothing ** (i + 1))
            lrs.append(lr), losses.append(value), smoothed.append(debiased)
            best = min(best, debiased)
            i += 1
            bar.update(1)
            bar.set_postfix(lr=f"{lr:.3g}", loss=f"{debiased:.3f}", refresh=False)
            if debiased > test.divergence * best:
                stopped_early = True
                break
    bar.close()
    result = pick_result(lrs, smoothed, test.divisor, params.lr_min_factor, stopped_early, log)
    curve = [{"iteration": k + 1, "lr": round(lrs[k], 8), "loss": round(losses[k], 6),
              "smoothed_loss": round(smoothed[k], 6)} for k in range(len(lrs))]
    return {**result, "curve": curve}


def pick_result(lrs: list[float], smoothed: list[float], divisor: float, lr_min_factor: float, stopped_early: bool,
                log=print) -> dict:
    """The stage's JSON without the curve: the pick, or `lr_max: null` and why there is none under `no_pick`."""
    rule = RULE.replace("divisor", f"{divisor:g}").replace("lr_min_factor", f"{lr_min_factor:g}")
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__) if smoothed else None
    common = {"lr_at_min_loss": None if lowest is None else round(lrs[lowest], 6),
              "min_smoothed_loss": None if lowest is None else round(smoothed[lowest], 6),
              "rule": rule, "iterations": len(lrs), "stopped_on_divergence": stopped_early}
    try:
        lr_max, _ = pick_lr_max(lrs, smoothed, divisor, stopped_early)
    except RangeTestError as error:
        log(f"lr range test: {len(lrs)} iterations, NO LRMAX PICKED: {error}. Training with lr_max: auto will fail; "
            "a number in lr_max trains without the pick")
        return {"lr_max": None, "lr_min": None, **common, "no_pick": str(error)}
    log(f"lr range test: {len(lrs)} iterations, smoothed loss lowest at LR {lrs[lowest]:.4g}, "
        f"LRMAX = {lr_max:.4g}{' (stopped on divergence)' if stopped_early else ''}")
    return {"lr_max": round(lr_max, 6), "lr_min": round(lr_max * lr_min_factor, 8), **common}
