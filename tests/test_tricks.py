"""The opt-in tricks (all off by default): each knob's own behaviour, the knobs reaching the training loop and the
LR range test, model.pt alone rebuilding what they change in the network, resume staying exact with every knob on
(the EMA state included), and the tiny pipeline passing with all of them on.

In-process runs use tiny_data (random images) and the tiny params of conftest; the stage runs use make_workspace's
synthetic CIFAR-10. CIFAR_RESNET_TEST_DEVICE=cuda runs the in-process training tests on a GPU.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, make_workspace, run_stage, stage_env, tiny_params
from helpers import tiny_data
from torch import nn

import cifar_resnet.lr_finder as range_module
import cifar_resnet.model as model_module
import cifar_resnet.train as train_module
from cifar_resnet import checkpoint
from cifar_resnet.augment import normalise
from cifar_resnet.config import Params, evaluation_split, parse_params
from cifar_resnet.ema import WeightEMA
from cifar_resnet.evaluate import evaluate, translate, tta_logits
from cifar_resnet.loader import EvalLoader, TrainLoader
from cifar_resnet.lr_finder import run_range_test
from cifar_resnet.model import (
    Whitening,
    build_model,
    fit_whitening,
    load_trained,
    save_trained,
)
from cifar_resnet.runtime import pick_runtime
from cifar_resnet.schedule import MOMENTUM_CYCLE, OneCycle
from cifar_resnet.step import make_optimizer, make_scaler, train_step

DEVICE = os.environ.get("CIFAR_RESNET_TEST_DEVICE", "cpu")

# Every knob on, as params.yaml lists them (evaluate.tta is an evaluation knob: training must not care).
ALL_ON = {
    "model": {"activation": "celu", "whitening": True},
    "augment": {"flip": "alternate"},
    "train": {"label_smoothing": 0.2, "ema_decay": 0.9, "ema_every": 2, "frozen_bn_scales": True,
              "cycle_momentum": True},
    "evaluate": {"tta": "flip"},
}

pytestmark = pytest.mark.usefixtures("one_thread")


def merged(*layers: dict) -> dict:
    """Section-wise merge of params overrides (later layers win, key by key)."""
    out: dict = {}
    for layer in layers:
        for section, values in layer.items():
            out[section] = {**out.get(section, {}), **values} if isinstance(values, dict) else values
    return out


def params_of(*layers: dict, **sections) -> Params:
    """conftest's tiny params, fp32 on DEVICE, 2 epochs, with `layers` and `sections` merged over."""
    base = {"train": {"epochs": 2, "peak_epoch": 1, "batch_size": 64, "device": DEVICE, "threads": 1,
                      "precision": "fp32"}}
    return parse_params(tiny_params(**merged(base, *layers, sections)))


def runtime_of(params: Params):
    return pick_runtime(params.train)


def fresh_model(params: Params, data=None):
    """The model as train() and the range test build it: seeded weights, whitening fitted on the training images."""
    torch.manual_seed(params.seed)
    model = build_model(params.model)
    if data is not None:
        fit_whitening(model, data.train_images, *data.mean_std())
    return model


def count(model: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


# ------------------------------------------------------------------------------------------------- evaluate.tta


def test_flip_tta_of_a_mirror_symmetric_input_equals_no_tta():
    params = params_of()
    model, runtime = fresh_model(params).eval(), runtime_of(params)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    symmetric = (x + x.flip(3)) / 2
    assert torch.equal(symmetric, symmetric.flip(3))
    assert torch.equal(tta_logits(model, symmetric, runtime, "flip"), tta_logits(model, symmetric, runtime, "none"))
    # An asymmetric input: the mean of the image's and its mirror's logits, the same for the mirror image.
    flip = tta_logits(model, x, runtime, "flip")
    with torch.no_grad():
        torch.testing.assert_close(flip, (model(x) + model(x.flip(3))) / 2)
    assert not torch.allclose(flip, tta_logits(model, x, runtime, "none"))
    assert torch.equal(tta_logits(model, x.flip(3), runtime, "flip"), flip)


def test_flip_tta_through_evaluate_of_symmetric_images_equals_no_tta():
    params = params_of()
    model, runtime = fresh_model(params), runtime_of(params)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    images[..., 16:] = images[..., :16].flip(3)  # every image left-right symmetric
    loader = EvalLoader(images, torch.arange(40) % 10, 16, (120.0,) * 3, (60.0,) * 3, runtime.device)
    plain, flipped = evaluate(model, loader, runtime, "none"), evaluate(model, loader, runtime, "flip")
    assert plain[:2] == flipped[:2] and torch.equal(plain[2], flipped[2])
    assert model.training, "evaluate restores the model's mode"


def test_flip_translate_tta_is_the_weighted_mean_of_six_views():
    params = params_of()
    model, runtime = fresh_model(params).eval(), runtime_of(params)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    shifted = translate(x, 1)
    assert torch.equal(shifted[..., 1:, 1:], x[..., :-1, :-1])  # one pixel down and right
    assert torch.equal(shifted[..., 0, 1:], x[..., 1, :-1])  # the border reflected (row -1 is row 1)
    assert torch.equal(translate(x, -1)[..., :-1, :-1], x[..., 1:, 1:])  # up and left
    with torch.no_grad():
        def pair(batch):
            return (model(batch) + model(batch.flip(3))) / 2

        expected = pair(x) / 2 + (pair(translate(x, 1)) + pair(translate(x, -1))) / 4
    got = tta_logits(model, x, runtime, "flip+translate")
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, tta_logits(model, x, runtime, "flip"))


# ---------------------------------------------------------------------------------------- train.label_smoothing


class FixedLogits(nn.Module):
    """Logits that do not depend on the input: a known point of the loss."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x):
        return self.logits.expand(len(x), -1)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.2])
def test_label_smoothing_loss_at_a_known_point(eps):
    # Logits (log 9, 0, ..., 0) for class 0: p0 = 9/18 = 1/2, every other class 1/18. The smoothed target puts
    # 1 - eps + eps/10 on class 0 and eps/10 on each other class.
    model = FixedLogits(torch.tensor([math.log(9)] + [0.0] * 9))
    params = params_of(train={"label_smoothing": eps})
    runtime = runtime_of(params)
    optimizer, scaler = make_optimizer(model, params.train), make_scaler(runtime)
    x, y = torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    loss, _ = train_step(model, optimizer, scaler, runtime, x, y, 0.0, label_smoothing=params.train.label_smoothing)
    expected = (1 - eps) * math.log(2) + eps / 10 * (math.log(2) + 9 * math.log(18))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------- train.ema_decay


def test_ema_after_k_updates_equals_its_closed_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double()
    start = copy.deepcopy(model.state_dict())
    decay, every = 0.9, 3
    ema = WeightEMA(model, decay, every)
    averaged = []  # the weights at each update: after steps 2, 5 and 8
    for step in range(10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
            model[1].num_batches_tracked += 1
        ema.update(model, step)
        if (step + 1) % every == 0:
            averaged.append(copy.deepcopy(model.state_dict()))
    k = len(averaged)
    assert k == 3
    for key, first in start.items():
        if not first.is_floating_point():  # the batch counter is copied, as of the last update
            assert torch.equal(ema.state[key], averaged[-1][key]), key
            continue
        rho = decay ** every  # the decay is per step; an update covers `every` of them (Page's update_ema)
        closed = rho ** k * first + sum((1 - rho) * rho ** (k - 1 - j) * averaged[j][key] for j in range(k))
        torch.testing.assert_close(ema.state[key], closed, rtol=1e-12, atol=1e-12, msg=key)
    target = copy.deepcopy(model)
    ema.copy_to(target)
    assert all(torch.equal(target.state_dict()[key], ema.state[key]) for key in start)
    assert not torch.equal(target[0].weight, model[0].weight)


# ----------------------------------------------------------------------------------------------- model.whitening


def _patches(images: torch.Tensor) -> np.ndarray:
    """Every 3x3 patch of every image as a row of 27 (channel, row, column), independently of the library."""
    x = images.numpy().astype(np.float64)
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))  # (N, 3, H-2, W-2, 3, 3)
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, 27)


def _correlated_images(n: int = 120, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Smooth, channel-mixed images: neighbouring pixels and channels correlated, as in photographs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g, dtype=torch.float64).cumsum(2).cumsum(3) / size
    mix = torch.tensor([[1.0, 0.5, 0.2], [0.3, 1.0, 0.4], [0.1, 0.6, 1.0]], dtype=torch.float64)
    return torch.einsum("dc,nchw->ndhw", mix, x).float()


def test_whitening_filters_span_the_principal_axes_of_the_training_patches():
    images = _correlated_images()
    layer = Whitening()
    layer.fit(images)
    patches = _patches(images)
    covariance = np.cov(patches, rowvar=False, bias=True)
    eigenvalues = np.linalg.eigvalsh(covariance)  # ascending, as the filters are ordered
    filters = layer.weight.reshape(27, 27).double().numpy()  # one filter a row, in the patches' (c, i, j) order
    norms = np.linalg.norm(filters, axis=1)
    axes = filters / norms[:, None]
    # The 27 filters are the 27 principal axes (orthonormal once normalised), each scaled by 1/sqrt(variance + eps).
    np.testing.assert_allclose(axes @ axes.T, np.eye(27), atol=1e-4)
    np.testing.assert_allclose(covariance @ axes.T, axes.T * eigenvalues, atol=1e-4 * eigenvalues[-1])
    np.testing.assert_allclose(norms, 1 / np.sqrt(eigenvalues + layer.eps), rtol=1e-4)
    # So the projected patches are decorrelated, with variance lambda / (lambda + eps) (about 1 on the big axes).
    projected = np.cov(patches @ filters.T, rowvar=False, bias=True)
    np.testing.assert_allclose(projected, np.diag(eigenvalues / (eigenvalues + layer.eps)), atol=1e-3)
    assert eigenvalues[-1] / eigenvalues[0] > 100, "the test images are far from white already"
    # The layer computes exactly those projections: output channel k at pixel (y, x) is the patch centred there.
    with torch.no_grad():
        out = layer(images)[:, :, 1:-1, 1:-1]
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).reshape(-1, 27).double().numpy(), patches @ filters.T,
                               rtol=1e-4, atol=1e-4)
    assert out.shape[1] == 27 and layer(images).shape[2:] == images.shape[2:]


def test_fit_whitening_takes_the_first_training_images_normalised(monkeypatch):
    monkeypatch.setattr(model_module, "WHITENING_IMAGES", 40)
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 200, (60, 3, 32, 32), dtype=torch.uint8, generator=g)
    images[40:] = 255 - images[40:] // 4  # the images past the first 40 look nothing alike
    mean, std = (90.0, 100.0, 110.0), (50.0, 55.0, 60.0)
    model = build_model(params_of(model={"whitening": True}).model)
    assert torch.count_nonzero(model.whitening().weight) == 0  # unfitted until fit_whitening
    fit_whitening(model, images, mean, std)
    expected = Whitening()
    expected.fit(normalise(images[:40], mean, std))
    assert torch.equal(model.whitening().weight, expected.weight)
    everything = Whitening()
    everything.fit(normalise(images, mean, std))
    assert not torch.allclose(model.whitening().weight, everything.weight)
    # Frozen: a buffer (it travels in the state dict), not a parameter any optimizer sees.
    assert "prep.0.weight" in model.state_dict()
    assert all(p is not model.whitening().weight for p in model.parameters())
    plain = build_model(params_of().model)
    assert plain.whitening() is None
    fit_whitening(plain, images, mean, std)  # a network without the layer: nothing to fit, nothing fails


# ------------------------------------------------------------------------------------------------ model.activation


def test_celu_replaces_every_relu():
    relu = build_model(params_of().model)
    assert count(relu, nn.ReLU) == 8 and count(relu, nn.CELU) == 0
    for whitening in (False, True):
        celu = build_model(params_of(model={"activation": "celu", "celu_alpha": 0.2, "whitening": whitening}).model)
        assert count(celu, nn.CELU) == 8 and count(celu, nn.ReLU) == 0
        assert {m.alpha for m in celu.modules() if isinstance(m, nn.CELU)} == {0.2}


def test_model_pt_alone_rebuilds_whitening_and_celu(tmp_path):
    params = params_of(model={"whitening": True, "activation": "celu", "celu_alpha": 0.3})
    data = tiny_data(64, 16)
    mean, std = data.mean_std()
    model = fresh_model(params, data)
    with torch.no_grad():  # BatchNorm statistics away from their defaults
        model.train()(normalise(data.train_images, mean, std))
    model.eval()
    save_trained(tmp_path / "model.pt", model, params.model, mean, std, data.classes, {"epochs": 1})
    loaded, saved = load_trained(tmp_path / "model.pt")
    assert saved["model"]["whitening"] is True and saved["model"]["activation"] == "celu"
    assert isinstance(loaded.whitening(), Whitening) and torch.count_nonzero(loaded.whitening().weight) == 27 * 27
    assert torch.equal(loaded.whitening().weight, model.whitening().weight)
    assert count(loaded, nn.CELU) == 8 and count(loaded, nn.ReLU) == 0
    assert {m.alpha for m in loaded.modules() if isinstance(m, nn.CELU)} == {0.3}
    x = normalise(data.test_images, mean, std)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# --------------------------------------------------------------------------- train.frozen_bn_scales, bias LR rule


def test_frozen_bn_scales_stay_one_and_bn_biases_learn_at_factor_times_the_lr():
    params = params_of(train={"frozen_bn_scales": True, "bn_bias_lr_factor": 64.0, "weight_decay": 5e-4})
    runtime = runtime_of(params)
    data = tiny_data(64, 0)
    mean, std = data.mean_std()
    model = fresh_model(params).train()
    optimizer, scaler = make_optimizer(model, params.train), make_scaler(runtime)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    biases = [bn.bias.detach().clone() for bn in bns]
    rest, bias_group = optimizer.param_groups
    ids = lambda tensors: {id(t) for t in tensors}
    assert ids(bias_group["params"]) == ids(bn.bias for bn in bns)
    assert ids(rest["params"]) == ids(model.parameters()) - ids(bn.weight for bn in bns) - ids(bias_group["params"])
    assert not any(bn.weight.requires_grad for bn in bns)
    assert bias_group["weight_decay"] == pytest.approx(5e-4 / 64) and rest["weight_decay"] == pytest.approx(5e-4)
    x, y = normalise(data.train_images, mean, std), data.train_labels
    for step, lr in enumerate([0.01, 0.05, 0.02]):
        train_step(model, optimizer, scaler, runtime, x, y, lr, step=step)
        assert rest["lr"] == lr and bias_group["lr"] == 64 * lr
    assert all(torch.equal(bn.weight, torch.ones_like(bn.weight)) for bn in bns)
    assert all(not torch.equal(bn.bias, before) for bn, before in zip(bns, biases))
    # Off (the default): one group, every BatchNorm scale learns.
    plain = fresh_model(params_of())
    assert len(make_optimizer(plain, params_of().train).param_groups) == 1
    assert all(m.weight.requires_grad for m in plain.modules() if isinstance(m, nn.BatchNorm2d))


# --------------------------------------------------------------------------------------------- train.cycle_momentum


def test_cycled_momentum_runs_095_to_085_at_the_peak_and_back():
    s = OneCycle.for_run(0.01, 1.0, epochs=4, peak_epoch=1, steps_per_epoch=5)
    assert MOMENTUM_CYCLE == (0.95, 0.85)
    assert s.momentum(0) == pytest.approx(0.95) and s.momentum(s.peak_step) == pytest.approx(0.85)
    assert s.momentum(s.total_steps - 1) == pytest.approx(0.95)
    values = [s.momentum(step) for step in range(s.total_steps)]
    assert all(a > b for a, b in itertools.pairwise(values[:s.peak_step + 1]))  # falls while the LR rises
    assert all(a < b for a, b in itertools.pairwise(values[s.peak_step:]))  # and rises as it falls
    for step in range(s.total_steps):  # inversely to the LR: linear in it
        frac = (s(step) - s.lr_min) / (s.lr_max - s.lr_min)
        assert s.momentum(step) == pytest.approx(0.95 - 0.1 * frac)
    with pytest.raises(IndexError):
        s.momentum(s.total_steps)


# ------------------------------------------------------------------------------------------------- augment.flip


def _epoch_views(loader: TrainLoader, epoch: int, n: int) -> torch.Tensor:
    """Every image of the epoch, put back at its index (the labels are the indices)."""
    out = torch.empty(n, 3, 32, 32)
    for x, y in loader.epoch(epoch):
        out[y] = x
    return out


def test_alternating_flip_mirrors_each_image_on_alternate_epochs():
    n = 400
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    aug = params_of(augment={"flip": "alternate", "flip_p": 0.5, "pad": 0, "cutout": 0}).augment  # flips only
    mean, std = (127.0,) * 3, (70.0,) * 3
    loader = TrainLoader(images, torch.arange(n), 50, mean, std, torch.device("cpu"), aug=aug, seed=0)
    plain = normalise(images, mean, std)
    flips = []
    for epoch in (1, 2, 3):
        views = _epoch_views(loader, epoch, n)
        flipped = torch.tensor([torch.equal(views[i], plain[i].flip(2)) for i in range(n)])
        unflipped = torch.tensor([torch.equal(views[i], plain[i]) for i in range(n)])
        assert (flipped ^ unflipped).all(), "each image is seen either as it is or mirrored"
        flips.append(flipped)
    assert (flips[0] ^ flips[1]).all() and (flips[1] ^ flips[2]).all(), "every image flips between epochs"
    assert abs(flips[0].float().mean().item() - 0.5) < 0.1


@pytest.mark.parametrize("flip_p", [0.25, 0.5])
def test_alternating_flip_rate_of_the_first_epoch_is_flip_p(flip_p):
    n = 4000
    aug = params_of(augment={"flip": "alternate", "flip_p": flip_p}).augment
    loader = TrainLoader(torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.zeros(n, dtype=torch.long), 500,
                         (0.0,) * 3, (1.0,) * 3, torch.device("cpu"), aug=aug, seed=0)
    first, second = loader._alternate_flips(1), loader._alternate_flips(2)
    assert abs(first.float().mean().item() - flip_p) < 0.03
    assert torch.equal(second, ~first) and torch.equal(loader._alternate_flips(3), first)


# ------------------------------------------------------------------------------------------------ evaluate.split


def test_evaluation_split_follows_evaluate_split_and_val_size():
    assert evaluation_split(params_of()) == "test"
    assert evaluation_split(params_of(data={"val_size": 10})) == "val"
    assert evaluation_split(params_of(data={"val_size": 10}, evaluate={"split": "test"})) == "test"
    assert evaluation_split(params_of(data={"val_size": 10}, evaluate={"split": "val"})) == "val"


# ------------------------------------------------------------------------------------------- the training loop


def _spy_steps(monkeypatch) -> list[dict]:
    """Record, per training step of train(), its arguments and the optimizer's groups as the step ran them."""
    calls: list[dict] = []
    real = train_module.train_step

    def spy(net, optimizer, scaler, runtime, x, y, lr, watch=None, step=0, momentum=None, label_smoothing=0.0):
        out = real(net, optimizer, scaler, runtime, x, y, lr, watch, step, momentum=momentum,
                   label_smoothing=label_smoothing)
        calls.append({"step": step, "lr": lr, "momentum": momentum, "label_smoothing": label_smoothing,
                      "loss": float(out[0]), "groups": [(g["lr"], g["momentum"]) for g in optimizer.param_groups]})
        return out

    monkeypatch.setattr(train_module, "train_step", spy)
    return calls


def _spy_ema(monkeypatch) -> list:
    """The WeightEMA objects train() makes, each remembering the (raw) model it averages."""
    made = []

    class Recorded(WeightEMA):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def update(self, model, step):
            self.source = model
            super().update(model, step)

    monkeypatch.setattr(train_module, "WeightEMA", Recorded)
    return made


def _train(params: Params, data, **kw):
    """train() at LRMAX 0.05, quietly."""
    mean, std = data.mean_std()
    return train_module.train(params, data, mean, std, 0.05, 0.0005, runtime_of(params), log=lambda *_: None, **kw)


def test_training_runs_every_knob(monkeypatch):
    calls, emas = _spy_steps(monkeypatch), _spy_ema(monkeypatch)
    params = params_of(ALL_ON, train={"epochs": 3, "batch_size": 32})
    data = tiny_data(128, 20)
    result = _train(params, data)
    steps_per_epoch = 128 // 32
    schedule = OneCycle.for_run(0.0005, 0.05, 3, 1, steps_per_epoch)
    assert [c["step"] for c in calls] == list(range(3 * steps_per_epoch))
    for c in calls:
        assert c["label_smoothing"] == 0.2
        assert c["lr"] == schedule(c["step"]) and c["momentum"] == schedule.momentum(c["step"])
        (lr, momentum), (bias_lr, bias_momentum) = c["groups"]  # frozen BN scales: the BN biases' own group
        assert lr == schedule(c["step"]) and bias_lr == 64 * schedule(c["step"])
        assert momentum == bias_momentum == schedule.momentum(c["step"])
    # The EMA is what is evaluated and returned, not the raw weights it averages.
    (ema,) = emas
    assert ema.decay == 0.9 and ema.every == 2 and result.model is not ema.source
    returned = result.model.state_dict()
    assert all(torch.equal(returned[k], ema.state[k].to(returned[k].device)) for k in returned)
    raw = ema.source.state_dict()
    assert not all(torch.equal(returned[k], raw[k]) for k in returned)
    # The raw weights kept their BN scales at exactly 1 (the average of ones stays 1, to rounding).
    for bn in (m for m in ema.source.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    for bn in (m for m in result.model.modules() if isinstance(m, nn.BatchNorm2d)):
        torch.testing.assert_close(bn.weight, torch.ones_like(bn.weight), rtol=0, atol=1e-6)
    # The whitening filters were fitted on the training images and stayed frozen.
    expected = fresh_model(params, data).whitening().weight
    torch.testing.assert_close(result.model.whitening().weight.cpu(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ema.source.whitening().weight.cpu(), expected, rtol=0, atol=0)
    assert count(result.model, nn.CELU) == 8
    assert len(result.history) == 3 and all("test_acc" in row for row in result.history)


def test_training_with_the_knobs_off_passes_none_of_them(monkeypatch):
    calls, emas = _spy_steps(monkeypatch), _spy_ema(monkeypatch)
    _train(params_of(train={"epochs": 2, "batch_size": 32}), tiny_data(64, 10))
    assert emas == [] and calls
    assert all(c["momentum"] is None and c["label_smoothing"] == 0.0 for c in calls)
    assert all(c["groups"] == [(c["lr"], 0.9)] for c in calls)


def test_resume_with_every_knob_on_is_exact_and_restores_the_ema(tmp_path, monkeypatch):
    """In-process (runs on CIFAR_RESNET_TEST_DEVICE): a run stopped after epoch 1 and resumed from its checkpoint
    ends with the uninterrupted run's history and weights. The checkpoint loads on the CPU: the EMA state must land
    on the model's device."""
    monkeypatch.setenv("CIFAR_RESNET_CACHE", str(tmp_path))
    params = params_of(ALL_ON, train={"epochs": 3, "batch_size": 32})
    data = tiny_data(96, 20)  # 3 steps an epoch: the EMA's every-2-steps straddles the epochs
    whole = _train(params, data)

    class Stop(Exception):
        pass

    def stop_after_first(history):
        if len(history) == 1:
            raise Stop

    with pytest.raises(Stop):
        _train(params, data, run_key="k", on_epoch=stop_after_first)
    saved = checkpoint.load("k")
    assert saved["epoch"] == 1 and set(saved["ema"]) == set(saved["model"])
    assert not all(torch.equal(saved["ema"][k], saved["model"][k]) for k in saved["model"])
    resumed = _train(params, data, run_key="k")
    assert resumed.resumed_from == 2
    assert resumed.history == whole.history
    a, b = resumed.model.state_dict(), whole.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_identity_ignores_the_evaluation_knobs():
    """Training does not read evaluate.tta or evaluate.split: changing one must not make a killed run start afresh."""
    def key(**evaluate):
        params = params_of(data={"val_size": 10}, evaluate=evaluate)
        return checkpoint.run_identity(params, 0.2, 0.002, runtime_of(params), 1, {})[0]

    assert key() == key(tta="flip") == key(tta="flip+translate") == key(split="val") == key(split="test")
    assert key(batch_size=7) != key()  # the per-epoch evaluation reads its batch size


# ------------------------------------------------------------------------------------------------ the range test


def _range_test(monkeypatch, *layers) -> list[dict]:
    """The range test's raw curve over all its iterations (its stop and pick rule, which random images need not
    satisfy, left out)."""
    monkeypatch.setattr(range_module, "climbed", lambda losses, window: False)
    monkeypatch.setattr(range_module, "pick_lr_max", lambda lrs, losses, test, blew_up: (lrs[0], 0))
    params = params_of(*layers, {"train": {"batch_size": 32}},
                       lr_range_test={"start_lr": 1e-3, "end_lr": 1.0, "num_iter": 10})
    data = tiny_data(96, 0)
    mean, std = data.mean_std()
    return run_range_test(params, data, mean, std, runtime_of(params), log=lambda *_: None, progress=False)["curve"]


def test_range_test_runs_with_the_training_knobs(monkeypatch):
    base = _range_test(monkeypatch)
    for knob in ({"train": {"label_smoothing": 0.2}}, {"train": {"frozen_bn_scales": True}}):
        curve = _range_test(monkeypatch, knob)
        assert [r["lr"] for r in curve] == [r["lr"] for r in base]
        assert [r["loss"] for r in curve] != [r["loss"] for r in base], knob


def test_range_test_starts_from_the_loss_training_starts_from(monkeypatch):
    """The same model (whitening, CELU), first batch (alternating flip) and loss (label smoothing) as training."""
    curve = _range_test(monkeypatch, ALL_ON)
    calls = _spy_steps(monkeypatch)
    _train(params_of(ALL_ON, train={"epochs": 2, "batch_size": 32}), tiny_data(96, 0))
    assert curve[0]["loss"] == round(calls[0]["loss"], 6)


# ---------------------------------------------------------------------------------------------------- dvc.yaml


def _stage_params(name: str) -> list[str]:
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]
    return [p for p in stage["params"] if isinstance(p, str)]


def test_train_stage_does_not_read_the_evaluation_knobs():
    """Turning TTA on (or choosing the reported split) never retrains: train lists only evaluate.batch_size."""
    evaluation = [p for p in _stage_params("train") if p == "evaluate" or p.startswith("evaluate.")]
    assert evaluation == ["evaluate.batch_size"]
    assert {"model", "augment", "train"} <= set(_stage_params("train"))  # every training knob retrains
    assert "evaluate" in _stage_params("evaluate")  # tta and split rerun the evaluation


def test_range_test_stage_tracks_the_knobs_that_change_the_loss_scale():
    tracked = set(_stage_params("lr_range_test"))
    assert {"train.label_smoothing", "train.frozen_bn_scales", "train.bn_bias_lr_factor", "model",
            "augment"} <= tracked


# ------------------------------------------------------------------------------- the stages, every knob on

STAGE_EPOCHS = 3
# With a validation split, reported by evaluate (64 of the 320 synthetic training images held out).
STAGE_KNOBS = merged(ALL_ON, {"lr_max": "auto", "lr_range_test": {"end_lr": 100.0, "num_iter": 20},
                              "train": {"epochs": STAGE_EPOCHS}, "data": {"val_size": 64},
                              "evaluate": {"split": "val"}})
TRAIN_OUTPUTS = ["metrics/train.json", "plots/history.tsv", "models/model.pt"]


def _run(stage: str, ws: Path, cache: Path):
    result = run_stage(stage, ws, stage_env(cache, PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, f"{stage}:\n{result.stdout}\n{result.stderr}"
    return result


def _set_params(ws: Path, **sections) -> None:
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    for section, values in sections.items():
        raw[section].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """check_params, lr_range_test and train with every knob on: the uninterrupted run the resume test matches."""
    root = tmp_path_factory.mktemp("all_on")
    ws = make_workspace(root / "ws", **STAGE_KNOBS)
    for stage in ("check_params", "lr_range_test", "train"):
        _run(stage, ws, root / "cache")
    return ws


@pytest.mark.slow
def test_every_stage_passes_with_every_knob_on(trained):
    ws, cache = trained, trained.parent / "cache"
    _set_params(ws, evaluate={"tta": "flip+translate"})  # an evaluation knob: nothing before evaluate reruns
    _run("evaluate", ws, cache)
    _run("gallery", ws, cache)  # draws from the split evaluate reported (validation)
    for rel in ("data/params_checked.txt", "metrics/lr_range_test.json", "plots/lr_range_test.tsv",
                "plots/lr_range_test.png", "models/model.pt", "models/summary.txt", "metrics/train.json",
                "plots/history.tsv", "timing/train.json", "models/predictions.npz", "metrics/evaluate.json",
                "plots/confusion.csv", "plots/gallery.png", "plots/curves.png", "plots/lr_schedule.png"):
        assert (ws / rel).is_file() and (ws / rel).stat().st_size, rel
    train = json.loads((ws / "metrics/train.json").read_text())
    assert train["lr_source"] == "lr_range_test" and train["epochs"] == STAGE_EPOCHS
    assert math.isfinite(train["val_loss"]) and "test_loss" not in train  # choosing on val: no test number
    # evaluate.split val: the validation numbers under val_* keys, and no test number where they stand.
    evaluated = json.loads((ws / "metrics/evaluate.json").read_text())
    assert evaluated["split"] == "val" and evaluated["num_images"] == 64 and evaluated["tta"] == "flip+translate"
    assert 0 <= evaluated["val_accuracy"] <= 1 and evaluated["val_loss"] > 0
    assert "accuracy" not in evaluated and "loss" not in evaluated
    assert len(np.load(ws / "models/predictions.npz")["labels"]) == 64
    # model.pt alone rebuilds the network every knob changed.
    model, saved = load_trained(ws / "models/model.pt")
    assert saved["model"]["whitening"] is True and saved["model"]["activation"] == "celu"
    assert torch.count_nonzero(model.whitening().weight) > 0 and count(model, nn.CELU) == 8
    assert "Whitening" in (ws / "models/summary.txt").read_text()
    assert not list(cache.rglob("checkpoint.pt")), "removed after success"


@pytest.mark.slow
def test_sigkill_then_rerun_with_every_knob_on_is_byte_identical(trained, tmp_path, held):  # noqa: F811
    ws, cache = make_workspace(tmp_path / "ws", **STAGE_KNOBS), tmp_path / "cache"
    (ws / "metrics").mkdir()
    shutil.copy(trained / "metrics/lr_range_test.json", ws / "metrics/lr_range_test.json")  # the same lr_max
    run = held(ws, cache)
    run.wait_held(STAGE_EPOCHS)
    run.kill()  # the whole process group, held after epoch 1 of 3
    assert not (ws / "models/model.pt").exists()
    (saved,) = (cache / "checkpoints").glob("*/checkpoint.pt")
    state = torch.load(saved, weights_only=True)
    assert state["epoch"] == 1 and state["ema"] is not None and set(state["ema"]) == set(state["model"])
    result = run_stage("train", ws, stage_env(cache, PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Resuming from epoch 2\n" in result.stdout
    for rel in TRAIN_OUTPUTS:
        assert (ws / rel).read_bytes() == (trained / rel).read_bytes(), rel
