"""The LR range test (Smith) and the rule that picks LRMAX from it.

A fresh model trains on the training split with the LR growing exponentially from `start_lr` to `end_lr` over
`num_iter` batches, one batch per LR. The loss is smoothed by a centred rolling median of `window` batches: it has no
lag and ignores a one-batch spike.

Pick rule: LRMAX = (the LR where the smoothed loss climbs above RISE x its lowest value so far) / `divisor`; LRMIN =
LRMAX x `lr_min_factor`. This network's curve falls from the untrained net's loss (ln 10) to a flat, ragged valley
near LR 0.1 and then rises: at LR 0.4-0.8 training undoes what it learned. Where the rise ends is not a mark: past it
BatchNorm lets the loss fall again (at LR 3-10 huge steps grow the weights, which BN divides out), and on 3 of 16
seeds on an H100 it peaked at 2.2-2.5, near chance, never above 1.1 x its start (the previous rule's mark, README
"Results"). Its rise above the valley is the mark on every curve measured (21: seeds 0-15 on the H100, 0-4 on a CPU):
+25 % above the lowest smoothed loss at LR 0.38-0.77, median 0.55. `divisor` sets LRMAX below it, as Smith advises.

The sweep stops once the climb's median window is whole, or on a loss that is not finite, which counts as the climb.
Its JSON says which under `stopped`: "climb", "not_finite" or "end_of_sweep" (num_iter batches without either).
A climb in the first tenth of the sweep, or none, is no pick: the stage still writes the curve and its PNG, and its
JSON says why under `no_pick` with `lr_max: null`; the train stage fails on it only when `lr_max` is `auto`, naming
that reason. A set that pins `lr_max` to a number (the tricks, README "Tricks") trains without a pick.
"""

from __future__ import annotations

import math

import pandas as pd
from tqdm import tqdm

from cifar_resnet.errors import CifarResnetError
from cifar_resnet.step import setup_run, train_step

# 25 % above the lowest smoothed loss so far: the valley's ragged bumps reached +19 % on the 21 curves measured, the
# rise after it passes +33 % on every one (2.2-3.8 over a floor of 1.62-1.72)
RISE = 1.25
RULE = f"lr_max = lr_where_loss_climbs_above_{RISE:g}x_its_lowest / divisor; lr_min = lr_max * lr_min_factor"


class RangeTestError(CifarResnetError):
    """The range test could not bracket a sensible LRMAX."""


def lr_at(i: int, start_lr: float, end_lr: float, num_iter: int) -> float:
    return start_lr * (end_lr / start_lr) ** (i / (num_iter - 1))


def smooth(losses: list[float], window: int) -> list[float]:
    """Centred rolling median (shorter windows at the ends)."""
    return pd.Series(losses, dtype=float).rolling(window, center=True, min_periods=1).median().tolist()


def climb_index(losses: list[float], window: int) -> int | None:
    """The first index where the smoothed loss is above RISE x the lowest smoothed loss before it."""
    lowest = math.inf
    for i, value in enumerate(smooth(losses, window)):
        lowest = min(lowest, value)
        if value > RISE * lowest:
            return i
    return None


def lowest_before(losses: list[float], window: int, end: int | None) -> float | None:
    """The lowest smoothed loss up to index `end` (the whole curve when None): what the climb is measured from."""
    smoothed = smooth(losses, window)[:None if end is None else end + 1]
    return min(smoothed) if smoothed else None


def climbed(losses: list[float], window: int) -> bool:
    """The sweep can stop: the climb is found and its median window is whole."""
    i = climb_index(losses, window)
    return i is not None and i + window // 2 < len(losses)


def pick_lr_max(lrs: list[float], losses: list[float], test, blew_up: bool) -> tuple[float, int]:
    """(LRMAX, index of the climb), or RangeTestError saying why there is none. `test`: the lr_range_test params;
    `blew_up`: the sweep ended on a loss that was not finite, just past the last of `losses`."""
    i = climb_index(losses, test.window) if losses else None
    if i is None and blew_up:
        i = len(losses) - 1  # the last finite loss, at the LR before the one that blew up
    if i is None:
        raise RangeTestError(
            f"lr_range_test: the smoothed loss never climbed above {RISE:g} x its lowest so far "
            f"({lowest_before(losses, test.window, None):.3g}) by LR "
            f"{lrs[-1]:.3g}: raise lr_range_test.end_lr or num_iter")
    if i < max(1, test.num_iter // 10):
        what = (f"the loss was not finite after {len(losses)} iterations" if blew_up else
                f"the smoothed loss climbed above {RISE:g} x its lowest so far "
                f"({lowest_before(losses, test.window, i):.3g}) at LR {lrs[i]:.3g}")
        raise RangeTestError(f"lr_range_test: {what}, in the first tenth of the sweep: lower lr_range_test.start_lr "
                             "or check the data")
    return lrs[i] / test.divisor, i


def run_range_test(params, data, mean, std, runtime, log=print, progress: bool = True) -> dict:
    """Train a fresh model with an exponentially growing LR; pick LRMAX from the loss curve (or say why there is no
    pick: `pick_result`)."""
    test, train_params = params.lr_range_test, params.train
    run = setup_run(params, data, mean, std, runtime)  # as in training: the same model, loader and optimizer
    model = run.model.train()
    lrs, losses, stopped, epoch = [], [], None, 0
    bar = tqdm(total=test.num_iter, desc="lr range test", leave=False, disable=not progress)
    while stopped is None:
        epoch += 1
        for x, y in run.loader.epoch(epoch):
            lr = lr_at(len(losses), test.start_lr, test.end_lr, test.num_iter)
            loss, _ = train_step(model, run.optimizer, run.scaler, runtime, x, y, lr,
                                 label_smoothing=train_params.label_smoothing)
            value = loss.item()  # the curve is read on the host anyway: one sync per step is the test's nature
            stopped = why_stop(losses, value, test)
            if stopped != "not_finite":
                lrs.append(lr), losses.append(value)
                bar.update(1)
                bar.set_postfix(lr=f"{lr:.3g}", loss=f"{value:.3f}", refresh=False)
            if stopped is not None:
                break
    bar.close()
    result = pick_result(lrs, losses, test, params.lr_min_factor, stopped, log)
    smoothed = smooth(losses, test.window)
    curve = [{"iteration": k + 1, "lr": round(lrs[k], 8), "loss": round(losses[k], 6),
              "smoothed_loss": round(smoothed[k], 6)} for k in range(len(lrs))]
    return {**result, "curve": curve}


def why_stop(losses: list[float], value: float, test) -> str | None:
    """Why the sweep stops at the loss `value` that follows `losses`, or None to go on: "climb" (the climb's median
    window is whole; only with `stop_at_climb`), "not_finite", or "end_of_sweep" (num_iter batches without either).
    The pick is the same either way: the climb's median window is whole when it is found, so later losses cannot move
    it."""
    if not math.isfinite(value):
        return "not_finite"
    if test.stop_at_climb and climbed([*losses, value], test.window):
        return "climb"
    return "end_of_sweep" if len(losses) + 1 == test.num_iter else None


def pick_result(lrs: list[float], losses: list[float], test, lr_min_factor: float, stopped: str,
                log=print) -> dict:
    """The stage's JSON without the curve: the pick, or `lr_max: null` and why there is none under `no_pick`.
    `stopped`: why the sweep ended (`why_stop`)."""
    rule = RULE.replace("divisor", f"{test.divisor:g}").replace("lr_min_factor", f"{lr_min_factor:g}")
    common = {"start_loss": round(losses[0], 6) if losses else None, "lowest_loss": None, "lr_at_climb": None,
              "rule": rule, "iterations": len(lrs), "stopped": stopped}
    try:
        lr_max, i = pick_lr_max(lrs, losses, test, blew_up=stopped == "not_finite")
    except RangeTestError as error:
        log(f"lr range test: {len(lrs)} iterations, NO LRMAX PICKED: {error}. Training with lr_max: auto will fail; "
            "a number in lr_max trains without the pick")
        return {"lr_max": None, "lr_min": None, **common, "no_pick": str(error)}
    lowest = lowest_before(losses, test.window, i)
    log(f"lr range test: {len(lrs)} iterations, the smoothed loss climbed above {RISE:g} x its lowest so far "
        f"({lowest:.3g}) at LR {lrs[i]:.4g}, LRMAX = {lr_max:.4g}")
    return {"lr_max": round(lr_max, 6), "lr_min": round(lr_max * lr_min_factor, 8), **common,
            "lowest_loss": round(lowest, 6), "lr_at_climb": round(lrs[i], 8)}
