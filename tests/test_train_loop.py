"""The divergence watch: the first bad step is named even when the watch is read only every few steps."""

import math

import pytest
import torch

from cifar_resnet.errors import DivergedError
from cifar_resnet.schedule import OneCycle
from cifar_resnet.step import DivergenceWatch


def _watch(schedule, every: int) -> DivergenceWatch:
    watch = DivergenceWatch(torch.device("cpu"), max_loss=1000.0, lr_of=schedule, steps_per_epoch=4)
    watch.every = every  # as on an accelerator: read only every `every` steps
    return watch


def _feed(watch, losses):
    for step, value in enumerate(losses):
        watch.update(torch.tensor(value), step)
    watch.check()  # the end of the last epoch


@pytest.mark.parametrize("bad", [math.nan, math.inf, 5e6])
def test_first_bad_step_is_reported_even_when_read_later(bad):
    schedule = OneCycle.for_run(0.01, 1.0, epochs=3, peak_epoch=1, steps_per_epoch=4)
    losses = [2.3, 2.2, 2.1, 2.0, 1.9, 1.8, 1.7, bad, math.nan, 1.0]  # first bad: global step 7
    watch = _watch(schedule, every=5)  # read after steps 5 and 10 only
    with pytest.raises(DivergedError) as info:
        _feed(watch, losses)
    err = info.value
    assert (err.epoch, err.step) == (2, 4) and err.lr == pytest.approx(schedule(7))
    assert "epoch 2, step 4 of 4" in str(err) and f"LR {schedule(7):.6g}" in str(err)


def test_the_watch_reads_on_its_interval():
    schedule = OneCycle.for_run(0.01, 1.0, epochs=3, peak_epoch=1, steps_per_epoch=4)
    watch = _watch(schedule, every=5)
    for step in range(4):
        watch.update(torch.tensor(math.nan if step == 1 else 2.0), step)  # not read yet
    with pytest.raises(DivergedError):
        watch.update(torch.tensor(2.0), 4)  # the fifth step reads it


def test_healthy_losses_pass():
    schedule = OneCycle.for_run(0.01, 1.0, epochs=3, peak_epoch=1, steps_per_epoch=4)
    _feed(_watch(schedule, every=1), [2.3] * 12)


def test_the_watch_reads_every_step_on_the_cpu_and_every_20_elsewhere():
    assert DivergenceWatch(torch.device("cpu"), 1000.0, lambda s: 0.1, 4).every == 1
    assert DivergenceWatch(torch.device("meta"), 1000.0, lambda s: 0.1, 4).every == 20
