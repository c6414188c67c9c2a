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

from cifar_resnet.atomic import write_torch
from cifar_resnet.config import ModelParams, load_params
from cifar_resnet.errors import DataError, ParamsError


def activation(name: str = "relu", celu_alpha: float = 0.075) -> nn.Module:
    return nn.ReLU(inplace=True) if name == "relu" else nn.CELU(alpha=celu_alpha, inplace=True)


def conv_bn(c_in: int, c_out: int, pool: bool = False, act=activation) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(c_out), act()]
    return nn.Sequential(*layers)


class Whitening(nn.Module):
    """A frozen 3x3 convolution onto the 27 principal axes of the training images' 3x3 patches, each scaled to unit
    variance (Page's patch whitening). Followed by a learned 1x1 convolution it spans the same functions as a 3x3
    convolution: a reparametrisation that makes the first layer's inputs decorrelated. The filters are a buffer,
    so they travel in model.pt."""

    def __init__(self, eps: float = 1e-2):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.zeros(27, 3, 3, 3))

    @torch.no_grad()
    def fit(self, images: torch.Tensor, chunk: int = 500) -> None:
        """Set the filters from normalised float images (N, 3, H, W), on the host, in float64 (chunked: the patches
        of 10,000 images would take gigabytes at once)."""
        total, outer, n = torch.zeros(27, dtype=torch.float64), torch.zeros(27, 27, dtype=torch.float64), 0
        for start in range(0, len(images), chunk):
            part = images[start:start + chunk].unfold(2, 3, 1).unfold(3, 3, 1)  # (B, 3, H-2, W-2, 3, 3)
            patches = part.permute(0, 2, 3, 1, 4, 5).reshape(-1, 27).double()
            total += patches.sum(0)
            outer += patches.T @ patches
            n += len(patches)
        mean = total / n
        eigenvalues, eigenvectors = torch.linalg.eigh(outer / n - torch.outer(mean, mean))
        filters = eigenvectors.T / (eigenvalues[:, None] + self.eps).sqrt()
        self.weight.copy_(filters.reshape(27, 3, 3, 3).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight.to(x.dtype), padding=1)


class Residual(nn.Module):
    """X = conv-pool-BN-ReLU(input); output X + (conv-BN-ReLU-conv-BN-ReLU)(X)."""

    def __init__(self, c_in: int, c_out: int, act=activation):
        super().__init__()
        self.pre = conv_bn(c_in, c_out, pool=True, act=act)
        self.res = nn.Sequential(conv_bn(c_out, c_out, act=act), conv_bn(c_out, c_out, act=act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        return x + self.res(x)


class ResNet9(nn.Module):
    def __init__(self, channels=(64, 128, 256, 512), num_classes: int = 10, logit_scale: float = 0.125,
                 activation_name: str = "relu", celu_alpha: float = 0.075, whitening: bool = False):
        super().__init__()
        c0, c1, c2, c3 = channels

        def act():
            return activation(activation_name, celu_alpha)

        if whitening:  # same widths and layers after it: whitening (27) -> 1x1 conv -> BN -> activation
            self.prep = nn.Sequential(Whitening(), nn.Conv2d(27, c0, kernel_size=1, bias=False), nn.BatchNorm2d(c0),
                                      act())
        else:
            self.prep = conv_bn(3, c0, act=act)
        self.layer1 = Residual(c0, c1, act=act)
        self.layer2 = conv_bn(c1, c2, pool=True, act=act)
        self.layer3 = Residual(c2, c3, act=act)
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

    def whitening(self) -> Whitening | None:
        first = self.prep[0]
        return first if isinstance(first, Whitening) else None


WHITENING_IMAGES = 10_000  # the training images whose patches set the whitening filters (plenty for 27 axes)


def fit_whitening(model: ResNet9, train_images: torch.Tensor, mean, std) -> None:
    """Fit the whitening filters (if the model has them) on the first training images, normalised as in training."""
    whitening = model.whitening()
    if whitening is not None:
        images = train_images[:WHITENING_IMAGES].float()
        stats = [torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (mean, std)]
        whitening.fit((images - stats[0]) / stats[1])


def build_model(model_params) -> ResNet9:
    return ResNet9(tuple(model_params.channels), logit_scale=model_params.logit_scale,
                   activation_name=model_params.activation, celu_alpha=model_params.celu_alpha,
                   whitening=model_params.whitening)


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
    write_torch(path, state)


def load_trained(path) -> tuple[ResNet9, dict]:
    """The model (eval mode, on the CPU) and the saved record (mean, std, classes, ...). Only tensors and plain
    values are unpickled (weights_only): a shared model file cannot run code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: missing (run the train stage)") from None
    except Exception as exc:  # truncated, not a torch file, or holding more than weights
        raise DataError(f"{path}: not a readable model file ({type(exc).__name__}: {exc})") from None
    try:  # keys a file predates take ModelParams' defaults
        model = build_model(ModelParams(**{**state["model"], "channels": tuple(state["model"]["channels"])}))
        model.load_state_dict(state["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise DataError(f"{path}: weights do not fit the network it describes ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0]})") from None
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
