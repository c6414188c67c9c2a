"""Pieces of the training loop that the stage tests cannot pin: the divergence watch read every N steps."""

import math

import pytest
import torch

from cifar_resnet.errors import DivergedError
from cifar_resnet.schedule import OneCycle
from cifar_resnet.train import DivergenceWatch, Dist


def _feed(watch, losses, schedule, steps_per_epoch):
    for step, value in enumerate(losses):
        watch.update(torch.tensor(value), step)
        if (step + 1) % watch.every == 0:
            watch.check(schedule, steps_per_epoch, Dist())
    watch.check(schedule, steps_per_epoch, Dist())


@pytest.mark.parametrize("bad", [math.nan, math.inf, 5e6])
def test_first_bad_step_is_reported_even_when_read_later(bad):
    schedule = OneCycle.for_run(0.01, 1.0, epochs=3, peak_epoch=1, steps_per_epoch=4)
    losses = [2.3, 2.2, 2.1, 2.0, 1.9, 1.8, 1.7, bad, math.nan, 1.0]  # first bad: global step 7
    watch = DivergenceWatch(torch.device("cpu"), every=5, max_loss=1000.0)  # read at steps 5 and 10 only
    with pytest.raises(DivergedError) as info:
        _feed(watch, losses, schedule, steps_per_epoch=4)
    err = info.value
    assert (err.epoch, err.step) == (2, 4) and err.lr == pytest.approx(schedule(7))
    assert "epoch 2, step 4 of 4" in str(err) and f"LR {schedule(7):.6g}" in str(err)


def test_healthy_losses_pass():
    schedule = OneCycle.for_run(0.01, 1.0, epochs=3, peak_epoch=1, steps_per_epoch=4)
    _feed(DivergenceWatch(torch.device("cpu"), every=1, max_loss=1000.0), [2.3] * 12, schedule, 4)
