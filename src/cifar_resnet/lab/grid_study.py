"""Grid studies: one configuration of the pipeline run for each value of one param and each seed, through DVC's
experiment queue, summarised in studies/<name>/.

    python -m cifar_resnet.lab.grid_study NAME --grid KEY=V1,V2,... --seeds 0-2 [--set key=value ...] [--jobs N]
    make lr-sweep JOBS=N      (the LR sweep: studies/lr-sweep/, its README says what it asks)

The configuration is params.yaml with the `--set` overrides, every key but the seed and the grid key, plus the code
(as for a seed study: python -m cifar_resnet.lab.seed_study --help). It is chosen on the validation split:
data.val_size must be above 0, and no run may hold a test number.

Each (value, seed) missing from the study is queued, all values of a seed before the next seed, as
`dvc exp run --queue -n NAME-KEYVALUE-seedSEED -S KEY=VALUE -S seed=SEED -S ... train evaluate` (the stages that make
a row and all upstream; not the gallery), then `dvc queue start -j N` runs them, N at a time, each in a temporary
copy of the repo (the last commit plus tracked changes). The command waits on the queue's states and, as each run
ends, records its row in studies/<name>/runs.csv and rewrites summary.json, config.json, the seed's range-test
curve (curves/seed<N>.tsv) and sweep.png (each file atomically). A row holds the run's validation accuracy and the
LRMAX its own lr_range_test stage picked (`pick`), both read from the experiment's commit and checked against its
dvc.lock. A run that fails is recorded as failed, in one line naming `dvc queue logs`; it is never run again.

Running the same command again skips the rows already recorded, records the experiments that finished meanwhile and
waits for those still queued or running (Ctrl-C stops the waiting, not the queue's workers). A command whose
params (other than the seed and the grid key) or code differ from the study's is refused, naming what differs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from cifar_resnet.atomic import atomic_path
from cifar_resnet.config import read_yaml
from cifar_resnet.lab.command import one_line
from cifar_resnet.stage_door import log, run_command
from cifar_resnet.lab.dvc_graph import current_code, dvc_yaml_graph, row_targets
from cifar_resnet.lab.dvc_runs import Config, check_tracked, git, git_reader, head, read_run, recorded_file
from cifar_resnet.lab.grid_files import FAILED, OK, columns, curve_path, curve_rows, load_study, write_study
from cifar_resnet.lab.params import set_key, wanted_params
from cifar_resnet.lab.seed_study import NAME, make_row, overrides_of, parse_seeds
from cifar_resnet.lab.study_files import STUDIES, StudyError, refuse_other
from cifar_resnet.lab.validation_only import refuse_test_numbers
from cifar_resnet.paths import LR_RANGE_JSON, LR_RANGE_TSV

POLL_SECONDS = 5  # between two reads of the queue's states: a run takes minutes, reading the states a second
DONE, ACTIVE = {"Success", "Failed"}, {"Queued", "Running"}


def parse_grid(text: str) -> tuple[str, list[float]]:
    """'lr_max=0.1,0.2' -> ('lr_max', [0.1, 0.2]): positive numbers (the figure's axis is logarithmic)."""
    key, sep, rest = text.partition("=")
    values = []
    for part in rest.split(","):
        value = read_yaml(part) if part.strip() else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise StudyError(f"--grid: expected KEY=V1,V2,... with positive numbers, got {text!r}")
        values.append(float(value))
    if not sep or not key.strip():
        raise StudyError(f"--grid: expected KEY=V1,V2,..., got {text!r}")
    return key.strip(), sorted(set(values))


def exp_name(study: str, key: str, value: float, seed: int) -> str:
    """NAME-lr_max0.3-seed1: deterministic, so a rerun finds the experiments of an earlier command."""
    return f"{study}-{key.split('.')[-1]}{value:g}-seed{seed}"


def queue_states() -> dict[str, str]:
    """{experiment name: Queued | Running | Failed | Success}, what `dvc queue status` lists; the live state of a
    name listed twice (an earlier task of that name failed)."""
    from dvc.repo import Repo

    states: dict[str, str] = {}
    with Repo(".") as repo:
        for task in repo.experiments.celery_queue.status():  # Running and Queued come first
            if task.get("name"):
                states.setdefault(task["name"], task["status"])
    return states


def experiment_refs(name: str) -> list[str]:
    """Every experiment ref named `name`, whatever its baseline (a study may be committed between commands)."""
    refs = git("for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
    return [r for r in refs if r.rsplit("/", 1)[-1] == name]


# ---------------------------------------------------------------------------------------------- a run's row


def grid_row(read, seed, code: dict, source: str) -> dict:
    """The seed study's row (validation accuracy, timing, hardware, code hash) and the run's own range-test pick."""
    row = make_row(read, seed, code, source)
    test = json.loads(recorded_file(read, LR_RANGE_JSON.as_posix(), source).decode())
    return {**row, "pick": test.get("lr_max"), "lr_at_climb": test.get("lr_at_climb")}


def finished_row(name: str, key: str, value: float, seed: int, config: Config) -> tuple[dict, bytes] | None:
    """The row and range-test curve of a finished experiment `name` under the study's configuration, else None."""
    for ref in experiment_refs(name):
        run = read_run(git_reader(ref), f"experiment {name}", grid_row)
        if run.params.get(key) != value or run.params.get("seed") != seed:
            raise StudyError(f"experiment {name} ran {key}={run.params.get(key)!r}, seed {run.params.get('seed')}: "
                             "not the run its name says; remove it (`dvc exp remove`) and run again")
        refuse_other(run_config(run, key), config, f"experiment {name}", "the study")
        refuse_test_numbers(ref, name)
        curve = recorded_file(git_reader(ref), LR_RANGE_TSV.as_posix(), f"experiment {name}")
        r = run.row
        return ({key: value, "seed": seed, "status": OK, "val_accuracy": r["val_accuracy"], "pick": r["pick"],
                 "lr_at_climb": r["lr_at_climb"], "train_seconds": r["train_seconds"], "hardware": r["hardware"],
                 "code_hash": r["code_hash"], "source": f"experiment {name}"}, curve)
    return None


def failed_row(name: str, key: str, value: float, seed: int, config: Config) -> dict:
    return {key: value, "seed": seed, "status": FAILED, "val_accuracy": None, "pick": None, "lr_at_climb": None,
            "train_seconds": None, "hardware": "", "code_hash": config.code_hash,
            "source": f"experiment {name} (dvc queue logs {name})"}


def run_config(run, key: str) -> Config:
    return Config({k: v for k, v in run.params.items() if k not in ("seed", key)}, run.code)


# ---------------------------------------------------------------------------------------------- the study


class Study:
    """One grid study's state while it runs: its folder, configuration and rows, written after every change."""

    def __init__(self, name: str, key: str, config: Config):
        self.name, self.key, self.config = name, key, config
        self.folder = STUDIES / name
        self.rows = load_study(self.folder, key, config)

    def has(self, value: float, seed: int) -> bool:
        return bool(((self.rows[self.key] == value) & (self.rows["seed"] == seed)).any())

    def record(self, row: dict, curve: bytes | None = None) -> None:
        self.rows = pd.DataFrame(self.rows.to_dict("records") + [row], columns=columns(self.key))
        summary = write_study(self.folder, self.name, self.key, self.config, self.rows)
        stands = curve_rows(self.rows, self.key)
        if curve is not None and row["source"] in set(stands["source"]):
            with atomic_path(curve_path(self.folder, row["seed"])) as tmp:
                Path(tmp).write_bytes(curve)
        value = f"{self.key}={row[self.key]:g}, seed {row['seed']}"
        if row["status"] == FAILED:
            log(f"{value}: FAILED, recorded as failed and not run again; its output: dvc queue logs "
                f"{row['source'].split()[1]}")
        else:
            verdict = summary["verdict"]
            log(f"{value}: validation accuracy {row['val_accuracy']:.4f}, range-test pick {_show(row['pick'])} "
                f"({row['source']}); {len(self.rows)} run(s) in {self.folder}"
                + (f"; median pick {verdict['median_pick']:g}, in the good region: {verdict['inside']}"
                   if verdict else ""))


def _show(x) -> str:
    return "none" if x is None else f"{x:g}"


def run_grid(name: str, key: str, values: list[float], seeds: list[int], overrides: list[str],
             jobs: int = 1) -> pd.DataFrame:
    if not NAME.fullmatch(name):
        raise StudyError(f"study name {name!r}: letters, digits, '_', '.' and '-' only (it names a folder and "
                         "DVC experiments)")
    if not Path("dvc.yaml").is_file() or not Path("params.yaml").is_file():
        raise StudyError("no dvc.yaml and params.yaml here: run the study from the repository root")
    if key in [set_key(o) for o in overrides]:
        raise StudyError(f"--set {key}=...: the grid key's values come from --grid")
    graph = dvc_yaml_graph()
    params = wanted_params(overrides)
    for value in values:  # each value as DVC's -S applies it: a bad one fails here, before any run
        wanted_params([*overrides, f"{key}={value!r}"])
    if not (params.get("data.val_size") or 0) > 0:
        raise StudyError("a grid study chooses on the validation split: --set data.val_size=N (N > 0)")
    config = Config({k: v for k, v in params.items() if k not in ("seed", key)}, current_code(graph))
    study = Study(name, key, config)
    grid = [(v, s) for s in seeds for v in values]  # seed-major: a seed's range test runs first, then is restored
    todo = [(v, s) for v, s in grid if not study.has(v, s)]
    if len(todo) < len(grid):
        log(f"study {name}: {len(grid) - len(todo)} run(s) already recorded, not run again")
    if todo:
        head()  # DVC experiments start from a commit: say so before queueing anything
        check_tracked(config.code)
        run_todo(study, todo, overrides, row_targets(graph), jobs)
    return study.rows


def run_todo(study: Study, todo: list[tuple[float, int]], overrides: list[str], targets: list[str],
             jobs: int) -> None:
    key, states = study.key, queue_states()
    waiting = {}
    for value, seed in todo:
        name = exp_name(study.name, key, value, seed)
        if settle(study, name, value, seed, states.get(name)):
            continue
        if states.get(name) not in ACTIVE:
            queue(name, [f"{key}={value!r}", f"seed={seed}", *overrides], targets)
        waiting[name] = (value, seed)
    if not waiting:
        return
    start = ["queue", "start", "-j", str(jobs)]
    log(f"study {study.name}: {len(waiting)} run(s) queued or running; dvc {' '.join(start)}")
    dvc(*start)
    lost: dict[str, int] = {}
    while waiting:
        time.sleep(POLL_SECONDS)
        states = queue_states()
        for name, (value, seed) in list(waiting.items()):
            state = states.get(name)
            if settle(study, name, value, seed, state):
                del waiting[name]
            elif state in ACTIVE:
                lost[name] = 0
            else:
                # Between two of the queue's lists (queued, active, done) a task can be in none for an instant.
                lost[name] = lost.get(name, 0) + 1
                if lost[name] >= 3:
                    raise StudyError(f"experiment {name} is neither queued, running nor finished (removed from the "
                                     "queue?): run the same command again to queue it")


def settle(study: Study, name: str, value: float, seed: int, state: str | None) -> bool:
    """Record the run of `name` when it has ended (its experiment exists, or the queue says it failed)."""
    if state in ACTIVE:
        return False
    found = finished_row(name, study.key, value, seed, study.config)
    if found is not None:
        study.record(*found)
        return True
    if state == "Failed":
        study.record(failed_row(name, study.key, value, seed, study.config))
        return True
    return False


def queue(name: str, overrides: list[str], targets: list[str]) -> None:
    dvc("exp", "run", "--queue", "-n", name, *[a for o in overrides for a in ("-S", o)], *targets)


def dvc(*args: str) -> None:
    """`dvc ARGS`; its output goes to a file, not a pipe: the workers `dvc queue start` leaves running inherit it,
    and a pipe would hold this command until they end."""
    with tempfile.TemporaryFile("w+") as out:
        code = subprocess.run([sys.executable, "-m", "dvc", *args], stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode
        if code:
            out.seek(0)
            lines = out.read().strip().splitlines()
            raise StudyError(f"`dvc {' '.join(args)}` failed (exit code {code}): "
                             f"{lines[-1] if lines else 'no output'}")


def parse_args(argv=None) -> argparse.Namespace:
    first, _, rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(prog="python -m cifar_resnet.lab.grid_study", description=first,
                                     epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the study: its files go to studies/NAME/ (letters, digits, _ . -)")
    parser.add_argument("--grid", required=True, metavar="KEY=V1,V2,...",
                        help="the param swept and its values (positive numbers), e.g. lr_max=0.1,0.2,0.4")
    parser.add_argument("--seeds", required=True, help="seeds of every value: 0-2, or 0,3,7-9")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params override, as `dvc exp run -S` takes it (repeatable); part of the configuration")
    parser.add_argument("--device", help="train.device for the runs: the same as --set train.device=DEVICE")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time: `dvc queue start -j JOBS` (default 1)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs: at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def work():
        key, values = parse_grid(args.grid)
        return run_grid(args.name, key, values, parse_seeds(args.seeds), overrides_of(args), args.jobs)

    return run_command(lambda: one_line(work),
                       f"the runs that finished are in {STUDIES / args.name}/runs.csv; run the same command again "
                       "to go on")


if __name__ == "__main__":
    sys.exit(main())
