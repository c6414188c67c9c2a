"""The training loop: One Cycle SGD, per-epoch evaluation, checkpoints to resume from, divergence caught.

Runs as one process or as one rank of a torchrun/DistributedDataParallel job (rank 0 alone evaluates and writes).
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field

import torch

from cifar_resnet import checkpoint
from cifar_resnet.config import held_out_split
from cifar_resnet.distributed import Dist
from cifar_resnet.evaluate import evaluate
from cifar_resnet.loader import EvalLoader, TrainLoader
from cifar_resnet.ema import WeightEMA
from cifar_resnet.runtime import Runtime
from cifar_resnet.schedule import OneCycle
from cifar_resnet.step import DivergenceWatch, setup_run, train_step


@dataclass
class TrainResult:
    model: torch.nn.Module
    history: list[dict] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    images_per_second: float = 0.0
    resumed_from: int | None = None
    seconds_before: float = 0.0  # a resumed run: the wall time of its earlier processes, up to their last checkpoint


@dataclass
class TrainingRun:
    """Everything one epoch needs."""

    model: torch.nn.Module  # the bare model: evaluated and saved
    net: torch.nn.Module  # what trains: the model, maybe wrapped in DDP and compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: TrainLoader
    schedule: OneCycle
    watch: DivergenceWatch
    runtime: Runtime
    dist: Dist
    ema: WeightEMA | None
    train_params: object  # label smoothing, cycled momentum


def train(params, data, mean, std, lr_max: float, lr_min: float, runtime: Runtime, dist: Dist = Dist(),
          run_key: str | None = None, log=print, on_epoch=None, started: float | None = None) -> TrainResult:
    """Train from scratch, or resume the checkpoint stored under `run_key`; return the model and its history.
    `on_epoch(history)` is called on rank 0 after each epoch (live metrics). `started`: the time.perf_counter() at
    which the run (the stage) started, else now; a checkpoint carries the wall time since then, and the earlier
    processes' before that."""
    started = time.perf_counter() if started is None else started
    train_params = params.train
    setup = setup_run(params, data, mean, std, runtime, rank=dist.rank, world_size=dist.world_size)
    model, loader = setup.model, setup.loader
    schedule = OneCycle.for_run(lr_min, lr_max, train_params.epochs, train_params.peak_epoch, len(loader))
    watch = DivergenceWatch(runtime.device, max_loss=train_params.max_loss, lr_of=schedule, steps_per_epoch=len(loader),
                            world_size=dist.world_size)
    ema = WeightEMA(model, train_params.ema_decay, train_params.ema_every) if train_params.ema_decay else None
    run = TrainingRun(model, model, setup.optimizer, setup.scaler, loader, schedule, watch, runtime, dist, ema,
                      train_params)
    result = TrainResult(model)
    start_epoch = _resume(run, result, run_key, log) if run_key is not None else 1
    run.net = _parallel(model, train_params, runtime, dist)
    eval_loaders = _eval_loaders(params, data, mean, std, runtime) if dist.is_main else {}
    result.model = copy.deepcopy(model) if ema else model  # what is evaluated and saved: the EMA when on
    for epoch in range(start_epoch, train_params.epochs + 1):
        t0 = time.perf_counter()
        row, seen = _train_epoch(run, epoch, train_params.epochs)
        if ema:
            ema.copy_to(result.model)
        if epoch % train_params.eval_every == 0 or epoch == train_params.epochs:
            for split, eval_loader in eval_loaders.items():
                loss, acc, _ = evaluate(result.model, eval_loader, runtime)
                row[f"{split}_loss"], row[f"{split}_acc"] = round(loss, 6), round(acc, 6)
        seconds = time.perf_counter() - t0
        result.history.append(row)
        result.epoch_seconds.append(round(seconds, 2))
        if dist.is_main:
            # Saved before the epoch is reported: a reported epoch is never lost.
            if run_key is not None and epoch % train_params.checkpoint_every == 0 and epoch < train_params.epochs:
                so_far = result.seconds_before + time.perf_counter() - started
                checkpoint.save(run_key, _state(run, epoch, result, so_far))
            if on_epoch is not None:
                on_epoch(result.history)
            log(_epoch_line(row, train_params.epochs, seconds, seen * dist.world_size / seconds))
        if dist.world_size > 1:
            torch.distributed.barrier()
    if result.epoch_seconds:
        trained = len(loader) * train_params.batch_size * len(result.epoch_seconds)
        result.images_per_second = round(trained / sum(result.epoch_seconds), 1)
    return result


def _eval_loaders(params, data, mean, std, runtime) -> dict[str, EvalLoader]:
    """The loader of the split `train.eval_split` names, if it has images. auto: the validation split when
    data.val_size > 0, else the test split; with a validation split, no test number is computed unless asked for by
    name (train.eval_split: test)."""
    split = params.train.eval_split
    split = held_out_split(params) if split == "auto" else split
    if split == "none":
        return {}
    images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
    if not len(images):
        return {}
    return {split: EvalLoader(images, labels, params.evaluate.batch_size, mean, std, runtime.device,
                              memory_format=runtime.memory_format)}


def _resume(run: TrainingRun, result: TrainResult, run_key: str, log) -> int:
    """Load the checkpoint of `run_key` if there is one; return the first epoch still to train. Only rank 0 reads
    it and every rank gets rank 0's: ranks on other nodes may not see the same cache folder, and a rank that started
    afresh while the others resumed would train a different model (DDP syncs parameters only when it is built)."""
    state = checkpoint.load(run_key, log=log) if run.dist.is_main else None
    if run.dist.world_size > 1:
        box = [state]
        torch.distributed.broadcast_object_list(box, src=0)
        state = box[0]
    if state is None:
        return 1
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:  # into the EMA's own tensors: the checkpoint loads on the CPU, the model may not be
        for key, value in state["ema"].items():
            run.ema.state[key].copy_(value)
    result.history, result.epoch_seconds = state["history"], state["epoch_seconds"]
    result.seconds_before = state["seconds"]
    result.resumed_from = state["epoch"] + 1
    if run.dist.is_main:
        log(f"Resuming from epoch {result.resumed_from}")
    return result.resumed_from


def _state(run: TrainingRun, epoch: int, result: TrainResult, seconds: float) -> dict:
    """What a resumed run needs; `seconds`: the run's wall time so far, every process of it counted."""
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "epoch": epoch, "history": result.history,
            "epoch_seconds": result.epoch_seconds, "seconds": seconds, "ema": run.ema.state if run.ema else None}


def _parallel(model, train_params, runtime: Runtime, dist: Dist):
    """The model as it trains: DDP across processes (SyncBatchNorm if asked), compiled if asked."""
    net = model
    if dist.world_size > 1:
        if train_params.sync_bn:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    if train_params.compile:
        net = torch.compile(net)
    return net


def _train_epoch(run: TrainingRun, epoch: int, epochs: int) -> tuple[dict, int]:
    """Train one epoch; return its history row (LR at its end, mean training loss and accuracy) and the images
    this process saw. The step losses stay on the device until the epoch ends: no host sync per step, and the
    float64 totals are made on the host (MPS has no float64)."""
    device, steps = run.runtime.device, len(run.loader)
    run.net.train()
    losses, sizes = [], []
    correct = torch.zeros((), dtype=torch.long, device=device)
    bar = _progress(total=steps, desc=f"epoch {epoch}/{epochs}", disable=not run.dist.is_main)
    for i, (x, y) in enumerate(run.loader.epoch(epoch)):
        step = (epoch - 1) * steps + i
        momentum = run.schedule.momentum(step) if run.train_params.cycle_momentum else None
        loss, logits = train_step(run.net, run.optimizer, run.scaler, run.runtime, x, y, run.schedule(step),
                                  run.watch, step, momentum=momentum, label_smoothing=run.train_params.label_smoothing)
        if run.ema is not None:
            run.ema.update(run.model, step)
        losses.append(loss)
        sizes.append(len(y))
        correct += (logits.argmax(1) == y).sum()
        if not bar.disable and (device.type == "cpu" or i % 10 == 0):
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{run.schedule(step):.4f}", refresh=False)
        bar.update(1)
    bar.close()
    run.watch.check()
    loss_sum = 0.0
    for value, n in zip(torch.stack(losses).cpu().tolist(), sizes):
        loss_sum += value * n
    totals = [loss_sum, float(correct.item()), float(sum(sizes))]
    if run.dist.world_size > 1:
        reduced = torch.tensor(totals, dtype=torch.float64, device=device)  # CPU (gloo) or CUDA (NCCL) only
        torch.distributed.all_reduce(reduced)
        totals = reduced.tolist()
    row = {"epoch": epoch, "lr": run.schedule(epoch * steps - 1),
           "train_loss": round(totals[0] / totals[2], 6), "train_acc": round(totals[1] / totals[2], 6)}
    return row, sum(sizes)


def _epoch_line(row: dict, epochs: int, seconds: float, img_per_s: float) -> str:
    parts = [f"epoch {row['epoch']:>2}/{epochs}", f"lr {row['lr']:.4f}",
             f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"]
    for split in ("val", "test"):
        if f"{split}_acc" in row:
            parts.append(f"{split} loss {row[f'{split}_loss']:.4f} acc {row[f'{split}_acc']:.4f}")
    parts.append(f"{seconds:.1f}s ({img_per_s:.0f} img/s)")
    return " | ".join(parts)


def _progress(**kwargs):
    """A tqdm bar on a terminal; nothing otherwise (the per-epoch log line is the record under nohup)."""
    from tqdm import tqdm

    disable = kwargs.pop("disable", False) or not sys.stderr.isatty()
    return tqdm(leave=False, disable=disable, **kwargs)
