"""The LR range test: the exponential LR sweep, Smith's pick rule and a tiny real run on the CPU."""

import math

import numpy as np
import pytest
import torch

from cifar_resnet.config import parse_params
from cifar_resnet.data import Cifar10
from cifar_resnet.lr_range_test import RULE, RangeTestError, lr_at, pick_lr_max, pick_result, run_range_test
from cifar_resnet.runtime import pick_runtime

N = 100
LRS = [lr_at(i, 1e-4, 10.0, N) for i in range(N)]


pytestmark = pytest.mark.usefixtures("one_thread")


def ema(losses, beta=0.98):
    """The bias-corrected EMA of run_range_test (fastai's lr_find smoothing)."""
    avg, out = 0.0, []
    for i, value in enumerate(losses):
        avg = beta * avg + (1 - beta) * value
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def u_curve(valley: int, n: int = N):
    """A clean U in log-LR with its minimum exactly at index `valley`."""
    return [1.0 + (i - valley) ** 2 / n for i in range(n)]


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


# ------------------------------------------------------------------------------------------------- pick_lr_max


@pytest.mark.parametrize("divisor", [1.0, 4.0])
def test_pick_is_lr_at_the_smoothed_minimum_over_divisor(divisor):
    lr_max, best = pick_lr_max(LRS, u_curve(60), divisor, stopped_early=False)
    assert best == 60
    assert lr_max == LRS[60] / divisor


def test_minimum_in_first_tenth_fails():
    with pytest.raises(RangeTestError, match="first tenth"):
        pick_lr_max(LRS, u_curve(5), 1.0, stopped_early=False)
    with pytest.raises(RangeTestError, match="first tenth"):  # stopping early does not excuse the start
        pick_lr_max(LRS, u_curve(0), 1.0, stopped_early=True)


def test_edges_are_a_tenth_of_the_iterations_run():
    with pytest.raises(RangeTestError):
        pick_lr_max(LRS, u_curve(9), 1.0, False)  # index 9 of 100: inside the first tenth
    assert pick_lr_max(LRS, u_curve(10), 1.0, False) == (LRS[10], 10)
    assert pick_lr_max(LRS, u_curve(89), 1.0, False) == (LRS[89], 89)
    with pytest.raises(RangeTestError):
        pick_lr_max(LRS, u_curve(90), 1.0, False)  # inside the last tenth
    # the tenth is of the iterations actually run (a test stopped early at 40 iterations)
    with pytest.raises(RangeTestError):
        pick_lr_max(LRS[:40], u_curve(3, 40), 1.0, True)
    assert pick_lr_max(LRS[:40], u_curve(4, 40), 1.0, True) == (LRS[4], 4)


def test_minimum_at_the_end_fails_unless_stopped_early():
    still_falling = [2.3 - 0.01 * i for i in range(N)]
    with pytest.raises(RangeTestError, match="still falling"):
        pick_lr_max(LRS, still_falling, 1.0, stopped_early=False)
    near_end = u_curve(95)
    with pytest.raises(RangeTestError, match="still falling"):
        pick_lr_max(LRS, near_end, 1.0, stopped_early=False)
    # a test that stopped on divergence ended past its minimum: the pick stands
    assert pick_lr_max(LRS, near_end, 1.0, stopped_early=True) == (LRS[95], 95)
    assert pick_lr_max(LRS, still_falling, 2.0, stopped_early=True) == (LRS[-1] / 2, N - 1)


def test_rule_ignores_an_early_noisy_dip():
    """The raw curve has a one-batch dip at index 15; the real valley is at 70.

    The raw loss is steepest (and lowest) at the dip, so a steepest-gradient rule (or the raw minimum) picks an LR
    ~100x too small; the minimum of the smoothed loss stays at the end of the real falling stretch.
    """
    raw = []
    for i in range(N):
        if i <= 70:
            raw.append(2.3 - 1.3 * i / 70)  # falls slowly to 1.0 at LR ~ 0.7
        else:
            raw.append(1.0 + 0.3 * (i - 70))  # then diverges
    raw[15] = 0.5  # one lucky batch
    smoothed = ema(raw)
    steepest = int(np.argmin(np.gradient(raw)))
    assert steepest in (14, 15)  # the raw steepest-gradient point is the dip
    assert int(np.argmin(raw)) == 15
    lr_max, best = pick_lr_max(LRS, smoothed, 1.0, stopped_early=True)
    assert 70 <= best <= 75  # at the valley, plus the lag of the EMA
    assert lr_max == LRS[best] and LRS[best] > 50 * LRS[steepest]


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
        # end_lr 1000 forces divergence well inside the sweep, so the smoothed loss brackets a minimum
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
    assert 10 <= result["iterations"] == len(curve) <= rp.num_iter
    assert [c["iteration"] for c in curve] == list(range(1, len(curve) + 1))
    lrs = [c["lr"] for c in curve]
    assert all(b > a for a, b in zip(lrs, lrs[1:]))
    assert lrs == [round(lr_at(i, rp.start_lr, rp.end_lr, rp.num_iter), 8) for i in range(len(lrs))]
    assert all(math.isfinite(c["loss"]) for c in curve)
    assert curve[0]["loss"] == pytest.approx(math.log(10), abs=0.2)  # an untrained 10-way softmax
    # the smoothed column is the debiased EMA of the loss column
    assert [c["smoothed_loss"] for c in curve] == pytest.approx(ema([c["loss"] for c in curve], rp.smoothing),
                                                                abs=1e-5)

    smoothed = [c["smoothed_loss"] for c in curve]
    best = int(np.argmin(smoothed))
    assert result["lr_at_min_loss"] == pytest.approx(lrs[best], rel=1e-6)
    assert result["min_smoothed_loss"] == pytest.approx(smoothed[best], abs=1e-6)
    assert result["min_smoothed_loss"] < curve[0]["smoothed_loss"]  # the loss did fall before diverging
    assert result["lr_max"] == pytest.approx(result["lr_at_min_loss"] / 2.0, rel=1e-5)  # divisor 2
    assert result["lr_min"] == pytest.approx(result["lr_max"] * 0.05, rel=1e-5)  # lr_min_factor
    assert len(curve) // 10 <= best < len(curve) - len(curve) // 10  # bracketed: not at an edge
    # end_lr 1000 is far past what this model survives: the test ends on divergence, before num_iter
    assert result["stopped_on_divergence"] is True
    assert result["iterations"] < rp.num_iter
    assert smoothed[-1] > rp.divergence * smoothed[best]
    assert result["rule"] == "lr_max = lr_at_min_smoothed_loss / 2; lr_min = lr_max * 0.05"
    assert RULE.startswith("lr_max = lr_at_min_smoothed_loss / divisor")
    assert len(messages) == 1 and "stopped on divergence" in messages[0]


def test_run_range_test_batch_larger_than_the_data():
    params = tiny_params()
    data = tiny_data(n=100)
    with pytest.raises(RangeTestError, match="exceeds"):
        run_range_test(params, data, *data.mean_std(), pick_runtime(params.train), log=lambda s: None,
                       progress=False)


def test_run_range_test_diverging_at_once_has_no_pick():
    """No curve to read is no pick: the JSON says why (lr_max null), and the test does not fail by itself."""
    params = tiny_params(start_lr=1e4, end_lr=1e6)
    data = tiny_data(n=256)
    messages = []
    result = run_range_test(params, data, *data.mean_std(), pick_runtime(params.train), log=messages.append,
                            progress=False)
    assert result["lr_max"] is None and result["lr_min"] is None
    assert result["no_pick"].startswith("lr_range_test: diverged after") and result["stopped_on_divergence"]
    assert result["iterations"] == len(result["curve"]) < 10
    assert len(messages) == 1 and "NO LRMAX PICKED" in messages[0] and "diverged after" in messages[0]


def test_pick_result_without_a_pick_keeps_the_curve_minimum_and_says_why():
    still_falling = [2.3 - 0.01 * i for i in range(N)]
    messages = []
    result = pick_result(LRS, still_falling, 1.0, 0.01, stopped_early=False, log=messages.append)
    assert result["lr_max"] is None and result["lr_min"] is None
    assert result["no_pick"] == ("lr_range_test: the smoothed loss was still falling at the end of the range "
                                 "(LR 10): raise lr_range_test.end_lr or num_iter")
    assert result["lr_at_min_loss"] == pytest.approx(10.0) and result["min_smoothed_loss"] == pytest.approx(1.31)
    assert result["iterations"] == N and result["stopped_on_divergence"] is False
    assert "NO LRMAX PICKED" in messages[0]
    # the same rule and fields as a pick, which has no no_pick key
    picked = pick_result(LRS, u_curve(60), 2.0, 0.1, stopped_early=False, log=messages.append)
    assert picked["lr_max"] == pytest.approx(LRS[60] / 2, rel=1e-5) and picked["lr_min"] == pytest.approx(
        picked["lr_max"] * 0.1, rel=1e-5)
    assert "no_pick" not in picked and set(result) - set(picked) == {"no_pick"}
    assert picked["rule"] == result["rule"].replace("/ 1;", "/ 2;").replace("* 0.01", "* 0.1")
    assert pick_result([], [], 1.0, 0.01, True, log=messages.append)["lr_at_min_loss"] is None
