"""Stage `lr_range_test`: the LR range test on the training split; writes the LRMAX pick for the train stage."""

from cifar_resnet.bootstrap import start_stage_process

start_stage_process(fast_allocator=True)  # before torch is imported: see its docstring

import sys  # noqa: E402
from functools import partial  # noqa: E402

from cifar_resnet.atomic import write_json, write_tsv  # noqa: E402
from cifar_resnet.config import load_params  # noqa: E402
from cifar_resnet.data import load_configured  # noqa: E402
from cifar_resnet.figures import lr_range_figure  # noqa: E402
from cifar_resnet.lr_finder import run_range_test  # noqa: E402
from cifar_resnet.paths import DATA_DIR, LR_RANGE_JSON, LR_RANGE_PNG, LR_RANGE_TIMING, LR_RANGE_TSV  # noqa: E402
from cifar_resnet.runtime import pick_runtime, synchronize  # noqa: E402
from cifar_resnet.stage_door import log, run_stage  # noqa: E402
from cifar_resnet.timing import PartTimer  # noqa: E402


def main() -> None:
    timer = PartTimer()
    params = load_params()
    runtime = pick_runtime(params.train)
    timer.sync = partial(synchronize, runtime.device)
    with timer.part("data"):
        data = load_configured(DATA_DIR, params.data)
        mean, std = data.mean_std()
    log(f"lr range test on {len(data.train_images)} training images, {runtime.describe()}")
    with timer.part("range_test"):  # the model's set-up and the training data's copy to the device included
        result = run_range_test(params, data, mean, std, runtime, log=log, progress=sys.stderr.isatty())
    curve = result.pop("curve")
    with timer.part("figures"):
        write_tsv(LR_RANGE_TSV, curve)
        lr_range_figure(LR_RANGE_PNG, curve, result)
    timer.write(LR_RANGE_TIMING)
    write_json(LR_RANGE_JSON, result)  # last: the train stage's input appears only once everything is written


if __name__ == "__main__":
    run_stage(main, __doc__)
