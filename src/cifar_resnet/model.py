"""The network: Page's ResNet-9 variant of the seed recipe.

PrepLayer conv(64)-BN-ReLU; Layer1 X = conv(128)-MaxPool(2)-BN-ReLU, out X + (conv-BN-ReLU-conv-BN-ReLU)(X);
Layer2 conv(256)-MaxPool(2)-BN-ReLU; Layer3 like Layer1 at 512; MaxPool(4); Linear(512, 10); softmax (inside the
loss for training, explicit for predictions). All convolutions 3x3, stride 1, padding 1, no bias.
Run `python -m cifar_resnet.model` for the layer-by-layer summary.
"""

from __future__ import annotations

import torch
from torch import nn


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
    from dataclasses import asdict

    from cifar_resnet.io import atomic_path

    state = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "model": asdict(model_params), "mean": list(mean), "std": list(std), "classes": list(classes), **extra}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_trained(path) -> tuple[ResNet9, dict]:
    """The model (eval mode, on the CPU) and the saved record (mean, std, classes, ...)."""
    from cifar_resnet.errors import DataError

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise DataError(f"{path}: missing (run the train stage)") from None
    except Exception as exc:  # truncated or not a torch file
        raise DataError(f"{path}: not a readable model file ({type(exc).__name__}: {exc})") from None
    cfg = state["model"]
    model = ResNet9(tuple(cfg["channels"]), logit_scale=cfg["logit_scale"])
    model.load_state_dict(state["state_dict"])
    return model.eval(), state


if __name__ == "__main__":
    import sys

    from cifar_resnet.config import load_params

    channels = load_params().model if len(sys.argv) < 2 else None
    print(summary(build_model(channels) if channels else ResNet9(tuple(int(c) for c in sys.argv[1:]))))
