"""Stage `gallery`: PNGs a person can open anywhere: the most confident mistakes (on the split the evaluate stage
reports), loss/accuracy curves and the LR schedule the run used."""

from cifar_resnet.bootstrap import start_stage_process

start_stage_process(fast_allocator=False)  # before any third-party import: see its docstring

import json  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cifar_resnet.config import evaluation_split, load_params  # noqa: E402
from cifar_resnet.data import load_split  # noqa: E402
from cifar_resnet.figures import curves_figure, gallery_figure, schedule_figure  # noqa: E402
from cifar_resnet.paths import (CURVES_PNG, DATA_DIR, GALLERY_PNG, GALLERY_TIMING, PREDICTIONS,  # noqa: E402
                                SCHEDULE_PNG, TRAIN_HISTORY, TRAIN_JSON)
from cifar_resnet.schedule import OneCycle  # noqa: E402
from cifar_resnet.stage_door import log, run_stage  # noqa: E402
from cifar_resnet.timing import PartTimer  # noqa: E402


def main() -> None:
    timer = PartTimer()
    params = load_params()
    with timer.part("data"):
        saved = np.load(PREDICTIONS)
        probs, labels = saved["probs"], saved["labels"]
        test = load_split(DATA_DIR, evaluation_split(params), params.data)  # the split evaluate predicted
        history = pd.read_csv(TRAIN_HISTORY, sep="\t").to_dict("records")
        train = json.loads(TRAIN_JSON.read_text())
    pred, conf = probs.argmax(1), probs.max(1)
    wrong = np.flatnonzero(pred != labels)
    shown = wrong[np.argsort(-conf[wrong], kind="stable")][: params.gallery.num_images]
    schedule = OneCycle.for_run(train["lr_min"], train["lr_max"], params.train.epochs, params.train.peak_epoch,
                                train["steps_per_epoch"])
    with timer.part("figures"):
        gallery_figure(GALLERY_PNG, test.images.numpy()[shown], labels[shown], pred[shown], conf[shown],
                       test.classes, params.gallery.columns)
        curves_figure(CURVES_PNG, history)
        schedule_figure(SCHEDULE_PNG, [schedule(s) for s in range(schedule.total_steps)], train["steps_per_epoch"])
    timer.write(GALLERY_TIMING)
    log(f"gallery: {len(shown)} of {len(wrong)} misclassified images drawn; curves and schedule plotted")


if __name__ == "__main__":
    run_stage(main, __doc__)
