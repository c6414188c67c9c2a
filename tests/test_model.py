"""ResNet-9 (Page's variant): layer recipe, parameter count, logit scaling, probabilities and the saved record."""

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

from cifar_resnet.config import ModelParams
from cifar_resnet.errors import DataError
from cifar_resnet.model import ResNet9, build_model, load_trained, save_trained

ROOT = Path(__file__).resolve().parents[1]
NARROW = (16, 32, 64, 128)


pytestmark = pytest.mark.usefixtures("one_thread")


def run_summary(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": "src"}
    proc = subprocess.run([sys.executable, "-m", "cifar_resnet.model", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def expected_param_count(channels, num_classes=10) -> int:
    c0, c1, c2, c3 = channels

    def conv_bn(c_in, c_out):  # 3x3 conv without bias + BN weight and bias
        return 9 * c_in * c_out + 2 * c_out

    return (conv_bn(3, c0) + conv_bn(c0, c1) + 2 * conv_bn(c1, c1) + conv_bn(c1, c2) + conv_bn(c2, c3)
            + 2 * conv_bn(c3, c3) + c3 * num_classes + num_classes)


def test_summary_cli_ends_with_the_total():
    """`python -m cifar_resnet.model` reads params.yaml (64-128-256-512)."""
    out = run_summary()
    lines = out.strip().splitlines()
    assert lines[-1] == "Total params: 6,573,130"
    assert expected_param_count((64, 128, 256, 512)) == 6_573_130
    assert any(line.startswith("fc (Linear)") and "[1, 10]" in line and "5,130" in line for line in lines)


def test_summary_cli_with_channels_on_the_command_line():
    out = run_summary(*map(str, NARROW))
    assert out.strip().splitlines()[-1] == f"Total params: {expected_param_count(NARROW):,}"


def conv(c_in, c_out):
    return ("Conv2d", c_in, c_out)


BN, RELU = ("BatchNorm2d",), ("ReLU",)


def recipe(c0, c1, c2, c3):
    """Leaf layers in forward order: (name, description)."""
    def block(prefix, c_in, c_out, pool):
        kinds = [conv(c_in, c_out)] + ([("MaxPool2d", 2)] if pool else []) + [BN + (c_out,), RELU]
        return [(f"{prefix}.{i}", k) for i, k in enumerate(kinds)]

    def residual(prefix, c_in, c_out):
        return (block(f"{prefix}.pre", c_in, c_out, True) + block(f"{prefix}.res.0", c_out, c_out, False)
                + block(f"{prefix}.res.1", c_out, c_out, False))

    return (block("prep", 3, c0, False) + residual("layer1", c0, c1) + block("layer2", c1, c2, True)
            + residual("layer3", c2, c3) + [("pool", ("MaxPool2d", 4)), ("fc", ("Linear", c3, 10))])


def describe(module: nn.Module):
    if isinstance(module, nn.Conv2d):
        assert module.kernel_size == (3, 3) and module.stride == (1, 1) and module.padding == (1, 1)
        assert module.bias is None
        return conv(module.in_channels, module.out_channels)
    if isinstance(module, nn.MaxPool2d):
        return ("MaxPool2d", module.kernel_size)
    if isinstance(module, nn.BatchNorm2d):
        return BN + (module.num_features,)
    if isinstance(module, nn.ReLU):
        return RELU
    if isinstance(module, nn.Linear):
        assert module.bias is not None
        return ("Linear", module.in_features, module.out_features)
    raise AssertionError(f"unexpected layer {module}")


@pytest.mark.parametrize("channels", [(64, 128, 256, 512), NARROW])
def test_layers_follow_the_recipe_in_forward_order(channels):
    model = ResNet9(channels)
    order = []
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: order.append(name))
             for name, m in model.named_modules() if not list(m.children())]
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    leaves = dict(model.named_modules())
    assert [(name, describe(leaves[name])) for name in order] == recipe(*channels)
    assert out.shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == expected_param_count(channels)


def test_residual_adds_the_branch_to_its_input():
    torch.manual_seed(0)
    model = ResNet9(NARROW).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.layer1.pre(model.prep(x))
        assert torch.allclose(model.layer1(model.prep(x)), h + model.layer1.res(h))
        h3 = model.layer3.pre(model.layer2(model.layer1(model.prep(x))))
        feats = model.pool(h3 + model.layer3.res(h3)).flatten(1)
        assert torch.allclose(model(x), model.fc(feats) * model.logit_scale, atol=1e-6)


@pytest.mark.parametrize("n", [1, 5])
def test_output_shape(n):
    model = ResNet9(NARROW).eval()
    assert model(torch.randn(n, 3, 32, 32)).shape == (n, 10)


def test_train_mode_forward_and_backward_on_narrow_channels():
    model = build_model(ModelParams(channels=NARROW, logit_scale=0.125))
    assert model.fc.in_features == 128 and model.prep[0].out_channels == 16
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10)
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("scale", [0.125, 1.0, 0.5])
def test_logits_are_the_fc_output_times_logit_scale(scale):
    torch.manual_seed(1)
    model = build_model(ModelParams(channels=NARROW, logit_scale=scale)).eval()
    seen = []
    model.fc.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        logits = model(torch.randn(3, 3, 32, 32))
    assert model.logit_scale == scale
    assert torch.allclose(logits, seen[0] * scale, rtol=1e-6, atol=0)
    assert not torch.allclose(seen[0], torch.zeros_like(seen[0]))


def test_default_logit_scale_is_pages():
    assert ResNet9().logit_scale == 0.125 and ModelParams().logit_scale == 0.125


def test_predict_proba_is_softmax_of_the_logits():
    torch.manual_seed(2)
    model = ResNet9(NARROW).eval()
    x = torch.randn(6, 3, 32, 32)
    probs = model.predict_proba(x)
    assert probs.shape == (6, 10) and not probs.requires_grad
    assert torch.allclose(probs.sum(dim=1), torch.ones(6), atol=1e-6)
    assert torch.all(probs > 0)
    with torch.no_grad():
        assert torch.allclose(probs, torch.softmax(model(x), dim=1), atol=1e-7)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(3)
    params = ModelParams(channels=NARROW, logit_scale=0.25)
    model = build_model(params)
    model.train()
    model(torch.randn(8, 3, 32, 32))  # moves the BN running statistics off their defaults
    mean, std = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    path = tmp_path / "sub" / "model.pt"
    save_trained(path, model, params, mean, std, classes, extra={"epochs": 3, "test_accuracy": 0.5})
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))  # atomic: no temp file left behind

    loaded, record = load_trained(path)
    assert isinstance(loaded, ResNet9) and not loaded.training
    assert loaded.logit_scale == 0.25 and loaded.fc.in_features == 128
    original = model.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert record["model"] == asdict(params)
    assert tuple(record["model"]["channels"]) == NARROW
    assert record["mean"] == list(mean) and record["std"] == list(std) and record["classes"] == list(classes)
    assert record["epochs"] == 3 and record["test_accuracy"] == 0.5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_load_trained_missing_file(tmp_path):
    with pytest.raises(DataError, match="missing"):
        load_trained(tmp_path / "nope.pt")


class _Payload:
    """Anything that is not tensors and plain values: unpickling it could run code."""


def test_load_trained_refuses_a_file_that_holds_more_than_weights(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {}, "model": {"channels": [8, 16, 32, 64], "logit_scale": 0.125},
                "payload": _Payload()}, path)
    with pytest.raises(DataError, match="model.pt: not a readable model file"):
        load_trained(path)


def test_saved_weights_name_no_temporary_file(tmp_path):
    import zipfile

    path = tmp_path / "model.pt"
    save_trained(path, ResNet9((8, 16, 32, 64)), ModelParams(channels=(8, 16, 32, 64)), (1, 2, 3), (4, 5, 6),
                 [str(i) for i in range(10)], {})
    names = zipfile.ZipFile(path).namelist()
    assert all(n.startswith("archive/") for n in names), names[:3]
