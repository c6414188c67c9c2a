"""Stage `gallery`: PNGs a person can open anywhere: the most confident mistakes, loss/accuracy curves and the
LR schedule the run used."""

from cifar_resnet.runtime import start_stage_process

start_stage_process(fast_allocator=False)  # before any third-party import: see its docstring

import json  # noqa: E402

import numpy as np  # noqa: E402

from cifar_resnet.cli import log, run_stage  # noqa: E402
from cifar_resnet.config import load_params  # noqa: E402
from cifar_resnet.data import load_cifar10  # noqa: E402
from cifar_resnet.paths import (CURVES_PNG, DATA_DIR, GALLERY_PNG, PREDICTIONS, SCHEDULE_PNG,  # noqa: E402
                                TRAIN_HISTORY, TRAIN_JSON)
from cifar_resnet.report import curves_figure, gallery_figure, schedule_figure  # noqa: E402
from cifar_resnet.schedule import OneCycle  # noqa: E402


def read_history(path) -> list[dict]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in zip(header, line.split("\t"))} for line in lines[1:]]


def main() -> None:
    params = load_params()
    g = params.gallery
    saved = np.load(PREDICTIONS)
    probs, labels = saved["probs"], saved["labels"]
    data = load_cifar10(DATA_DIR, test_limit=params.data.test_limit)
    pred, conf = probs.argmax(1), probs.max(1)
    wrong = np.flatnonzero(pred != labels)
    shown = wrong[np.argsort(-conf[wrong], kind="stable")][: g.num_images]
    gallery_figure(GALLERY_PNG, data.test_images.numpy()[shown], labels[shown], pred[shown], conf[shown],
                   data.classes, g.columns)
    curves_figure(CURVES_PNG, read_history(TRAIN_HISTORY))
    train = json.loads(TRAIN_JSON.read_text())
    schedule = OneCycle.for_run(train["lr_min"], train["lr_max"], params.train.epochs, params.train.peak_epoch,
                                train["steps_per_epoch"])
    schedule_figure(SCHEDULE_PNG, [schedule(s) for s in range(schedule.total_steps)], train["steps_per_epoch"])
    log(f"gallery: {len(shown)} of {len(wrong)} misclassified test images drawn; curves and schedule plotted")


if __name__ == "__main__":
    run_stage(main)
