"""The LR range test: the exponential LR sweep, the climb rule and a tiny real run on the CPU."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from cifar_resnet.config import LrRangeTestParams, parse_params
from cifar_resnet.data import Cifar10
from cifar_resnet.errors import ParamsError
import cifar_resnet.lr_finder as lr_finder
from cifar_resnet.lr_finder import (RISE, RULE, RangeTestError, climb_index, climbed, lr_at, pick_lr_max,
                                        pick_result, run_range_test, smooth)
from cifar_resnet.runtime import pick_runtime

N = 100
LRS = [lr_at(i, 1e-4, 10.0, N) for i in range(N)]


pytestmark = pytest.mark.usefixtures("one_thread")


def ema(losses, beta=0.98):
    """The bias-corrected EMA that the previous rule took the minimum of (fastai's lr_find smoothing)."""
    avg, out = 0.0, []
    for i, value in enumerate(losses):
        avg = beta * avg + (1 - beta) * value
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def range_params(**knobs) -> LrRangeTestParams:
    return LrRangeTestParams(**{"window": 5, "divisor": 1.0, "num_iter": N, **knobs})


def real_shape(climb: int = 77, peak: float = 2.9):
    """The shape of this network's curve (plots/lr_range_test.tsv of seeds 0-15 on an H100): ln 10 at the start, a
    fall to a ragged valley near LR 0.1, a climb to `peak` within a few batches at `climb` (LR ~0.7), then
    BatchNorm's second fall at LR 3-10, lower than the valley."""
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.01, N)
    curve = []
    for i in range(N):
        if i < 60:
            curve.append(2.3 - 0.7 * (i / 60) ** 2)  # falls to 1.6
        elif i < climb:
            curve.append(1.6 + (0.25 if i % 3 == 0 else 0.0))  # ragged: one batch in three jumps
        elif i < climb + 5:
            curve.append(peak)  # the climb, from one batch to the next
        else:
            curve.append(1.2)  # the second fall, below the valley
    return list(np.array(curve) + noise)


# ------------------------------------------------------------------------------------------------------- lr_at


def test_lr_at_is_exponential_from_start_to_end():
    assert lr_at(0, 1e-4, 10.0, 100) == 1e-4
    assert lr_at(99, 1e-4, 10.0, 100) == pytest.approx(10.0, rel=1e-12)
    ratio = 10.0 / 1e-4
    for i in (1, 33, 50, 98):
        assert lr_at(i, 1e-4, 10.0, 100) == pytest.approx(1e-4 * ratio ** (i / 99), rel=1e-12)
    # a constant factor per step: equally spaced in log LR
    steps = np.diff(np.log(LRS))
    assert np.allclose(steps, math.log(ratio) / 99, rtol=1e-9)
    assert all(b > a for a, b in zip(LRS, LRS[1:]))
    # the geometric middle of an odd sweep is the geometric mean of its ends
    assert lr_at(5, 0.01, 1.0, 11) == pytest.approx(0.1, rel=1e-12)


# ------------------------------------------------------------------------------------------------- the pick rule


def test_smooth_is_a_centred_median_without_lag():
    step = [2.0] * 50 + [1.0] * 50
    assert smooth(step, 5) == step  # an EMA would still be above 1.0 tens of batches later
    spiky = [2.0] * 20
    spiky[10] = 9.0
    assert smooth(spiky, 5) == [2.0] * 20  # one batch does not move a median
    assert smooth([3.0, 1.0, 2.0, 5.0], 3) == [2.0, 2.0, 2.0, 3.5]  # shorter windows at the ends


def test_the_climb_is_the_first_smoothed_loss_above_rise_times_its_lowest_so_far():
    assert RISE == 1.25
    assert climb_index([2.0, 2.1, 2.2, 2.4, 2.45], 1) is None  # noise, however long, below 1.25 x 2.0
    assert climb_index([2.0, 1.5, 1.4, 1.7, 1.8, 2.6], 1) == 4  # 1.8 > 1.25 x 1.4 = 1.75 is the first above
    assert climb_index([2.0, 1.5, 1.4, 1.3, 1.2, 1.1], 1) is None  # falling: the lowest moves down with it
    assert climb_index([2.0, 1.5, 1.4, 9.0, 1.3, 1.3], 3) is None  # one batch: the median ignores it
    assert climb_index([2.0, 1.5, 1.4, 9.0, 9.0, 1.3], 3) == 3


@pytest.mark.parametrize("divisor", [1.0, 2.0])
def test_pick_is_the_lr_of_the_climb_over_divisor(divisor):
    lr_max, i = pick_lr_max(LRS, real_shape(climb=77), range_params(divisor=divisor), blew_up=False)
    assert i == 77 and lr_max == LRS[77] / divisor


def test_the_second_fall_and_the_ragged_valley_do_not_move_the_pick():
    """What broke the previous rule: the lowest loss of the sweep lies past the climb, and the EMA's lag carries its
    minimum to the end of the sweep ("still falling": seed 1 on the H100)."""
    losses = real_shape(climb=77)
    assert int(np.argmin(losses)) > 77 and int(np.argmin(ema(losses))) == N - 1
    for window in (3, 5, 7):
        assert pick_lr_max(LRS, losses, range_params(window=window), False)[1] == 77
    assert pick_lr_max(LRS, real_shape(climb=70), range_params(), False)[1] == 70


def test_a_climb_that_stays_below_the_start_is_a_pick():
    """Seeds 3, 8 and 11 on the H100: past the valley (1.6-1.7) the loss rose only to 2.2-2.5, near chance (ln 10),
    never above 1.1 x its start (the previous rule's mark: no pick, and `dvc repro` failed at the train stage)."""
    losses = real_shape(climb=77, peak=2.35)
    assert max(smooth(losses, 5)) < 1.1 * losses[0]
    assert pick_lr_max(LRS, losses, range_params(), False)[1] == 77


def test_no_climb_or_one_in_the_first_tenth_is_no_pick_and_says_why():
    falling = [2.3 - 0.01 * i for i in range(N)]
    with pytest.raises(RangeTestError, match=r"never climbed above 1.25 x its lowest so far \(1.32\) by LR 10: raise"):
        pick_lr_max(LRS, falling, range_params(), blew_up=False)
    early = [2.3] * 5 + [3.0] * (N - 5)
    with pytest.raises(RangeTestError,
                       match=r"climbed above 1.25 x its lowest so far \(2.3\) at LR 0.000179, in the first tenth"):
        pick_lr_max(LRS, early, range_params(), blew_up=False)
    assert pick_lr_max(LRS, [2.3] * 12 + [3.0] * (N - 12), range_params(), False)[1] == 12  # 10 is the edge


def test_a_loss_that_is_not_finite_ends_the_sweep_at_the_last_finite_lr():
    falling = [2.3 - 0.01 * i for i in range(60)]  # then the 61st loss was not finite
    assert pick_lr_max(LRS[:60], falling, range_params(divisor=2.0), blew_up=True) == (LRS[59] / 2, 59)
    with pytest.raises(RangeTestError, match="the loss was not finite after 5 iterations, in the first tenth"):
        pick_lr_max(LRS[:5], [2.3] * 5, range_params(), blew_up=True)
    with pytest.raises(RangeTestError, match="the loss was not finite after 0 iterations, in the first tenth"):
        pick_lr_max([], [], range_params(), blew_up=True)


def test_the_sweep_stops_once_the_climbs_window_is_whole():
    losses = real_shape(climb=77)
    assert not any(climbed(losses[:n], 5) for n in range(1, 80))  # the climb at 77 needs losses 78 and 79
    assert climbed(losses[:80], 5)
    assert climbed(losses[:79], 3) and not climbed(losses[:78], 3)


# -------------------------------------------------------------------------------------------- run_range_test


def tiny_data(n: int = 1024, seed: int = 0) -> Cifar10:
    """Random uint8 images whose class sets a per-channel brightness: learnable in a few batches."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    colours = torch.rand(10, 3, 1, 1, generator=g) * 200 + 20
    images = (colours[labels] + torch.randn(n, 3, 32, 32, generator=g) * 30).clamp(0, 255).to(torch.uint8)
    empty, no_labels = torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    return Cifar10(images, labels, empty, no_labels, empty, no_labels, tuple("abcdefghij"))


def tiny_params(**range_test):
    return parse_params({
        "lr_min_factor": 0.05,
        "model": {"channels": [8, 16, 32, 64]},
        # end_lr 1000 makes the loss climb well above its lowest inside the sweep
        "lr_range_test": {"start_lr": 1e-4, "end_lr": 1000.0, "num_iter": 25, "divisor": 2.0, **range_test},
        "train": {"batch_size": 128, "device": "cpu", "precision": "fp32", "threads": 1},
    })


def test_run_range_test_on_a_tiny_dataset():
    params = tiny_params()
    runtime = pick_runtime(params.train)
    assert runtime.device.type == "cpu" and runtime.precision == "fp32" and not runtime.channels_last
    data = tiny_data()
    mean, std = data.mean_std()
    messages = []
    result = run_range_test(params, data, mean, std, runtime, log=messages.append, progress=False)

    rp = params.lr_range_test
    curve = result["curve"]
    assert result["iterations"] == len(curve) < rp.num_iter  # end_lr 1000: the loss climbs well inside the sweep
    assert [c["iteration"] for c in curve] == list(range(1, len(curve) + 1))
    lrs, losses = [c["lr"] for c in curve], [c["loss"] for c in curve]
    assert lrs == [round(lr_at(i, rp.start_lr, rp.end_lr, rp.num_iter), 8) for i in range(len(lrs))]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[0] == pytest.approx(math.log(10), abs=0.2)  # an untrained 10-way softmax
    assert [c["smoothed_loss"] for c in curve] == pytest.approx(smooth(losses, rp.window), abs=1e-5)
    assert result["start_loss"] == losses[0]
    assert result["lowest_loss"] == pytest.approx(min(smooth(losses, rp.window)[:len(curve) - rp.window // 2]), abs=1e-5)

    climb = lrs.index(result["lr_at_climb"])
    assert climb == climb_index(losses, rp.window)
    assert len(curve) == climb + rp.window // 2 + 1  # stopped as soon as the climb's median window was whole
    assert result["stopped"] == "climb"  # every loss finite: the climb stopped it, not a divergence
    assert result["lr_max"] == pytest.approx(result["lr_at_climb"] / 2.0, rel=1e-5)  # divisor 2
    assert result["lr_min"] == pytest.approx(result["lr_max"] * 0.05, rel=1e-5)  # lr_min_factor
    assert result["rule"] == "lr_max = lr_where_loss_climbs_above_1.25x_its_lowest / 2; lr_min = lr_max * 0.05"
    assert RULE.startswith("lr_max = lr_where_loss_climbs_above_1.25x_its_lowest / divisor")
    assert len(messages) == 1 and "climbed above 1.25 x its lowest so far (" in messages[0]


def test_a_batch_larger_than_the_data_is_the_same_params_error_in_the_range_test_and_in_training():
    """Both runs start from step.setup_run: one error, naming the key to change."""
    from cifar_resnet.train import train

    params = tiny_params()
    data = tiny_data(n=100)
    runtime = pick_runtime(params.train)
    expected = r"^train\.batch_size: 128 is more than the 100 training images; lower it or raise data\.train_limit$"
    with pytest.raises(ParamsError, match=expected):
        run_range_test(params, data, *data.mean_std(), runtime, log=lambda s: None, progress=False)
    with pytest.raises(ParamsError, match=expected):
        train(params, data, *data.mean_std(), 0.1, 0.001, runtime, log=lambda s: None)


def test_run_range_test_diverging_at_once_has_no_pick():
    """A climb at the sweep's start is no pick: the JSON says why (lr_max null), and the test does not fail by
    itself."""
    params = tiny_params(start_lr=1e4, end_lr=1e6)
    data = tiny_data(n=256)
    messages = []
    result = run_range_test(params, data, *data.mean_std(), pick_runtime(params.train), log=messages.append,
                            progress=False)
    assert result["lr_max"] is None and result["lr_min"] is None
    assert result["no_pick"].endswith("in the first tenth of the sweep: lower lr_range_test.start_lr or check the data")
    assert result["stopped"] == "climb" and result["iterations"] == len(result["curve"]) < 10
    assert len(messages) == 1 and "NO LRMAX PICKED" in messages[0] and "first tenth" in messages[0]


FALLING = [2.3 - 0.02 * i for i in range(25)]


@pytest.mark.parametrize("losses,stopped,iterations", [
    (FALLING, "end_of_sweep", 25),  # num_iter batches, no climb
    (FALLING[:12] + [3.0] * 13, "climb", 15),  # every loss finite: stopped once the climb's window was whole
    (FALLING[:12] + [math.nan], "not_finite", 12),
])
def test_the_json_says_why_the_sweep_stopped(monkeypatch, losses, stopped, iterations):
    feed = iter(losses)
    monkeypatch.setattr(lr_finder, "train_step", lambda *_a, **_k: (torch.tensor(next(feed)), None))
    params = tiny_params()  # num_iter 25
    data = tiny_data(n=256)
    result = run_range_test(params, data, *data.mean_std(), pick_runtime(params.train), log=lambda _: None,
                            progress=False)
    assert result["stopped"] == stopped and result["iterations"] == iterations == len(result["curve"])
    assert "stopped_on_divergence" not in result


def test_pick_result_without_a_pick_says_why_with_the_same_fields():
    falling = [2.3 - 0.01 * i for i in range(N)]
    test = range_params(divisor=2.0)
    messages = []
    result = pick_result(LRS, falling, test, 0.01, stopped="end_of_sweep", log=messages.append)
    assert result["lr_max"] is None and result["lr_min"] is None and result["lr_at_climb"] is None
    assert result["no_pick"] == ("lr_range_test: the smoothed loss never climbed above 1.25 x its lowest so far (1.32) "
                                 "by LR 10: raise lr_range_test.end_lr or num_iter")
    assert result["start_loss"] == pytest.approx(2.3) and result["iterations"] == N
    assert result["lowest_loss"] is None  # measured from only where there is a climb
    assert result["stopped"] == "end_of_sweep"
    assert "NO LRMAX PICKED" in messages[0]
    # the same rule and fields as a pick, which has no no_pick key
    picked = pick_result(LRS, real_shape(77), test, 0.1, stopped="climb", log=messages.append)
    assert picked["lr_max"] == pytest.approx(LRS[77] / 2, rel=1e-5) and picked["lr_min"] == pytest.approx(
        picked["lr_max"] * 0.1, rel=1e-5)
    assert picked["lr_at_climb"] == pytest.approx(LRS[77], rel=1e-5)
    assert picked["lowest_loss"] == pytest.approx(min(smooth(real_shape(77), 5)[:78]), abs=1e-5)
    assert "no_pick" not in picked and set(result) - set(picked) == {"no_pick"}
    assert picked["rule"] == result["rule"].replace("* 0.01", "* 0.1")
    assert pick_result([], [], test, 0.01, "not_finite", log=messages.append)["start_loss"] is None


def test_a_sweep_past_the_climb_keeps_the_pick_and_the_curve_up_to_it(monkeypatch):
    """`lr_range_test.stop_at_climb: false` sweeps on to num_iter, for curves that other rules can be judged on."""
    losses = FALLING[:12] + [3.0] * 13
    results = {}
    for stop in (True, False):
        feed = iter(losses)
        monkeypatch.setattr(lr_finder, "train_step", lambda *_a, **_k: (torch.tensor(next(feed)), None))
        params = tiny_params()
        params = replace(params, lr_range_test=replace(params.lr_range_test, stop_at_climb=stop))
        data = tiny_data(n=256)
        results[stop] = run_range_test(params, data, *data.mean_std(), pick_runtime(params.train),
                                       log=lambda _: None, progress=False)
    stopped, swept = results[True], results[False]
    assert (stopped["stopped"], swept["stopped"]) == ("climb", "end_of_sweep")
    assert swept["iterations"] == 25 > stopped["iterations"]
    for key in ("lr_max", "lr_min", "lr_at_climb", "lowest_loss"):
        assert swept[key] == stopped[key] is not None, key
    n = stopped["iterations"]
    assert [p["lr"] for p in swept["curve"][:n]] == [p["lr"] for p in stopped["curve"]]
    assert [p["loss"] for p in swept["curve"][:n]] == [p["loss"] for p in stopped["curve"]]

