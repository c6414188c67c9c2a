"""Live per-epoch metrics (cifar_resnet.live, DVCLive's layout under dvclive/) and a readable `dvc exp show`.

Fast: the live files as a function of the history (layout, no wall-clock column, a restart rebuilds the same bytes),
the README's `dvc exp show` patterns against params.yaml, the metrics and the deps. Stage: the train stage held after
epoch 1 has its live files and none of its final ones, and a resumed run ends with an uninterrupted run's live bytes.
Slow (DVC, synthetic data): a queued experiment, held after epoch 1 inside DVC's queue, is listed by `dvc exp show`
with its epoch-1 metrics before it finishes; the README's `dvc exp show` commands fit in 120 columns.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import (REPO, copy_repo, make_workspace, md5sums_path, run_stage, stage_env, tiny_params,
                      write_cifar_folder)

from cifar_resnet.live import LIVE_DIR, LiveHistory
from cifar_resnet.paths import LIVE_METRICS, LIVE_PLOTS

HARNESS = REPO / "tests" / "held_stage.py"
COLUMNS = ["lr", "train_loss", "train_acc", "test_loss", "test_acc"]


def rows(n: int, scale: float = 1.0, skip_eval: tuple[int, ...] = ()) -> list[dict]:
    """A history as the train loop makes it: one row per epoch, no test columns on epochs in `skip_eval`."""
    out = []
    for epoch in range(1, n + 1):
        row = {"epoch": epoch, "lr": round(0.1 * epoch * scale, 6), "train_loss": round(2.0 / epoch * scale, 6),
               "train_acc": round(0.2 * epoch, 6)}
        if epoch not in skip_eval:
            row.update(test_loss=round(2.1 / epoch * scale, 6), test_acc=round(0.15 * epoch, 6))
        out.append(row)
    return out


def live_files(root: Path) -> dict[str, bytes]:
    folder = root / LIVE_DIR
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_live(history_steps: list[list[dict]]) -> None:
    writer = LiveHistory()
    for history in history_steps:
        writer(history)
    writer.close()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """A working folder outside any repo: DVCLive looks for a DVC repo from the current folder."""
    monkeypatch.chdir(tmp_path)
    for var in ("DVC_ROOT", "DVC_EXP_BASELINE_REV", "DVC_EXP_NAME", "DVC_STAGE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


# ---------------------------------------------------------------------------------------------- the live files


def test_live_files_are_dvclives_layout_and_follow_the_history(in_tmp):
    history = rows(3, skip_eval=(1,))  # test columns only on epochs 2 and 3 (train.eval_every)
    writer = LiveHistory()
    writer(history[:1])
    assert json.loads((in_tmp / LIVE_METRICS).read_text()) == {"lr": 0.1, "train_loss": 2.0, "train_acc": 0.2,
                                                                 "step": 1}
    writer(history[:2])
    writer(history)
    writer.close()
    files = live_files(in_tmp)
    # Exactly the files dvc.yaml declares: the summary, and one table per column under the declared plots folder.
    assert set(files) == {LIVE_METRICS.as_posix()} | {f"{LIVE_PLOTS.as_posix()}/{c}.tsv" for c in COLUMNS}
    summary = json.loads(files[LIVE_METRICS.as_posix()])
    assert summary == {**{k: v for k, v in history[-1].items() if k != "epoch"}, "step": 3}
    assert files[f"{LIVE_PLOTS.as_posix()}/lr.tsv"] == b"step\tlr\n1\t0.1\n2\t0.2\n3\t0.3\n"
    assert files[f"{LIVE_PLOTS.as_posix()}/test_acc.tsv"] == b"step\ttest_acc\n2\t0.3\n3\t0.45\n"
    # No wall-clock column: identical histories give identical bytes.
    for name, data in files.items():
        assert b"timestamp" not in data, name


def test_a_restart_rebuilds_the_bytes_of_an_uninterrupted_run(in_tmp):
    history = rows(4)
    write_live([history[:n] for n in range(1, 5)])
    uninterrupted = live_files(in_tmp)
    shutil.rmtree(in_tmp / LIVE_DIR)
    # Another run left its files here (other values, a column this one does not have)...
    write_live([rows(6, scale=3.0)])
    (in_tmp / LIVE_PLOTS / "val_acc.tsv").write_text("step\tval_acc\n1\t0.5\n")
    # ...then this run restarts from a checkpoint of epoch 2: its first call carries the restored history.
    write_live([history[:2], history[:3], history])
    assert live_files(in_tmp) == uninterrupted


def test_a_history_that_is_not_an_extension_is_written_afresh(in_tmp):
    write_live([rows(2)])
    fresh = live_files(in_tmp)
    shutil.rmtree(in_tmp / LIVE_DIR)
    write_live([rows(3, scale=2.0), rows(2)])  # one writer, then a history that does not extend what it wrote
    assert live_files(in_tmp) == fresh


# ---------------------------------------------------------------------------------------------- the README's commands


def readme_exp_show_commands() -> list[str]:
    """Every `dvc exp show` command in the README's code blocks (continuation lines joined, comments cut)."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("dvc exp show"):
                commands.append(shlex.join(shlex.split(line, comments=True)))
    return commands


def one_screen_command() -> list[str]:
    found = [shlex.split(c) for c in readme_exp_show_commands() if "--only-changed" in c]
    assert len(found) == 1, readme_exp_show_commands()
    return found[0]


def _option(argv: list[str], name: str) -> re.Pattern:
    values = [argv[i + 1] for i, a in enumerate(argv) if a == name]
    return re.compile("|".join(values))  # as `dvc exp show` joins repeated --drop/--keep


def _flat(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def _shown(name: str, drop: re.Pattern, keep: re.Pattern) -> bool:
    """Whether a column survives --keep/--drop (`dvc exp show` matches with re.match; --keep wins)."""
    return bool(keep.match(name)) or not drop.match(name)


def test_the_one_screen_command_keeps_every_param_and_only_accuracy_loss_and_step_of_the_metrics():
    argv = one_screen_command()
    drop, keep = _option(argv, "--drop"), _option(argv, "--keep")
    # A column is named `key`, or `file:key` when another file has the same key (then both are prefixed).
    params = _flat(yaml.safe_load((REPO / "params.yaml").read_text()))
    for key in params:
        for name in (key, f"params.yaml:{key}"):
            assert not drop.match(name), f"param {name} is dropped: add its top-level key to the README's pattern"
    metrics = {"metrics/lr_range_test.json", "metrics/train.json", "metrics/evaluate.json"}
    for path in sorted(metrics):
        for key in _flat(json.loads((REPO / path).read_text())):
            wanted = key in ("accuracy", "loss") and path == "metrics/evaluate.json"
            if key not in params:  # a metric named like a param is always shown as `file:key`
                assert _shown(key, drop, keep) == wanted, f"{path}: {key}"
            assert not _shown(f"{path}:{key}", drop, keep) or wanted, f"{path}:{key}"
    for key in [*COLUMNS, "step"]:
        assert _shown(key, drop, keep) == (key == "step"), key
        assert not _shown(f"{LIVE_METRICS.as_posix()}:{key}", drop, keep), key
    deps = {d for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values() for d in stage["deps"]}
    for dep in sorted(deps):
        assert not _shown(dep, drop, keep), dep
    for column in ("Experiment", "State"):
        assert keep.match(column), column
    assert not _shown("Created", drop, keep)


# ---------------------------------------------------------------------------------------------- the train stage


PER_BATCH = 192
EPOCHS = 3


class HeldStage:
    """The train stage under tests/held_stage.py, waiting after epoch 1 on a FIFO that this object holds open."""

    def __init__(self, ws: Path, cache: Path):
        self.fifo = ws.with_name(ws.name + ".hold")
        os.mkfifo(self.fifo)
        self.fd = os.open(self.fifo, os.O_RDWR)  # never blocks; the stage blocks reading until released or killed
        env = stage_env(cache, PYTHONUNBUFFERED="1", HOLD_AFTER_EPOCH="1", HOLD_FIFO=str(self.fifo))
        self.proc = subprocess.Popen([sys.executable, str(HARNESS), str(REPO / "stages" / "train.py")], cwd=ws,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.seen = ""

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_held(self, timeout: float = 600) -> None:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no output for {timeout} s:\n{self.seen}") from None
            if line is None:
                raise AssertionError(f"the stage ended before epoch 1 was held:\n{self.seen}")
            self.seen += line
            if line.startswith(f"epoch  1/{EPOCHS} "):
                return

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        os.close(self.fd)


@pytest.mark.slow
def test_a_held_run_shows_its_epochs_and_a_resumed_run_rebuilds_them(tmp_path):
    base = make_workspace(tmp_path / "base", PER_BATCH, train={"epochs": EPOCHS})
    result = run_stage("train", base, stage_env(tmp_path / "cache-base"), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((base / LIVE_METRICS).read_text())["step"] == EPOCHS
    history = (base / "plots/history.tsv").read_text().splitlines()
    assert (base / LIVE_PLOTS / "test_acc.tsv").read_text().splitlines()[1:] == [
        f"{r.split(chr(9))[0]}\t{float(r.split(chr(9))[-1])}" for r in history[1:]]

    ws, cache = make_workspace(tmp_path / "ws", PER_BATCH, train={"epochs": EPOCHS}), tmp_path / "cache"
    held = HeldStage(ws, cache)
    try:
        held.wait_held()
        # Held after epoch 1: its live files are there, its final files are not.
        assert json.loads((ws / LIVE_METRICS).read_text())["step"] == 1
        assert len((ws / LIVE_PLOTS / "test_acc.tsv").read_text().splitlines()) == 2
        assert not (ws / "metrics/train.json").exists() and not (ws / "plots/history.tsv").exists()
    finally:
        held.kill()
    shutil.rmtree(ws / LIVE_DIR)  # as DVC does to a stage's declared outputs before it runs the stage again
    result = run_stage("train", ws, stage_env(cache), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Resuming from epoch 2\n" in result.stdout
    assert live_files(ws) == live_files(base)
    timing = json.loads((ws / "timing/train.json").read_text())
    assert [r["epoch"] for r in timing["per_epoch"]] == list(range(1, EPOCHS + 1))
    assert [r["seconds"] for r in timing["per_epoch"]] == timing["seconds_per_epoch"]
    # DVC draws it (dvc.yaml's plot props), here on the CPU and as a GPU run writes it (a list of names in `gpu`).
    from dvc.render.converter.vega import VegaConverter

    props = {next(iter(o)): next(iter(o.values())) for o in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
             ["train"]["plots"]}["timing/train.json"]
    for gpu in (timing["gpu"], ["Some GPU"]):
        data = {"timing/train.json": {**timing, "gpu": gpu}}
        points, _ = VegaConverter("timing/train.json", data, props).flat_datapoints("workspace")
        assert [(p["epoch"], p["seconds"]) for p in points] == [(r["epoch"], r["seconds"]) for r in timing["per_epoch"]]


# ---------------------------------------------------------------------------------------------- through DVC (slow)


def _experiments(shown: list) -> list[dict]:
    return [exp for commit in shown for exp in commit.get("experiments") or []]


def _data(exp: dict) -> dict:
    return (exp["revs"][0].get("data") or {}) if exp.get("revs") else {}


class Queued:
    """A git copy of the repo on the tiny configuration with synthetic data, its train command run under the hold
    harness (a pass-through unless HOLD_AFTER_EPOCH is set) and a baseline committed; then one queued experiment,
    its worker started with the hold variables: it stops after epoch 1 until `release()`."""

    name = "held-exp"

    def __init__(self, root: Path):
        self.root, self.repo, self._fd = root, None, None

    def start(self) -> None:
        root = self.root
        mirror = write_cifar_folder(root / "mirror" / "cifar-10-batches-py").parent
        env = stage_env(root / "cache", CIFAR10_MIRROR=str(mirror),
                        CIFAR10_MD5SUMS=str(md5sums_path(mirror / "cifar-10-batches-py")))
        env.pop("PYTHONPATH")  # the stage commands set their own
        self.repo = repo = copy_repo(root / "repo", env)
        shutil.rmtree(repo.path / LIVE_DIR, ignore_errors=True)  # a workspace's own live files are not the repo's
        dvc_yaml = repo.path / "dvc.yaml"
        plain = "cmd: PYTHONPATH=src python stages/train.py"
        assert dvc_yaml.read_text().count(plain) == 1
        # The queue runs committed code: the copy's own train command goes through the harness.
        held = f"cmd: PYTHONPATH=src python {HARNESS} stages/train.py"
        dvc_yaml.write_text(dvc_yaml.read_text().replace(plain, held))
        params = tiny_params(train={"epochs": EPOCHS}, lr_range_test={"num_iter": 20, "end_lr": 100.0})
        (repo.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        repo.run("git", "add", "-A")
        repo.run("git", "commit", "-qm", "tiny, held train")
        repo.dvc("repro")
        repo.run("git", "add", "-A")
        repo.run("git", "commit", "-qm", "tiny baseline")

        fifo = root / "hold"
        os.mkfifo(fifo)
        self._fd = os.open(fifo, os.O_RDWR)  # held open here: the stage blocks reading it
        repo.dvc("exp", "run", "--queue", "-S", "lr_max=0.1", "-S", "train.momentum=0.85", "--name", self.name)
        worker_env = dict(repo.env, HOLD_AFTER_EPOCH="1", HOLD_FIFO=str(fifo))  # the queue's worker inherits these
        # Not a pipe: the worker it starts keeps its output open, and a pipe would wait for the worker to end.
        with open(root / "queue-start.log", "w+") as out:
            code = subprocess.run(["dvc", "queue", "start"], cwd=repo.path, env=worker_env, stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=300).returncode
            out.seek(0)
            assert code == 0, out.read()

    def status(self) -> str:
        return self.repo.dvc("queue", "status").stdout

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # EOF for the held stage: it goes on
            self._fd = None

    def finish(self) -> str:
        """Release the experiment and wait until the queue has nothing queued or running; return its status."""
        self.release()
        _wait("the queue to finish", lambda: not re.search(r"\b(Queued|Running)\b", self.status()))
        status = self.status()
        assert "Success" in status and "Failed" not in status, status + self.repo.dvc(
            "queue", "logs", self.name, check=False).stdout
        return status

    def close(self) -> None:
        """Release the experiment (if held) and stop the queue's worker, whatever state the tests left."""
        self.release()
        if self.repo is not None:
            self.repo.dvc("queue", "stop", "--kill", check=False)


@pytest.fixture(scope="module")
def queued(tmp_path_factory):
    q = Queued(tmp_path_factory.mktemp("live_queue"))
    try:
        q.start()
        yield q
    finally:
        q.close()


def _wait(what: str, probe, timeout: float = 900, every: float = 2.0):
    """Poll `probe()` until it returns something truthy: waiting for an event, not sleeping for one."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_queued_experiment_shows_its_epochs_in_exp_show_before_it_finishes(queued):
    repo, name = queued.repo, queued.name

    def held_at_epoch_1():
        shown = json.loads(repo.dvc("exp", "show", "--json").stdout)
        for exp in _experiments(shown):
            # Until its train stage starts, the temporary copy still holds its baseline's files (step 3).
            live = (_data(exp).get("metrics") or {}).get(LIVE_METRICS.as_posix(), {}).get("data") or {}
            if exp.get("name") == name and (exp.get("executor") or {}).get("state") == "running" \
                    and live.get("step") == 1:
                return exp
        status = queued.status()
        assert "Failed" not in status, status + repo.dvc("queue", "logs", name, check=False).stdout
        return None

    exp = _wait("the queued experiment to show its live epoch-1 metrics", held_at_epoch_1)
    # Held after epoch 1 (it cannot go on until released): the epoch's own numbers, no final metrics yet.
    metrics = _data(exp)["metrics"]
    live = metrics[LIVE_METRICS.as_posix()]["data"]
    assert set(COLUMNS) <= set(live), live
    assert live["lr"] == pytest.approx(0.1)  # this experiment's LRMAX, reached at the end of its peak epoch 1
    assert "error" in metrics["metrics/train.json"], metrics["metrics/train.json"]  # written only at the end
    logs = repo.dvc("queue", "logs", name).stdout
    assert f"epoch  1/{EPOCHS} " in logs and f"epoch  2/{EPOCHS} " not in logs, logs

    queued.finish()
    shown = json.loads(repo.dvc("exp", "show", "--json").stdout)
    done = next(e for e in _experiments(shown) if e.get("name") == name)
    metrics = _data(done)["metrics"]
    assert metrics[LIVE_METRICS.as_posix()]["data"]["step"] == EPOCHS
    assert "accuracy" in metrics["metrics/evaluate.json"]["data"]
    assert "timing/train.json" not in metrics  # a plot: out of `dvc exp show` and `dvc metrics diff`


@pytest.mark.slow
def test_timing_is_a_plot_of_each_experiment_not_a_metric(queued):
    queued.finish()
    repo, name = queued.repo, queued.name
    diff = json.loads(repo.dvc("metrics", "diff", "HEAD", name, "--all", "--json").stdout)
    assert "timing/train.json" not in diff and "metrics/evaluate.json" in diff, sorted(diff)
    shown = json.loads(repo.dvc("exp", "show", "--json").stdout)
    commit = next(e for e in _experiments(shown) if e.get("name") == name)["revs"][0]["rev"]
    timing = json.loads(repo.run("git", "show", f"{commit}:timing/train.json").stdout)  # in git, per experiment
    assert len(timing["per_epoch"]) == EPOCHS and timing["device"] == "cpu"
    plots = json.loads(repo.dvc("plots", "diff", "HEAD", name, "--json").stdout)
    assert not plots.get("errors"), plots.get("errors")
    drawn = {k: v for k, v in plots["data"].items() if k == "timing/train.json" or k.startswith(LIVE_PLOTS.as_posix())}
    assert "timing/train.json" in drawn and f"{LIVE_PLOTS.as_posix()}/test_acc.tsv" in drawn, sorted(plots["data"])
    for plot_id, charts in drawn.items():
        points = charts[0]["content"]["data"]["values"]
        assert len(points) == 2 * EPOCHS, (plot_id, points)  # both revisions, every epoch


@pytest.mark.slow
def test_the_readmes_exp_show_commands_fit_120_columns(queued):
    queued.finish()
    repo, name = queued.repo, queued.name
    commands = readme_exp_show_commands()
    assert len(commands) >= 2, commands
    for command in commands:
        # Not a terminal: DVC prints the whole table at its natural width (what its pager would show).
        result = repo.run("bash", "-c", command)
        width = max(len(line.rstrip()) for line in result.stdout.splitlines())
        assert width <= 120, f"{command}\n{result.stdout}"
        assert "…" not in result.stdout and name in result.stdout, result.stdout
    table = repo.run("bash", "-c", shlex.join(one_screen_command())).stdout
    header = next(line for line in table.splitlines() if "Experiment" in line).split()
    assert header[:2] == ["Experiment", "State"], header
    # Nothing else: no other metric, no code dependency, no param that no row changes.
    assert sorted(header[2:]) == ["accuracy", "loss", "params.yaml:lr_max", "train.momentum"], table
