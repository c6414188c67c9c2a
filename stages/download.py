"""Stage `download`: the official CIFAR-10 files, md5-verified, into data/cifar-10-batches-py ($CIFAR10_MIRROR
names a local copy to take them from instead of data.url)."""

import sys

from cifar_resnet.cli import log, run_stage
from cifar_resnet.config import load_params
from cifar_resnet.data import fetch, load_cifar10
from cifar_resnet.paths import DATA_DIR


def main() -> None:
    params = load_params()
    source = fetch(DATA_DIR, params.data.url, progress=sys.stderr.isatty())
    data = load_cifar10(DATA_DIR)  # every batch parses into images and labels of the right shape
    log(f"verified CIFAR-10 from {source}: {len(data.train_images)} training and {len(data.test_images)} test images")


if __name__ == "__main__":
    run_stage(main)
