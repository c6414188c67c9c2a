"""Stage `train`: One Cycle SGD for train.epochs epochs; per-epoch history, final metrics and the weights.

LRMAX is `lr_max` from params.yaml when it is a number, else the lr_range_test stage's pick. With train.nproc > 1
the stage relaunches itself under torchrun (DistributedDataParallel; rank 0 writes every file). A killed run
resumes from its last finished epoch when the stage runs again with the same params and code; while one run of a
config is live, a second one fails at once. While it runs, dvclive/ holds the epochs done so far (cifar_resnet.live),
for `dvc exp show` and the DVC VS Code extension.
"""

from cifar_resnet.bootstrap import start_stage_process

start_stage_process(fast_allocator=True)  # before torch is imported: see its docstring

import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402

from cifar_resnet import checkpoint  # noqa: E402
from cifar_resnet.atomic import write_json, write_text, write_tsv  # noqa: E402
from cifar_resnet.config import load_params, resolve_lr_max  # noqa: E402
from cifar_resnet.data import expected_md5s, load_configured  # noqa: E402
from cifar_resnet.distributed import Dist, process_group, relaunch_under_torchrun, under_torchrun  # noqa: E402
from cifar_resnet.errors import CifarResnetError, DivergedError  # noqa: E402
from cifar_resnet.live import LiveHistory, wanted as live_wanted  # noqa: E402
from cifar_resnet.model import save_trained, summary  # noqa: E402
from cifar_resnet.paths import (DATA_DIR, LR_RANGE_JSON, MODEL, MODEL_SUMMARY, TRAIN_HISTORY,  # noqa: E402
                                TRAIN_JSON, TRAIN_TIMING)
from cifar_resnet.runtime import accelerator_names, cpu_model, pick_runtime, synchronize  # noqa: E402
from cifar_resnet.stage_door import rank_log, run_stage  # noqa: E402
from cifar_resnet.timing import PartTimer  # noqa: E402
from cifar_resnet.train import train  # noqa: E402


def main() -> None:
    timer = PartTimer()
    params = load_params()
    if params.train.nproc > 1 and not under_torchrun():
        rc = relaunch_under_torchrun(params.train.nproc, sys.argv)
        if rc:
            raise CifarResnetError(f"training with {params.train.nproc} processes failed (exit code {rc}); "
                                   "the worker's message is above")
        return
    dist = Dist.from_env()
    with process_group(dist, params.train.device):
        run(params, dist, timer)


def run(params, dist: Dist, timer: PartTimer) -> None:
    started = time.perf_counter()
    log = rank_log(dist.is_main)
    runtime = pick_runtime(params.train, dist.local_rank, dist.local_world_size)
    timer.sync = partial(synchronize, runtime.device)
    range_test = json.loads(LR_RANGE_JSON.read_text()) if LR_RANGE_JSON.is_file() else None
    lr_max, lr_min, source = resolve_lr_max(params, range_test)
    with timer.part("data"):
        data = load_configured(DATA_DIR, params.data)
        mean, std = data.mean_std()
    key, identity = checkpoint.run_identity(params, lr_max, lr_min, runtime, dist.world_size, expected_md5s())
    # Rank 0 holds the checkpoint folder from here until it is removed: no other live run of this config uses it.
    with checkpoint.claimed(key, identity, log=log) if dist.is_main else contextlib.nullcontext():
        if dist.is_main:  # once this run holds its own folder: however old, that one is resumed, not pruned
            checkpoint.prune(log=log)
        log(f"train: {len(data.train_images)} images ({len(data.val_images)} held out for validation), "
            f"LRMAX {lr_max:.4g} from {source}, LRMIN {lr_min:.4g}, {runtime.describe()}, "
            f"{dist.world_size} process(es)")
        # Live per-epoch metrics (dvclive/, apart from the final files below): rank 0 writes them after every epoch
        # (unless CIFAR_RESNET_LIVE=off: a run without DVC).
        live = LiveHistory() if dist.is_main and live_wanted() else None
        try:
            # The model's set-up, the data's copy to the device, a compile (in the first epoch) and the per-epoch
            # evaluation included: per_epoch shows the first epoch's excess.
            with timer.part("training"):
                result = train(params, data, mean, std, lr_max, lr_min, runtime, dist, run_key=key, log=log,
                               on_epoch=live, started=started)
        except DivergedError:
            if dist.is_main:
                checkpoint.remove(key)  # resuming would only diverge again
            raise
        finally:
            if live is not None:
                live.close()
        if dist.is_main:
            write_outputs(params, data, mean, std, result, runtime, dist, lr_max, lr_min, source, started, log, timer)
            checkpoint.remove(key)


def write_outputs(params, data, mean, std, result, runtime, dist, lr_max, lr_min, source, started, log,
                  timer: PartTimer) -> None:
    """The weights and their summary, the history, the timing, and last the metrics (each file atomic)."""
    last = result.history[-1]
    metrics = {"lr_max": lr_max, "lr_min": lr_min, "lr_source": source, "epochs": params.train.epochs,
               "steps_per_epoch": len(data.train_images) // params.train.batch_size,
               **{k: v for k, v in last.items() if k not in ("epoch", "lr")}}
    # A resumed run's wall time counts its earlier processes too (up to their last checkpoint).
    timing = {"seconds_total": round(result.seconds_before + time.perf_counter() - started, 1),
              "seconds_training": round(sum(result.epoch_seconds), 1), "seconds_per_epoch": result.epoch_seconds,
              # dvc.yaml declares this file as a plot (wall time per epoch), not as a metric: the per-epoch seconds
              # again as records to draw, and no empty list anywhere (DVC's plot parser fails on one).
              "per_epoch": [{"epoch": row["epoch"], "seconds": seconds}
                            for row, seconds in zip(result.history, result.epoch_seconds)],
              "images_per_second": result.images_per_second, "device": runtime.device.type,
              "cpu": cpu_model(), "gpu": accelerator_names(runtime.device) or None, "precision": runtime.precision,
              "channels_last": runtime.channels_last,
              "threads": runtime.threads, "processes": dist.world_size, "resumed_from_epoch": result.resumed_from,
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    with timer.part("outputs"):
        save_trained(MODEL, result.model, params.model, mean, std, data.classes,
                     {"lr_max": lr_max, "lr_min": lr_min, "epochs": params.train.epochs})
        write_text(MODEL_SUMMARY, summary(result.model.cpu().float()) + "\n")
        write_tsv(TRAIN_HISTORY, result.history)
    # This process's parts (from its start) beside the run's totals: `parts` is an object, not records, so that
    # the per-epoch chart's records stay the only list in the file.
    write_json(TRAIN_TIMING, {**timing, **timer.record()})
    write_json(TRAIN_JSON, metrics)
    split = next((s for s in ("test", "val") if f"{s}_acc" in last), None)
    score = f"{split} accuracy {last[f'{split}_acc']:.4f}" if split else "no per-epoch evaluation"
    log(f"done: {score} after {params.train.epochs} epochs ({timing['seconds_total']:.0f} s, "
        f"{result.images_per_second:.0f} img/s)")


if __name__ == "__main__":
    run_stage(main, __doc__)
