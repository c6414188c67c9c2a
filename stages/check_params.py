"""Stage `check_params`: validate every key of params.yaml before any other stage works.

It tracks the whole params.yaml, so a typo'd key (`dvc exp run -S +lr_mx=0.3`) or a bad value fails here at once,
naming the key. Its output is the same line whatever the params, so no stage after it reruns because of it: each
reruns only when the params and files it lists change.
"""

from cifar_resnet.bootstrap import start_stage_process

start_stage_process(fast_allocator=False)  # before any third-party import: see its docstring

from cifar_resnet.atomic import write_text  # noqa: E402
from cifar_resnet.config import load_params  # noqa: E402
from cifar_resnet.paths import PARAMS_CHECKED  # noqa: E402
from cifar_resnet.stage_door import log, run_stage  # noqa: E402


def main() -> None:
    load_params()
    write_text(PARAMS_CHECKED, "params.yaml passed validation\n")
    log("params.yaml: every key valid")


if __name__ == "__main__":
    run_stage(main, __doc__)
