"""Sharing through remotes (README, "Sharing: remotes"): a round trip from one machine to another.

The first machine (a git copy of the repo) runs the tiny configuration of the real data ($CIFAR10_MIRROR; skipped
without it, run in CI), commits it, adds a bare git repository as `origin` and a local folder as the default DVC
remote, and pushes the commit, its outputs, the run-cache and one experiment. A second machine (`git clone` of the
bare repository: no mirror, no data, its own DVC cache and checkpoint folder) pulls with `make pull` and must then
have the same bytes, a `dvc repro` that runs nothing, working `dvc metrics show`, the experiment by `dvc exp pull`
and the run-cache's records by `dvc pull --run-cache`. Tests run in file order and share the two machines.

`make pull` runs in the test clones as `make -o .venv/.installed pull`, with the interpreter running the tests first
on PATH: `-o` tells make the set-up prerequisite is done and old, so the clone gets no venv of its own and no venv
is ever installed into or touched. (Symlinking the clone's .venv to sys.prefix, as test_stage_door does for a stage
process, would not do here: the clone's freshly checked-out requirements.txt is newer than sys.prefix/.installed, or
that file is missing, and make would then pip-install into the venv running the tests.)
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Repo, copy_repo, stage_env, tiny_set

TINY = tiny_set("model.channels=[16,32,64,128]")
CACHED = ["data/params_checked.txt", "data/cifar-10-batches-py", "models/model.pt", "models/summary.txt",
          "models/predictions.npz"]  # every cached out of dvc.yaml: what a clone lacks until it pulls
NO_REMOTE = "no default DVC remote is configured"


def ran(result, stage: str) -> bool:
    return f"Running stage '{stage}'" in result.stdout


def make_pull(repo: Repo) -> subprocess.CompletedProcess:
    return repo.run("make", "-o", ".venv/.installed", "pull", check=False)


def digest(path: Path) -> str:
    """md5 of a file, or of a folder's files (names and bytes, in order)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    md5 = hashlib.md5()
    for f in files:
        md5.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        md5.update(hashlib.md5(f.read_bytes()).digest())
    return md5.hexdigest()


def digests(repo: Repo) -> dict:
    return {rel: digest(repo.path / rel) for rel in CACHED}


def base_env(root: Path, **extra) -> dict:
    env = stage_env(root, **extra)
    env.pop("PYTHONPATH")  # the stage commands set their own
    env.pop("CIFAR10_MD5SUMS", None)  # the real data: verified against the official table
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # this venv's dvc, python (and make's)
    return env


def experiment(shown: list, name: str) -> dict:
    """The data (params, metrics) of the experiment called `name` in `dvc exp show --json`."""
    for commit in shown:
        for exp in commit.get("experiments") or []:
            if exp.get("name") == name:
                return exp["revs"][0].get("data") or {}
    raise AssertionError(f"no experiment {name} in {json.dumps(shown)[:2000]}")


@pytest.mark.slow
def test_make_pull_without_a_remote_explains_and_fails(tmp_path):
    """A fresh clone as the repo is today: no remote. DVC's own answer is a puzzle; `make pull` names the cause."""
    repo = copy_repo(tmp_path / "repo", base_env(tmp_path / "cache"))
    repo.dvc("remote", "default", "--unset")  # the premise, whatever .dvc/config says one day
    result = make_pull(repo)
    assert result.returncode != 0
    assert NO_REMOTE in result.stderr and "dvc remote add -d storage" in result.stderr, result.stderr
    assert "make repro" in result.stderr and "an hour" in result.stderr, result.stderr
    assert "dvc pull" not in result.stdout and not (repo.path / "models").exists()  # nothing was tried


@pytest.mark.slow
def test_make_pull_with_remotes_but_no_default_names_them(tmp_path):
    repo = copy_repo(tmp_path / "repo", base_env(tmp_path / "cache"))
    repo.dvc("remote", "default", "--unset")
    repo.dvc("remote", "add", "team", str(tmp_path / "store"))
    result = make_pull(repo)
    assert result.returncode != 0
    assert NO_REMOTE in result.stderr and "team" in result.stderr and "dvc remote default NAME" in result.stderr


class Machines:
    """The first machine (pushed everything), the bare git remote and the DVC remote; what the first one had."""

    def __init__(self, first: Repo, origin: Path, store: Path, root: Path):
        self.first, self.origin, self.store, self.root = first, origin, store, root
        self.branch = first.run("git", "branch", "--show-current").stdout.strip()
        self.baseline: dict = {}
        self.baseline_accuracy = None
        self.exp: dict = {}
        self.exp_accuracy = None


@pytest.fixture(scope="module")
def machines(tmp_path_factory, mirror):
    root = tmp_path_factory.mktemp("remote")
    first = copy_repo(root / "first", base_env(root / "cache1", CIFAR10_MIRROR=str(mirror)))
    origin, store = root / "origin.git", root / "dvcstore"
    m = Machines(first, origin, store, root)

    first.run("git", "checkout", "params.yaml")
    first.dvc("exp", "run", *[a for s in TINY for a in ("-S", s)])
    first.run("git", "add", "-A")
    first.run("git", "commit", "-qm", "tiny baseline")
    m.baseline = digests(first)
    m.baseline_accuracy = first.json("metrics/evaluate.json")["accuracy"]

    # Share: a git remote, a default DVC remote committed in .dvc/config, then push the commit and its outputs.
    first.run("git", "init", "-q", "--bare", str(origin))
    first.run("git", "remote", "add", "origin", str(origin))
    first.dvc("remote", "add", "-d", "storage", str(store))
    first.run("git", "add", ".dvc/config")
    first.run("git", "commit", "-qm", "DVC remote")
    first.run("git", "push", "-q", "origin", m.branch)
    first.dvc("push")

    # An experiment, pushed to the git remote (its outputs go to the DVC remote), then the run-cache, which now
    # holds the experiment's stages too.
    first.env = {k: v for k, v in first.env.items() if k != "CIFAR10_MIRROR"}  # the data is cached now
    result = first.dvc("exp", "run", "-n", "lr005", "-S", "lr_max=0.05")
    assert ran(result, "train") and not ran(result, "download"), result.stdout
    m.exp = digests(first)
    m.exp_accuracy = first.json("metrics/evaluate.json")["accuracy"]
    first.dvc("exp", "push", "origin", "lr005")
    first.dvc("push", "--run-cache")
    assert (store / "runs").is_dir()
    return m


@pytest.fixture(scope="module")
def second(machines):
    """Another machine: a clone of the git remote, no mirror, no data, its own DVC cache and checkpoint folder."""
    root = machines.root
    env = base_env(root / "cache2")
    subprocess.run(["git", "clone", "-q", "--branch", machines.branch, str(machines.origin), str(root / "second")],
                   env=env, check=True, capture_output=True, text=True)
    repo = Repo(root / "second", dict(machines.first.env, **{k: env[k] for k in ("PATH", "CIFAR_RESNET_CACHE")}))
    assert "CIFAR10_MIRROR" not in repo.env
    return repo


@pytest.mark.slow
def test_the_clone_has_the_remote_but_no_outputs(machines, second):
    assert second.dvc("remote", "default").stdout.strip() == "storage"
    for rel in CACHED:
        assert not (second.path / rel).exists(), rel
    assert not (second.path / ".dvc" / "cache").exists() or not any((second.path / ".dvc" / "cache").iterdir())


@pytest.mark.slow
def test_make_pull_brings_the_same_bytes(machines, second):
    result = make_pull(second)
    assert result.returncode == 0, result.stdout + result.stderr
    assert digests(second) == machines.baseline


@pytest.mark.slow
def test_after_the_pull_repro_runs_nothing(second):
    result = second.dvc("repro")
    assert "Running stage" not in result.stdout, result.stdout
    assert "up to date" in second.dvc("status").stdout


@pytest.mark.slow
def test_metrics_show_works(machines, second):
    shown = json.loads(second.dvc("metrics", "show", "--json").stdout)
    found = [v["data"]["metrics/evaluate.json"]["data"]["accuracy"] for v in shown.values()
             if "metrics/evaluate.json" in (v.get("data") or {})]
    assert found == [machines.baseline_accuracy], shown
    assert "metrics/evaluate.json" in second.dvc("metrics", "show").stdout


@pytest.mark.slow
def test_exp_pull_brings_the_experiment_and_its_outputs(machines, second):
    assert "lr005" in second.dvc("exp", "list", "origin").stdout
    second.dvc("exp", "pull", "origin", "lr005")
    data = experiment(json.loads(second.dvc("exp", "show", "--json").stdout), "lr005")
    assert data["params"]["params.yaml"]["data"]["lr_max"] == 0.05
    assert data["metrics"]["metrics/evaluate.json"]["data"]["accuracy"] == machines.exp_accuracy
    second.dvc("exp", "apply", "lr005")  # its weights came with it: nothing to train
    assert digests(second) == machines.exp
    assert second.json("metrics/train.json")["lr_max"] == 0.05
    second.run("git", "reset", "-q", "--hard")
    second.dvc("checkout", "--force")
    assert digests(second) == machines.baseline


@pytest.mark.slow
def test_the_run_cache_records_travel(second):
    """`dvc push --run-cache` / `dvc pull --run-cache` carry the records of the stage runs: check_params under
    `lr_max=0.05` never ran here, yet it is restored, not run. (In DVC 3.67 they carry only the records: the objects of
    `cache: false` outputs, metrics/ plots/ timing/, are never pushed, so train, evaluate and gallery would still rerun
    here; README, "Sharing: remotes". Sharing results is `dvc exp push` / `dvc exp pull`, tested above.)"""
    assert not (second.path / ".dvc" / "cache" / "runs").exists()
    second.dvc("pull", "--run-cache")
    assert (second.path / ".dvc" / "cache" / "runs").is_dir()
    result = second.dvc("exp", "run", "-S", "lr_max=0.05", "check_params")
    assert "Stage 'check_params' is cached" in result.stdout and not ran(result, "check_params"), result.stdout
