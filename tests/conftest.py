"""Shared helpers: tiny CIFAR-format data sets, tiny params, and running stage scripts as a user would."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


RECORD = json.loads((REPO / "metrics" / "record.json").read_text())  # which commit's run dvc.lock records


def file_at(commit: str, path: str) -> bytes:
    """A file as a commit of this repo holds it."""
    shown = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO, capture_output=True, check=False)
    assert shown.returncode == 0, f"{path} at {commit[:10]}: {shown.stderr.decode().strip()} (a shallow clone?)"
    return shown.stdout


def write_cifar_folder(folder: Path, per_batch: int = 64, seed: int = 0) -> Path:
    """A learnable CIFAR-10 look-alike in the official python format: each class has its own colour and stripe.

    Its md5s are not the official ones: they go to `md5sums_path(folder)`, in md5sum format, for $CIFAR10_MD5SUMS.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = rng.integers(0, 10, per_batch)
        images = rng.integers(0, 60, (per_batch, 3, 32, 32)).astype(np.int64)
        for i, label in enumerate(labels):
            images[i, label % 3] += 120
            images[i, :, :, (label * 3) % 32] += 70
        data = np.clip(images, 0, 255).astype(np.uint8).reshape(per_batch, 3072)
        # str keys: the official (Python 2) pickles load with str keys under torchvision's latin1 decoding.
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels.tolist(), "data": data,
                         "filenames": [f"{i}.png" for i in range(per_batch)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": per_batch}, f)
    write_md5sums(folder)
    return folder


def md5sums_path(folder: Path) -> Path:
    """Where write_cifar_folder puts the md5s of `folder`: beside it, as ../shared/cifar10/MD5SUMS sits."""
    return folder.parent / "MD5SUMS"


def write_md5sums(folder: Path, *archives: Path) -> Path:
    """`md5sum`'s output for every file of `folder`, paths relative to its parent, then for each of `archives`
    (a packed copy of the folder: its md5 is checked before it is unpacked)."""
    named = [(p, f"{folder.name}/{p.name}") for p in sorted(folder.iterdir()) if p.is_file()]
    named += [(archive, archive.name) for archive in archives]
    lines = [f"{hashlib.md5(p.read_bytes()).hexdigest()}  {name}\n" for p, name in named]
    path = md5sums_path(folder)
    path.write_text("".join(lines))
    return path


TINY = {
    "lr_max": 0.2,
    "data": {"train_limit": None, "test_limit": None},
    "model": {"channels": [8, 16, 32, 64]},
    "lr_range_test": {"num_iter": 20},
    "train": {"epochs": 3, "peak_epoch": 1, "batch_size": 64, "device": "cpu", "threads": 1},
    "evaluate": {"batch_size": 128},
}


# The tiny configuration of the tests that run the real pipeline as a user does (`dvc exp run -S ...`): 1,024 real
# training images, a narrow net, 2 epochs. In the range test's 20 batches this net's loss barely leaves ln 10 and
# climbs only where it diverges: swept to LR 100 it stayed below 1.25 x its lowest on 3 of 6 seeds (no pick: the
# train stage failed), swept to LR 1000 it climbed on all 18 seed x variant curves measured, at LR 6-79. Training at
# that LR / 1.25 diverged, so the tiny runs take a tenth of it.
TINY_SET = ("data.train_limit=1024", "data.test_limit=512", "model.channels=[8,16,32,64]", "train.epochs=2",
            "train.peak_epoch=1", "lr_range_test.num_iter=20", "lr_range_test.end_lr=1000",
            "lr_range_test.divisor=10")


def tiny_set(*changes: str) -> list[str]:
    """TINY_SET's "key=value" settings, with `changes` in place of the values they name or after them."""
    # Imported here, not at the top: it loads pandas, which most tests never need.
    from cifar_resnet.lab.ablation import cumulative_sets
    return cumulative_sets(list(TINY_SET), list(changes))


def tiny_params(**overrides) -> dict:
    """params.yaml of the repo, shrunk: narrow model, few epochs, small batches. Overrides by section."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for layer in (TINY, overrides):
        for section, values in layer.items():
            if isinstance(values, dict):
                params[section].update(values)
            else:
                params[section] = values
    return params


def make_workspace(root: Path, per_batch: int = 64, **overrides) -> Path:
    """A folder a stage can run in: params.yaml and data/cifar-10-batches-py (synthetic)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(**overrides), sort_keys=False))
    write_cifar_folder(root / "data" / "cifar-10-batches-py", per_batch)
    return root


# Relative to the stage's working directory, a make_workspace folder: the md5s of its synthetic data.
WORKSPACE_MD5SUMS = md5sums_path(Path("data") / "cifar-10-batches-py").as_posix()


def stage_env(cache: Path | None = None, **extra) -> dict:
    """The environment of a stage subprocess that runs in a make_workspace folder.

    Its data is synthetic, so $CIFAR10_MD5SUMS points at the workspace's own md5s. A caller that names a
    CIFAR10_MIRROR runs on the real files instead: those are verified against the official table.
    """
    dropped = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CIFAR10_MD5SUMS")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(PYTHONPATH=str(REPO / "src"), NO_ALBUMENTATIONS_UPDATE="1", DVC_NO_ANALYTICS="1")
    if "CIFAR10_MIRROR" not in extra:
        env["CIFAR10_MD5SUMS"] = WORKSPACE_MD5SUMS
    env.update(extra)
    if cache is not None:
        env["CIFAR_RESNET_CACHE"] = str(cache)
    return env


def run_stage(name: str, cwd: Path, env: dict, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "stages" / f"{name}.py")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture
def workspace(tmp_path):
    return make_workspace(tmp_path / "ws")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest. Restores the count (pick_runtime changes it globally)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mirror():
    path = os.environ.get("CIFAR10_MIRROR")
    if not path or not (Path(path) / "cifar-10-batches-py").is_dir():
        pytest.skip("CIFAR10_MIRROR is not set to a folder holding cifar-10-batches-py")
    return Path(path)


class Repo:
    """A git copy of this repo in a temporary folder; commands run there as a user would run them."""

    def __init__(self, path: Path, env: dict):
        self.path, self.env = path, env

    def run(self, *args, check=True, timeout=900) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), cwd=self.path, env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def dvc(self, *args, **kw) -> subprocess.CompletedProcess:
        return self.run("dvc", *args, **kw)

    def json(self, rel: str) -> dict:
        return json.loads((self.path / rel).read_text())


def copy_repo(path: Path, env: dict, cls=Repo) -> Repo:
    """The repo's files (not .venv, data, the committed record or studies) committed in a new git repository."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if rel == "dvc.lock" or rel.startswith(("metrics/", "plots/", "timing/", "studies/", "dvclive/")) \
                or not (REPO / rel).is_file():
            continue
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, path / rel)
    env = dict(env, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    repo = cls(path, env)
    repo.run("git", "init", "-q")
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-qm", "copy")
    return repo


@pytest.fixture
def held():
    """Start held train stages; whatever a test leaves running is killed at its end."""
    from helpers import Held  # here: helpers imports this module

    started: list[Held] = []

    def start(ws: Path, cache: Path, epoch: int = 1) -> Held:
        started.append(Held(ws, cache, epoch))
        return started[-1]

    yield start
    for h in started:
        h.close()


# ------------------------------------------------------------------------- `make test-fast` leaves the slow out
# A test that runs a stage, DVC, make, torchrun, a lab tool or a training process is marked `slow`: `make test-fast` (the unit
# tests, `-m "not slow"`) leaves it out. Enforced here, not by habit: such a process started by a test without the
# mark fails that test. Set before the test's fixtures are, so a module fixture that runs a stage counts too.
_SLOW_PROGRAMS = {"dvc", "make", "torchrun"}
_running = {"slow": True, "test": ""}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _running.update(slow=item.get_closest_marker("slow") is not None, test=item.nodeid)


def _refuse_slow_work(what: str) -> None:
    if not _running["slow"]:
        pytest.fail(f"{_running['test']} runs {what}: mark it @pytest.mark.slow (make test-fast leaves those out)",
                    pytrace=False)


def _slow_argv(args) -> bool:
    argv = [str(a) for a in ([args] if isinstance(args, (str, os.PathLike)) else args)]
    program = Path(argv[0].split()[0]).name if argv else ""
    scripts = [a for a in argv[1:3] if a.endswith(".py")]
    lab_tool = "--help" not in argv and any(a == "-m" and b.startswith("cifar_resnet.lab.")
                                            for a, b in zip(argv, argv[1:]))  # the bench, the GPU check, ...
    return program in _SLOW_PROGRAMS or lab_tool or any(
        "/stages/" in s or s.endswith(("held_stage.py", "kill_stage.py")) for s in scripts)


def pytest_configure(config):
    import multiprocessing.process

    popen_init, process_start = subprocess.Popen.__init__, multiprocessing.process.BaseProcess.start

    def guarded_popen(self, args, *rest, **kwargs):
        if _slow_argv(args):
            _refuse_slow_work(f"`{args if isinstance(args, str) else ' '.join(map(str, args))}`")
        popen_init(self, args, *rest, **kwargs)

    def guarded_start(self):
        _refuse_slow_work("a training process (multiprocessing)")
        process_start(self)

    subprocess.Popen.__init__ = guarded_popen
    multiprocessing.process.BaseProcess.start = guarded_start
