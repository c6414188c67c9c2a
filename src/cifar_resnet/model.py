"""The network: a ResNet-9 (David Page's cifar10-fast variant).

PrepLayer conv(64)-BN-ReLU; Layer1 X = conv(128)-MaxPool(2)-BN-ReLU, out X + (conv-BN-ReLU-conv-BN-ReLU)(X);
Layer2 conv(256)-MaxPool(2)-BN-ReLU; Layer3 like Layer1 at 512; MaxPool(4); Linear(512, 10); softmax (inside the
loss for training, explicit for predictions). All convolutions 3x3, stride 1, padding 1, no bias.
Run `python -m cifar_resnet.model` for the layer-by-layer summary.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

import torch
from torch import nn

from cifar_resnet.atomic import atomic_path
from cifar_resnet.config import load_params
from cifar_resnet.errors import DataError, ParamsError


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """X = conv-pool-BN-ReLU(input); output X + (conv-BN-ReLU-conv-BN-ReLU)(X)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.pre = conv_bn(c_in, c_out, pool=True)
        self.res = nn.Sequential(conv_bn(c_out, c_out), conv_bn(c_out, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        return x + self.res(x)


class ResNet9(nn.Module):
    def __init__(self, channels=(64, 128, 256, 512), num_classes: int = 10, logit_scale: float = 0.125):
        super().__init__()
        c0, c1, c2, c3 = channels
        self.prep = conv_bn(3, c0)
        self.layer1 = Residual(c0, c1)
        self.layer2 = conv_bn(c1, c2, pool=True)
        self.layer3 = Residual(c2, c3)
        self.pool = nn.MaxPool2d(4)
        self.fc = nn.Linear(c3, num_classes)
        # Scaling the logits down keeps the early softmax soft (Page: x0.125 helps at this batch size and LR).
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        x = self.pool(x).flatten(1)
        return self.fc(x) * self.logit_scale

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(x).float(), dim=1)


def build_model(model_params) -> ResNet9:
    return ResNet9(tuple(model_params.channels), logit_scale=model_params.logit_scale)


def summary(model: nn.Module, input_shape=(1, 3, 32, 32)) -> str:
    """Output shape and parameter count of every leaf layer, ending with `Total params: N`."""
    rows, hooks = [], []

    def record(name):
        def hook(module, _inputs, output):
            params = sum(p.numel() for p in module.parameters(recurse=False))
            rows.append((name, type(module).__name__, tuple(output.shape), params))
        return hook

    for name, module in model.named_modules():
        if not list(module.children()):
            hooks.append(module.register_forward_hook(record(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(input_shape, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    width = max(len(f"{n} ({t})") for n, t, _, _ in rows)
    lines = [f"{'Layer (type)':<{width}}  {'Output shape':<20} {'Params':>12}", "-" * (width + 35)]
    for name, kind, shape, params in rows:
        lines.append(f"{name + ' (' + kind + ')':<{width}}  {str(list(shape)):<20} {params:>12,}")
    total = sum(p.numel() for p in model.parameters())
    lines += ["-" * (width + 35), f"Total params: {total:,}"]
    return "\n".join(lines)


def save_trained(path, model: ResNet9, model_params, mean, std, classes, extra: dict) -> None:
    """Weights plus what is needed to use them later: the model config, normalisation and class names."""
    state = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "model": asdict(model_params), "mean": list(mean), "std": list(std), "classes": list(classes), **extra}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)  # a file object: the records inside are not named after the temporary file


def load_trained(path) -> tuple[ResNet9, dict]:
    """The model (eval mode, on the CPU) and the saved record (mean, std, classes, ...). Only tensors and plain
    values are unpickled (weights_only): a shared model file cannot run code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: missing (run the train stage)") from None
    except Exception as exc:  # truncated, not a torch file, or holding more than weights
        raise DataError(f"{path}: not a readable model file ({type(exc).__name__}: {exc})") from None
    cfg = state["model"]
    model = ResNet9(tuple(cfg["channels"]), logit_scale=cfg["logit_scale"])
    model.load_state_dict(state["state_dict"])
    return model.eval(), state


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cifar_resnet.model",
        description="Print the network's layer-by-layer summary (output shapes, parameter counts, total).")
    parser.add_argument("channels", nargs="*", type=int,
                        help="the four widths (prep, layer1, layer2, layer3); default: model.channels of params.yaml")
    args = parser.parse_args(argv)
    if args.channels and len(args.channels) != 4:
        parser.error(f"expected 4 channel widths, got {len(args.channels)}")
    if args.channels:
        model = ResNet9(tuple(args.channels))
    else:
        try:
            model = build_model(load_params().model)
        except ParamsError as exc:
            parser.exit(1, f"error: {exc}\n")
    print(summary(model))


if __name__ == "__main__":
    main()
