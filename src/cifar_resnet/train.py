"""The training loop: One Cycle SGD, per-epoch evaluation, checkpoints to resume from, divergence caught.

Runs as one process or as one rank of a torchrun/DistributedDataParallel job (rank 0 alone writes files).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from cifar_resnet import checkpoint as ckpt
from cifar_resnet.augment import Loader
from cifar_resnet.errors import DivergedError
from cifar_resnet.model import build_model
from cifar_resnet.runtime import Runtime
from cifar_resnet.schedule import OneCycle


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


@dataclass
class TrainResult:
    model: torch.nn.Module
    history: list[dict] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    images_per_second: float = 0.0
    resumed_from: int | None = None


def make_optimizer(model, tp) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.0, momentum=tp.momentum, nesterov=tp.nesterov,
                           weight_decay=tp.weight_decay)


@torch.no_grad()
def evaluate_loader(model, loader: Loader, runtime: Runtime) -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy, softmax probabilities) over every image of an unaugmented loader."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    probs = []
    for x, y in loader.epoch(0):
        with runtime.autocast():
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        probs.append(torch.softmax(logits, dim=1))
    model.train(was_training)
    probs = torch.cat(probs)
    correct = (probs.argmax(1) == loader.labels).sum()
    n = len(loader.labels)
    return (loss_sum / n).item(), (correct.double() / n).item(), probs


class DivergenceWatch:
    """Remembers the first step whose loss is not finite or above `max_loss`, without a host sync per step (it is
    read every `every` steps). A batch-normalised network can blow up without ever producing a NaN: its loss then
    climbs by orders of magnitude, which the ceiling catches."""

    def __init__(self, device, every: int, max_loss: float = float("inf")):
        self.every, self.max_loss = every, max_loss
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        value = loss.detach()
        bad = (~torch.isfinite(value) | (value > self.max_loss)) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)
        self.bad_loss = torch.where(bad, loss.detach().float(), self.bad_loss)

    def check(self, schedule: OneCycle, steps_per_epoch: int, dist: Dist) -> None:
        first = self.first_bad.clone()
        if dist.world_size > 1:  # every rank stops together, at the earliest bad step of any
            first = torch.where(first < 0, torch.full_like(first, 2**62), first)
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
            first = torch.where(first == 2**62, torch.full_like(first, -1), first)
        step = int(first.item())
        if step >= 0:
            raise DivergedError(epoch=step // steps_per_epoch + 1, step=step % steps_per_epoch + 1,
                                steps_per_epoch=steps_per_epoch, lr=schedule(step), loss=float(self.bad_loss.item()))


def train(params, data, mean, std, lr_max: float, lr_min: float, runtime: Runtime, dist: Dist = Dist(),
          run_key: str | None = None, log=print) -> TrainResult:
    """Train from scratch, or resume the checkpoint stored under `run_key`; return the model and its history."""
    tp = params.train
    torch.manual_seed(params.seed)  # weight initialisation
    model = build_model(params.model).to(runtime.device, memory_format=runtime.memory_format)
    optimizer = make_optimizer(model, tp)
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.precision == "fp16")

    train_loader = Loader(data.train_images, data.train_labels, tp.batch_size, mean, std, runtime.device,
                          aug=params.augment, seed=params.seed, rank=dist.rank, world_size=dist.world_size,
                          memory_format=runtime.memory_format)
    if len(train_loader) == 0:
        from cifar_resnet.errors import ParamsError

        raise ParamsError(f"train.batch_size: {tp.batch_size} is more than the {len(data.train_images)} "
                          "training images; lower it or raise data.train_limit")
    eval_loaders = {}
    if dist.is_main:
        for split in ("val", "test"):
            images = getattr(data, f"{split}_images")
            if len(images):
                eval_loaders[split] = Loader(images, getattr(data, f"{split}_labels"), params.evaluate.batch_size,
                                             mean, std, runtime.device, memory_format=runtime.memory_format)
    steps = len(train_loader)
    schedule = OneCycle.for_run(lr_min, lr_max, tp.epochs, tp.peak_epoch, steps)

    result = TrainResult(model)
    start_epoch = 1
    if run_key is not None:
        state = ckpt.load(run_key, log=log if dist.is_main else (lambda *_: None))
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            result.history, result.epoch_seconds = state["history"], state["epoch_seconds"]
            start_epoch = state["epoch"] + 1
            result.resumed_from = start_epoch
            if dist.is_main:
                log(f"Resuming from epoch {start_epoch}")

    net = model
    if dist.world_size > 1:
        if tp.sync_bn:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    if tp.compile:
        net = torch.compile(net)

    on_cpu = runtime.device.type == "cpu"
    watch = DivergenceWatch(runtime.device, every=1 if on_cpu else 20, max_loss=tp.max_loss)
    progress = _progress_factory()
    for epoch in range(start_epoch, tp.epochs + 1):
        t0 = time.perf_counter()
        net.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
        correct = torch.zeros((), dtype=torch.long, device=runtime.device)
        seen = 0
        bar = progress(total=steps, desc=f"epoch {epoch}/{tp.epochs}", disable=not dist.is_main)
        for i, (x, y) in enumerate(train_loader.epoch(epoch)):
            step = (epoch - 1) * steps + i
            lr = schedule(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with runtime.autocast():
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y)
            watch.update(loss, step)
            if (i + 1) % watch.every == 0:
                watch.check(schedule, steps, dist)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            if bar.disable is False and (on_cpu or i % 10 == 0):
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4f}", refresh=False)
            bar.update(1)
        bar.close()
        watch.check(schedule, steps, dist)

        totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64,
                                                                          device=runtime.device)])
        if dist.world_size > 1:
            torch.distributed.all_reduce(totals)
        row = {"epoch": epoch, "lr": schedule(epoch * steps - 1),
               "train_loss": round((totals[0] / totals[2]).item(), 6),
               "train_acc": round((totals[1] / totals[2]).item(), 6)}
        for split, loader in eval_loaders.items():
            loss_value, acc, _ = evaluate_loader(model, loader, runtime)
            row[f"{split}_loss"], row[f"{split}_acc"] = round(loss_value, 6), round(acc, 6)
        seconds = time.perf_counter() - t0
        result.history.append(row)
        result.epoch_seconds.append(round(seconds, 2))
        if dist.is_main:
            if run_key is not None:  # saved before the epoch is reported: a reported epoch is never lost
                ckpt.save(run_key, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "scaler": scaler.state_dict(), "epoch": epoch, "history": result.history,
                                    "epoch_seconds": result.epoch_seconds})
            log(_epoch_line(row, tp.epochs, seconds, seen * dist.world_size / seconds))
        if dist.world_size > 1:
            torch.distributed.barrier()
    if result.epoch_seconds:
        n_train = steps * tp.batch_size
        result.images_per_second = round(n_train * len(result.epoch_seconds) / sum(result.epoch_seconds), 1)
    return result


def _epoch_line(row: dict, epochs: int, seconds: float, img_per_s: float) -> str:
    parts = [f"epoch {row['epoch']:>2}/{epochs}", f"lr {row['lr']:.4f}",
             f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"]
    for split in ("val", "test"):
        if f"{split}_acc" in row:
            parts.append(f"{split} loss {row[f'{split}_loss']:.4f} acc {row[f'{split}_acc']:.4f}")
    parts.append(f"{seconds:.1f}s ({img_per_s:.0f} img/s)")
    return " | ".join(parts)


def _progress_factory():
    """tqdm bars on a terminal; nothing otherwise (the per-epoch log line is the record under nohup)."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()

    def make(**kwargs):
        disable = kwargs.pop("disable", False) or not interactive
        return tqdm(leave=False, disable=disable, **kwargs)

    return make


def checkpoint_config(params, lr_max: float, lr_min: float, world_size: int) -> dict:
    """What a checkpoint must agree on to be resumed: the params train reads, the resolved LRs, the process count."""
    return {"seed": params.seed, "lr_max": lr_max, "lr_min": lr_min, "data": asdict(params.data),
            "model": asdict(params.model), "augment": asdict(params.augment), "train": asdict(params.train),
            "evaluate": asdict(params.evaluate), "world_size": world_size}
