"""Seed studies: one configuration of the pipeline, run for many seeds through DVC, summarised in studies/<name>/.

    python -m cifar_resnet.lab.seed_study NAME --seeds 0-4 [--set key=value ...] [--device cuda]
    make study NAME=default SEEDS=0-4 [SET="train.epochs=12 lr_max=0.4"] [DEVICE=cuda]

The configuration is params.yaml with the `--set` overrides (and `--device` as train.device) applied, every key but
the seed, plus the code: the md5 of every file, not written by a stage, that the stages making a row's numbers read
(train, evaluate and everything upstream of them; gallery only draws). Each seed missing from the study runs as its
own `dvc exp run --temp -n NAME-seedN -S seed=N -S ... train evaluate` (the stages that make a row and all upstream;
not the gallery): DVC's experiment machinery, in a temporary copy of the repo (the last commit plus tracked changes),
in the foreground, one seed at a time. Nothing in the workspace changes, its exit code and output are the stages'
own, and no background queue worker can be left behind or raced.

As soon as a seed ends, its row goes to studies/<name>/runs.csv and summary.json, seeds.png and config.json are
rewritten beside it (each file atomically), so the study can be committed after every seed. Running the same command
again skips the seeds already in runs.csv; Ctrl-C stops the running seed, whose train stage resumes from its last
finished epoch the next time. A seed is never run when a run of it already exists: the workspace's own run
(dvc.lock and the metric files it records; the committed `dvc repro` is seed 0 of the default study) or a finished
experiment named NAME-seedN, when its params and code are the study's.

A study holds one configuration: a command whose params (other than the seed) or code differ from the study's is
refused, naming what differs. The summary (`summarise`) is computed from runs.csv alone, so a test recomputes it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd

from cifar_resnet.stage_door import run_command
from cifar_resnet.lab.command import one_line
from cifar_resnet.stage_door import log
from cifar_resnet.lab.dvc_graph import ROW_FILES, StaleRun, code_hash, current_code, dvc_yaml_graph, row_targets
from cifar_resnet.lab.dvc_runs import (Config, Run, check_tracked, exp_ref, git, git_reader, hardware_of, head,
                                       load_file, read_run, ref_exists, run_experiment, workspace_reader)
from cifar_resnet.lab.params import set_key, wanted_params
from cifar_resnet.lab.study_files import (COLUMNS, SPLIT_NAMES, STUDIES, StudyError, headline, load_study,
                                          refuse_other, write_study)
from cifar_resnet.paths import EVALUATE_JSON

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def parse_seeds(text: str) -> list[int]:
    """'0-4', '0,3,7-9' -> sorted distinct seeds."""
    seeds = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise StudyError(f"--seeds: expected seeds such as 0-4 or 0,3,7-9, got {text!r}")
        seeds.update(range(int(match[1]), int(match[2] or match[1]) + 1))
    return sorted(seeds)


def make_row(read, seed, code: dict, source: str) -> dict:
    """One study row. Tolerant of new keys. The evaluate stage reports one split: the test split under `accuracy`,
    or the validation split under `val_accuracy` (a configuration chosen on validation has no test number, and its
    row no test_accuracy); a validation accuracy not reported by evaluate comes from train's last epoch. Files that
    lack a number, or hold one that is not a number, make the run stale (StaleRun), not a crash."""
    evaluate, train, timing = (load_file(read, rel, json.loads, source) for rel in ROW_FILES)
    try:
        test, val = evaluate.get("accuracy"), evaluate.get("val_accuracy")
        if test is None and val is None:
            raise KeyError(f"accuracy or val_accuracy in {EVALUATE_JSON.as_posix()}")
        val = train.get("val_acc") if val is None else val
        return {"seed": int(seed), "test_accuracy": _number(test), "val_accuracy": _number(val),
                "lr_max": float(train["lr_max"]), "train_seconds": float(timing["seconds_total"]),
                "device": str(timing.get("device", "")), "hardware": hardware_of(timing),
                "code_hash": code_hash(code), "source": source}
    except KeyError as exc:
        raise StaleRun(f"{source}: its metrics lack {exc.args[0]}") from None
    except (TypeError, ValueError) as exc:
        raise StaleRun(f"{source}: a metric that is not a number ({exc})") from None


def _number(value) -> float | None:
    return None if value is None else float(value)


def workspace_run(config: Config, seeds: list[int]) -> Run | None:
    """The workspace's own run when it is one of `seeds` under the study's params and code, else None (says why)."""
    if not Path("dvc.lock").is_file():
        return None
    clean = git("status", "--porcelain", "--", "dvc.lock", "params.yaml", *ROW_FILES).stdout == ""
    source = f"workspace at {head()[:7]}" if clean else "workspace (uncommitted)"
    try:
        run = read_run(workspace_reader, source, make_row)
    except StaleRun as exc:
        log(f"the workspace's run is not reused: {exc}")
        return None
    if run.params.get("seed") not in seeds:
        return None
    try:
        refuse_other(as_config(run), config, f"the {source}", "the study")
    except StudyError as exc:
        log(f"the workspace's run (seed {run.params['seed']}) is not reused: {exc}")
        return None
    return run


def as_config(run: Run) -> Config:
    return Config({k: v for k, v in run.params.items() if k != "seed"}, run.code)


def finished_experiment(study: str, seed: int, config: Config, baseline: str) -> tuple[Run | None, str]:
    """A finished experiment of this seed under the study's configuration, and the first free experiment name."""
    for k in range(1, 100):
        name = f"{study}-seed{seed}" + (f"-{k}" if k > 1 else "")
        ref = exp_ref(baseline, name)
        if not ref_exists(ref):
            return None, name
        try:
            run = read_run(git_reader(ref), f"experiment {name}", make_row)
            refuse_other(as_config(run), config, f"experiment {name}", "the study")
        except StudyError:
            continue
        if run.params.get("seed") == seed:
            return run, name
    raise StudyError(f"experiments {study}-seed{seed}-2 to -99 all exist: remove some (`dvc exp remove`)")


def run_seed(seed: int, name: str, overrides: list[str], targets: list[str], baseline: str) -> Run:
    """`dvc exp run --temp` of one seed, in the foreground; its output is DVC's and the stages' own."""
    ref = run_experiment(f"seed {seed}", name, [f"seed={seed}", *overrides], targets, baseline)
    return read_run(git_reader(ref), f"experiment {name}", make_row)


def run_study(name: str, seeds: list[int], overrides: list[str], reuse_workspace: bool = True) -> pd.DataFrame:
    """Run every seed of `seeds` that the study lacks; write the study's files after each. Returns the rows."""
    if not NAME.fullmatch(name):
        raise StudyError(f"study name {name!r}: letters, digits, '_', '.' and '-' only (it names a folder and "
                         "DVC experiments)")
    if not Path("dvc.yaml").is_file() or not Path("params.yaml").is_file():
        raise StudyError("no dvc.yaml and params.yaml here: run the study from the repository root")
    folder = STUDIES / name
    graph = dvc_yaml_graph()
    config = Config({k: v for k, v in wanted_params(overrides).items() if k != "seed"}, current_code(graph))
    rows = load_study(folder, config)
    done = sorted(set(int(s) for s in rows["seed"]) & set(seeds))
    todo = [s for s in seeds if s not in done]
    if done:
        log(f"study {name}: seed(s) {_list(done)} already done, not run again")
    if todo:
        rows = run_seeds(name, folder, config, rows, todo, overrides, row_targets(graph), reuse_workspace)
    if len(rows):
        write_study(folder, name, config, rows)
    return rows


def run_seeds(name, folder, config, rows, todo, overrides, targets, reuse_workspace) -> pd.DataFrame:
    check_tracked(config.code)
    workspace = workspace_run(config, todo) if reuse_workspace else None
    for seed in todo:
        baseline = head()  # a person may commit the study between seeds
        if workspace is not None and workspace.params["seed"] == seed:
            run, how = workspace, workspace.row["source"]
        else:
            run, exp_name = finished_experiment(name, seed, config, baseline)
            how = f"experiment {exp_name}, already run"
            if run is None:
                run, how = run_seed(seed, exp_name, overrides, targets, baseline), f"experiment {exp_name}"
        refuse_other(as_config(run), config, f"seed {seed}'s run ({how})", "the study")
        rows = pd.DataFrame(rows.to_dict("records") + [run.row], columns=COLUMNS)
        write_study(folder, name, config, rows)
        column = headline(run.row["test_accuracy"] is not None)
        log(f"seed {seed}: {SPLIT_NAMES[column]} accuracy {run.row[column]:.4f} (from {how}); "
            f"{len(rows)} seed(s) in {folder}")
    return rows


def _list(seeds: list[int]) -> str:
    return ", ".join(str(s) for s in seeds)


def parse_args(argv=None) -> argparse.Namespace:
    first, _, rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(prog="python -m cifar_resnet.lab.seed_study", description=first,
                                     epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the study: its files go to studies/NAME/ (letters, digits, _ . -)")
    parser.add_argument("--seeds", required=True, help="seeds to have in the study: 0-4, or 0,3,7-9")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params override, as `dvc exp run -S` takes it (repeatable); part of the configuration")
    parser.add_argument("--device", help="train.device for the runs (cuda, cpu, mps, auto): the same as "
                                         "--set train.device=DEVICE, so part of the configuration")
    parser.add_argument("--no-workspace", action="store_true",
                        help="never take a seed from the workspace's own run (dvc.lock); run it as an experiment")
    return parser.parse_args(argv)


def overrides_of(args: argparse.Namespace) -> list[str]:
    keys = [set_key(o) for o in args.set]
    if "seed" in keys:
        raise StudyError("--set seed=...: the seeds come from --seeds")
    if args.device and "train.device" in keys:
        raise StudyError("--device and --set train.device: give one of them")
    return args.set + ([f"train.device={args.device}"] if args.device else [])


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: one_line(lambda: run_study(args.name, parse_seeds(args.seeds), overrides_of(args),
                                                          reuse_workspace=not args.no_workspace)),
                       f"the seeds that finished are in {STUDIES / args.name}/runs.csv; run the same command again "
                       "to go on")


if __name__ == "__main__":
    sys.exit(main())
