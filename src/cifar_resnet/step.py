"""One run setup and the one training step: used by the training loop, the LR range test and `make bench`.

`setup_run` makes what every run starts from (the seeded model with its whitening fitted, on the device; the
training loader; the optimizer and the gradient scaler), so that the three runs start alike.

A step sets the LR, runs the forward pass under the runtime's autocast, takes the cross-entropy of the float32
logits, and applies SGD through a gradient scaler (active only in fp16, where small gradients would underflow;
a no-op otherwise). A `DivergenceWatch` may ride along: it notes a bad loss on the device and reads it every few steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cifar_resnet.errors import DivergedError, ParamsError
from cifar_resnet.loader import TrainLoader
from cifar_resnet.model import build_model, fit_whitening


@dataclass
class RunSetup:
    """What a training run starts from."""

    model: torch.nn.Module  # on the runtime's device and in its memory format
    optimizer: torch.optim.SGD
    scaler: torch.amp.GradScaler
    loader: TrainLoader  # this rank's share of every global batch; never empty


def setup_run(params, data, mean, std, runtime, rank: int = 0, world_size: int = 1) -> RunSetup:
    """The model drawn from `params.seed` with its whitening fitted on `data`'s training split, moved to the
    runtime's device; the training loader of rank `rank` of `world_size`; SGD and the gradient scaler. A batch size
    above the training images (an empty loader) is a ParamsError naming train.batch_size."""
    torch.manual_seed(params.seed)
    with torch.device("cpu"):  # weights drawn on the host from the seed: the same start on every device
        model = build_model(params.model)
        fit_whitening(model, data.train_images, mean, std)
    model = model.to(runtime.device, memory_format=runtime.memory_format)
    batch_size = params.train.batch_size
    loader = TrainLoader(data.train_images, data.train_labels, batch_size, mean, std, runtime.device,
                         aug=params.augment, seed=params.seed, rank=rank, world_size=world_size,
                         memory_format=runtime.memory_format)
    if len(loader) == 0:
        raise ParamsError(f"train.batch_size: {batch_size} is more than the {len(data.train_images)} "
                          "training images; lower it or raise data.train_limit")
    return RunSetup(model, make_optimizer(model, params.train), make_scaler(runtime), loader)


def make_optimizer(model: torch.nn.Module, train_params) -> torch.optim.SGD:
    """SGD with the recipe's momentum and weight decay; the LR is set by every step (times each group's
    `lr_scale`). With `frozen_bn_scales` the BatchNorm scales stay at 1 and the BatchNorm biases learn
    `bn_bias_lr_factor` times faster with that much less weight decay (Page). On CUDA the fused kernel: one launch
    for all parameters, and with fp16 it reads the scaler's inf flag on the device (foreach SGD would copy it to the
    host every step)."""
    groups = [{"params": list(model.parameters()), "lr_scale": 1.0}]
    if train_params.frozen_bn_scales:
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for bn in bns:
            bn.weight.requires_grad_(False)
        special = {id(p) for bn in bns for p in (bn.weight, bn.bias)}
        groups = [{"params": [p for p in model.parameters() if id(p) not in special], "lr_scale": 1.0},
                  {"params": [bn.bias for bn in bns], "lr_scale": train_params.bn_bias_lr_factor,
                   "weight_decay": train_params.weight_decay / train_params.bn_bias_lr_factor}]
    on_cuda = next(model.parameters()).device.type == "cuda"
    return torch.optim.SGD(groups, lr=0.0, momentum=train_params.momentum, nesterov=train_params.nesterov,
                           weight_decay=train_params.weight_decay, fused=True if on_cuda else None)


def make_scaler(runtime) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cuda", enabled=runtime.precision == "fp16")


def train_step(net, optimizer, scaler, runtime, x, y, lr: float, watch=None, step: int = 0,
               momentum: float | None = None, label_smoothing: float = 0.0):
    """One SGD step on the batch (x, y) at learning rate `lr` (and `momentum`, when it is scheduled too);
    returns the (loss, logits), detached."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
        if momentum is not None:
            group["momentum"] = momentum
    with runtime.autocast():
        logits = net(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    if watch is not None:
        watch.update(loss, step)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), logits.detach()


def sync_every(device: torch.device) -> int:
    """How many steps pass between host reads of the device: on the CPU a read costs nothing; on an accelerator each
    one stalls its queue."""
    return 1 if device.type == "cpu" else 20


class DivergenceWatch:
    """Remembers the first step whose loss is not finite or above `max_loss` on the device, and raises
    DivergedError when read: every few steps (a host sync), and at the end of each epoch. A batch-normalised
    network can blow up without ever producing a NaN: its loss then climbs by orders of magnitude, which the ceiling
    catches. `lr_of(step)` and `steps_per_epoch` name the bad step in the message."""

    def __init__(self, device: torch.device, max_loss: float, lr_of, steps_per_epoch: int, world_size: int = 1):
        self.every = sync_every(device)
        self.max_loss, self.lr_of = max_loss, lr_of
        self.steps_per_epoch, self.world_size = steps_per_epoch, world_size
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        value = loss.detach().float()
        # NaN fails every comparison, so one `<=` catches NaN, inf and the ceiling; only the first bad step is kept.
        bad = ~(value <= self.max_loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, step, self.first_bad)
        self.bad_loss = torch.where(bad, value, self.bad_loss)
        if (step + 1) % self.every == 0:
            self.check()

    def check(self) -> None:
        """Raise DivergedError naming the first bad step and its loss; under DDP the earliest of any rank's, with
        the loss of the rank that had it, so that every rank stops together and says the same."""
        first, loss = self.first_bad, self.bad_loss
        if self.world_size > 1:
            # One collective for both: float64 holds any step exactly (DDP runs on CPUs and CUDA, never on MPS).
            pairs = gather(torch.stack([first.double(), loss.double()]), self.world_size)
            first, loss = earliest(pairs[:, 0].long(), pairs[:, 1])
        step = int(first.item())
        if step >= 0:
            raise DivergedError(epoch=step // self.steps_per_epoch + 1, step=step % self.steps_per_epoch + 1,
                                steps_per_epoch=self.steps_per_epoch, lr=self.lr_of(step), loss=float(loss.item()))


def gather(value: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's `value`, stacked in rank order, on every rank."""
    values = [torch.empty_like(value) for _ in range(world_size)]
    torch.distributed.all_gather(values, value)
    return torch.stack(values)


def earliest(first_bad: torch.Tensor, bad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Of per-rank first bad steps (-1: none) and their losses: the earliest step and the loss of the rank that had
    it (the lowest such rank on a tie); (-1, a loss of no meaning) when no rank had one."""
    key = torch.where(first_bad < 0, torch.full_like(first_bad, 2**62), first_bad)
    rank = key.argmin()
    return first_bad[rank], bad_loss[rank]
