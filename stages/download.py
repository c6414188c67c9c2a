"""Stage `download`: the official CIFAR-10 files, md5-verified, into data/cifar-10-batches-py.

$CIFAR10_MIRROR names a local copy (a folder holding cifar-10-batches-py/ or cifar-10-python.tar.gz) to take them
from instead of data.url. The stage reads only data.url, so a sweep over any other param never downloads again.
"""

from cifar_resnet.bootstrap import start_stage_process

start_stage_process(fast_allocator=False)  # before any third-party import: see its docstring

import sys  # noqa: E402

from cifar_resnet.config import load_params  # noqa: E402
from cifar_resnet.data import load_cifar10  # noqa: E402
from cifar_resnet.fetch import fetch  # noqa: E402
from cifar_resnet.paths import DATA_DIR  # noqa: E402
from cifar_resnet.stage_door import log, run_stage  # noqa: E402


def main() -> None:
    params = load_params()
    source = fetch(DATA_DIR, params.data.url, progress=sys.stderr.isatty())
    data = load_cifar10(DATA_DIR)  # every batch parses into images and labels of the right shape
    log(f"verified CIFAR-10 from {source}: {len(data.train_images)} training and {len(data.test_images)} test images")


if __name__ == "__main__":
    run_stage(main, __doc__)
