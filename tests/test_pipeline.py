"""End to end: the real pipeline through DVC in a fresh git copy of the repo, on a tiny configuration of the real
data ($CIFAR10_MIRROR; skipped without it, run in CI). Tests run in file order and share one copy."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from conftest import Repo, copy_repo, stage_env, tiny_set

pytestmark = pytest.mark.slow

TINY = tiny_set("model.channels=[16,32,64,128]")
OUTPUTS = ["data/cifar-10-batches-py/data_batch_1", "metrics/lr_range_test.json", "plots/lr_range_test.tsv",
           "plots/lr_range_test.png", "models/model.pt", "metrics/train.json", "plots/history.tsv",
           "timing/train.json", "models/summary.txt", "metrics/evaluate.json", "plots/confusion.csv",
           "models/predictions.npz", "plots/gallery.png", "plots/curves.png", "plots/lr_schedule.png",
           *[f"timing/{stage}.json" for stage in ("lr_range_test", "evaluate", "gallery")]]


class Pipeline(Repo):
    def exp_run(self, *sets, check=True) -> subprocess.CompletedProcess:
        """`dvc exp run -S ...` from the committed params (an earlier failed run may have left its own)."""
        self.run("git", "checkout", "params.yaml")
        args = ["exp", "run"]
        for s in sets:
            args += ["-S", s]
        return self.dvc(*args, check=check)


def ran(result, stage: str) -> bool:
    return f"Running stage '{stage}'" in result.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mirror):
    root = tmp_path_factory.mktemp("e2e")
    env = stage_env(root / "cache", CIFAR10_MIRROR=str(mirror))
    env.pop("PYTHONPATH")  # the stage commands set their own
    return copy_repo(root / "repo", env, Pipeline)


def test_tiny_configuration_runs_every_stage(repo):
    result = repo.exp_run(*TINY)
    for stage in ("check_params", "download", "lr_range_test", "train", "evaluate", "gallery"):
        assert ran(result, stage), stage
    for rel in OUTPUTS:
        assert (repo.path / rel).is_file(), rel
    evaluate = repo.json("metrics/evaluate.json")
    assert 0 <= evaluate["accuracy"] <= 1 and evaluate["num_images"] == 512
    assert len(evaluate["per_class_accuracy"]) == 10
    train = repo.json("metrics/train.json")
    assert train["lr_source"] == "lr_range_test"
    assert train["lr_max"] == repo.json("metrics/lr_range_test.json")["lr_max"]
    assert (repo.path / "plots/confusion.csv").read_text().count("\n") == 513
    # Settle the tiny configuration as the baseline commit. From here on there is no mirror and no network: no
    # later run may fetch the data again.
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-qm", "tiny baseline")
    repo.env = {k: v for k, v in repo.env.items() if k != "CIFAR10_MIRROR"}


def test_second_repro_runs_nothing(repo):
    result = repo.dvc("repro")
    assert "Running stage" not in result.stdout, result.stdout


def test_lr_max_override_reruns_train_never_download_or_the_range_test(repo):
    result = repo.exp_run("lr_max=0.05")
    assert ran(result, "check_params") and ran(result, "train") and ran(result, "evaluate") and ran(result, "gallery")
    assert not ran(result, "download") and not ran(result, "lr_range_test")
    assert repo.json("metrics/train.json")["lr_max"] == 0.05
    assert repo.json("metrics/train.json")["lr_source"] == "params.yaml"
    diff = repo.dvc("metrics", "diff", "--json").stdout
    changes = json.loads(diff)
    assert "accuracy" in changes["metrics/evaluate.json"], diff


def test_going_back_restores_from_the_run_cache(repo):
    repo.exp_run("lr_max=0.1")
    first = repo.json("metrics/train.json")
    assert first["lr_max"] == 0.1
    again = repo.exp_run("lr_max=0.05")
    assert not ran(again, "train"), again.stdout
    assert "Stage 'train' is cached" in again.stdout
    assert repo.json("metrics/train.json")["lr_max"] == 0.05


def test_small_float_overrides_as_dvc_writes_them(repo):
    """DVC writes `-S train.weight_decay=1e-5` into params.yaml as `1e-05` (YAML 1.2): every stage reads it as a
    number. lr_max is pinned so that the range test's pick at the other start LR cannot decide the outcome."""
    result = repo.exp_run("train.weight_decay=1e-5", "lr_range_test.start_lr=1e-5", "lr_max=0.05")
    assert "weight_decay: 1e-05" in (repo.path / "params.yaml").read_text()
    assert ran(result, "lr_range_test") and ran(result, "train"), result.stdout
    first_lr = (repo.path / "plots/lr_range_test.tsv").read_text().splitlines()[1].split("\t")[1]  # iteration, lr, ...
    assert float(first_lr) == pytest.approx(1e-5)
    lock = (repo.path / "dvc.lock").read_text()
    assert "weight_decay: 1e-05" in lock and "start_lr: 1e-05" in lock


def test_far_too_high_lr_fails_with_epoch_step_and_lr(repo):
    result = repo.exp_run("lr_max=1000", check=False)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "diverged" in out and "epoch " in out and "step " in out and "LR " in out, out


@pytest.mark.parametrize("setting,key", [("+lr_mx=0.3", "lr_mx"), ("train.batch_size=-5", "train.batch_size")])
def test_bad_params_fail_before_any_work(repo, setting, key):
    result = repo.exp_run(setting, check=False)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert f"error: {key}" in out, out
    assert "Traceback" not in out
    for stage in ("download", "lr_range_test", "train", "evaluate", "gallery"):
        assert not ran(result, stage), stage


def test_two_processes_through_dvc(repo):
    result = repo.exp_run("train.nproc=2")
    assert ran(result, "train") and "2 process(es)" in result.stdout
    assert repo.json("metrics/train.json")["steps_per_epoch"] == 1024 // 512


def test_queued_sweep_runs_each_point_with_its_own_metrics(repo):
    repo.run("git", "checkout", "params.yaml")
    repo.dvc("exp", "run", "--queue", "-S", "lr_max=0.02,0.08")
    repo.dvc("queue", "start", "-j", "2")
    deadline = time.time() + 900
    while time.time() < deadline:
        status = repo.dvc("queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert "Failed" not in status, status + repo.dvc("queue", "logs", check=False).stdout
    shown = json.loads(repo.dvc("exp", "show", "--json").stdout)
    found = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for run in exp.get("revs", []):
                data = run.get("data") or {}
                lr = ((data.get("params") or {}).get("params.yaml", {}).get("data") or {}).get("lr_max")
                acc = ((data.get("metrics") or {}).get("metrics/evaluate.json", {}).get("data") or {}).get("accuracy")
                if lr in (0.02, 0.08):
                    found[lr] = acc
    assert set(found) == {0.02, 0.08} and all(a is not None for a in found.values()), found
    for point in (0.02, 0.08):  # each ran offline from the cached data, without the download stage
        name = _exp_name(shown, point)
        logs = repo.dvc("queue", "logs", name).stdout
        assert "Running stage 'train'" in logs and "Running stage 'download'" not in logs, logs
    repo.dvc("queue", "stop", check=False)


def _exp_name(shown: list, lr_max: float) -> str:
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for run in exp.get("revs", []):
                if ((run.get("data") or {}).get("params") or {}).get("params.yaml", {}).get("data", {}).get(
                        "lr_max") == lr_max:
                    return exp.get("name") or run["rev"]
    raise AssertionError(f"no experiment with lr_max {lr_max}")


def test_corrupted_mirror_fails_download_naming_the_file(repo, mirror, tmp_path):
    bad = tmp_path / "mirror" / "cifar-10-batches-py"
    shutil.copytree(mirror / "cifar-10-batches-py", bad)
    target = bad / "data_batch_3"
    target.chmod(0o644)
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    target.write_bytes(bytes(blob))
    env = dict(repo.env, CIFAR10_MIRROR=str(bad.parent))  # the only test after the baseline that has a mirror
    result = subprocess.run(["dvc", "repro", "-f", "download"], cwd=repo.path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "data_batch_3" in out and "md5" in out and "Traceback" not in out, out
    assert not (repo.path / "data/cifar-10-batches-py").exists(), "no partial output"
