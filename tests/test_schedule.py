"""One Cycle LR without annihilation: LRMIN -> LRMAX at the last step of peak_epoch -> LRMIN at the last step.

The table comes from torch's OneCycleLR, whose linear interpolation rounds differently from a hand-written one: the
values are checked to 1e-12 relative, and the bounds exactly."""

import pytest

from cifar_resnet.schedule import OneCycle

LR_MAX = 0.43
LR_MIN = LR_MAX * 0.01  # params.yaml: lr_min_factor 0.01
EPOCHS, PEAK_EPOCH, STEPS = 24, 5, 97
TOTAL, PEAK = EPOCHS * STEPS, PEAK_EPOCH * STEPS - 1  # 2328 steps; step 484 is the last of epoch 5


@pytest.fixture
def sched():
    return OneCycle.for_run(LR_MIN, LR_MAX, epochs=EPOCHS, peak_epoch=PEAK_EPOCH, steps_per_epoch=STEPS)


def test_shape_of_the_run(sched):
    assert sched.total_steps == TOTAL == 2328
    assert sched.peak_step == PEAK == 484


def test_values_at_the_three_corners(sched):
    assert sched(0) == pytest.approx(LR_MIN, rel=1e-12)
    assert sched(PEAK) == pytest.approx(LR_MAX, rel=1e-12)
    assert sched(TOTAL - 1) == pytest.approx(LR_MIN, rel=1e-12)


def test_peak_is_the_last_step_of_the_peak_epoch(sched):
    assert sched(PEAK - 1) < LR_MAX and sched(PEAK + 1) < LR_MAX  # the first step of epoch 6 already falls
    assert max(range(TOTAL), key=sched) == PEAK


def test_linear_rise_and_fall(sched):
    rise = (LR_MAX - LR_MIN) / PEAK
    fall = (LR_MAX - LR_MIN) / (TOTAL - 1 - PEAK)
    for step in (1, 100, 242, PEAK - 1):
        assert sched(step) == pytest.approx(LR_MIN + rise * step, rel=1e-12)
    for step in (PEAK + 1, 1000, TOTAL - 2):
        assert sched(step) == pytest.approx(LR_MAX - fall * (step - PEAK), rel=1e-12)
    # midpoints: half-way up and half-way down are half-way between LRMIN and LRMAX
    assert PEAK % 2 == 0 and (TOTAL - 1 - PEAK) % 2 == 1
    mid = (LR_MIN + LR_MAX) / 2
    assert sched(PEAK // 2) == pytest.approx(mid, rel=1e-12)
    assert (sched(PEAK + (TOTAL - 1 - PEAK) // 2) + sched(PEAK + (TOTAL - 1 - PEAK) // 2 + 1)) / 2 == pytest.approx(
        mid, rel=1e-12)
    # constant differences within each phase
    ups = {round(sched(s + 1) - sched(s), 12) for s in range(PEAK)}
    downs = {round(sched(s + 1) - sched(s), 12) for s in range(PEAK, TOTAL - 2)}  # the last step may be clamped
    assert ups == {round(rise, 12)} and downs == {round(-fall, 12)}


def test_never_below_lr_min_nor_above_lr_max(sched):
    lrs = [sched(s) for s in range(TOTAL)]
    assert min(lrs) == pytest.approx(LR_MIN, rel=1e-12) and max(lrs) == pytest.approx(LR_MAX, rel=1e-12)
    assert all(LR_MIN <= lr <= LR_MAX for lr in lrs)
    # only the first and the last step at LRMIN: no annihilation phase
    assert [s for s, lr in enumerate(lrs) if lr == pytest.approx(LR_MIN, rel=1e-9)] == [0, TOTAL - 1]


@pytest.mark.parametrize("step", [-1, TOTAL, TOTAL + 5])
def test_index_error_outside_the_run(sched, step):
    with pytest.raises(IndexError):
        sched(step)


def test_tiny_schedule():
    s = OneCycle.for_run(0.1, 1.0, epochs=2, peak_epoch=1, steps_per_epoch=2)
    assert (s.total_steps, s.peak_step) == (4, 1)
    assert [s(0), s(1), s(3)] == pytest.approx([0.1, 1.0, 0.1], rel=1e-12)
    assert s(2) == pytest.approx(0.55, rel=1e-12)  # half-way down the two-step fall
    with pytest.raises(IndexError):
        s(4)


def test_single_step_rise():
    """steps_per_epoch=1, peak_epoch=1: the peak is step 0 itself (no division by zero)."""
    s = OneCycle.for_run(0.01, 0.5, epochs=3, peak_epoch=1, steps_per_epoch=1)
    assert s.peak_step == 0
    assert [s(i) for i in range(3)] == pytest.approx([0.5, 0.255, 0.01], rel=1e-12)


@pytest.mark.parametrize("lr_max,factor", [(0.4, 0.01), (0.1, 0.05), (1.234567, 0.01), (0.3, 0.1)])
def test_corners_for_other_lrs(lr_max, factor):
    s = OneCycle.for_run(lr_max * factor, lr_max, epochs=EPOCHS, peak_epoch=PEAK_EPOCH, steps_per_epoch=STEPS)
    assert [s(0), s(TOTAL - 1)] == pytest.approx([lr_max * factor] * 2, rel=1e-12)
    assert s(PEAK) == pytest.approx(lr_max, rel=1e-12)


def _reference(lr_min, lr_max, total, peak, step):
    """The recipe written out: linear from LRMIN at step 0 to LRMAX at `peak`, then to LRMIN at the last step."""
    frac = (step / peak if peak else 1.0) if step <= peak else (total - 1 - step) / (total - 1 - peak)
    return (1 - frac) * lr_min + frac * lr_max


@pytest.mark.parametrize("epochs,peak_epoch,steps", [(EPOCHS, PEAK_EPOCH, STEPS), (EPOCHS, 0, STEPS), (1, 0, 7),
                                                     (3, 1, 1), (2, 1, 2), (4, 3, 5)])
def test_the_table_follows_the_recipe_within_rounding(epochs, peak_epoch, steps):
    """Every step of torch's OneCycleLR table against the recipe, momentum (0.95 -> 0.85 -> 0.95) included."""
    s = OneCycle.for_run(LR_MIN, LR_MAX, epochs=epochs, peak_epoch=peak_epoch, steps_per_epoch=steps)
    total, peak = epochs * steps, max(peak_epoch * steps - 1, 0)
    assert (s.total_steps, s.peak_step) == (total, peak)
    for step in range(total):
        lr = _reference(LR_MIN, LR_MAX, total, peak, step)
        assert s(step) == pytest.approx(lr, rel=1e-12, abs=1e-15)
        assert s.momentum(step) == pytest.approx(0.95 - 0.1 * (lr - LR_MIN) / (LR_MAX - LR_MIN), rel=1e-12)
