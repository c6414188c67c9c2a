"""Seed studies: one configuration of the pipeline, run for many seeds through DVC, summarised in studies/<name>/.

    python -m cifar_resnet.study NAME --seeds 0-4 [--set key=value ...] [--device cuda]
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
import hashlib
import json
import math
import re
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from cifar_resnet.atomic import atomic_path, write_json
from cifar_resnet.config import read_yaml
from cifar_resnet.entry import run_command
from cifar_resnet.errors import CifarResnetError
from cifar_resnet.paths import EVALUATE_JSON, TRAIN_JSON, TRAIN_TIMING

STUDIES = Path("studies")
# The files a row is read from; the stages that write them, and all upstream of those, make the study's code.
ROW_FILES = [EVALUATE_JSON.as_posix(), TRAIN_JSON.as_posix(), TRAIN_TIMING.as_posix()]
COLUMNS = ["seed", "test_accuracy", "val_accuracy", "lr_max", "train_seconds", "device", "hardware", "code_hash",
           "source"]
TEXT_COLUMNS = {"device": str, "hardware": str, "code_hash": str, "source": str}  # a hex hash can look like 1e5
SUMMARISED = ["test_accuracy", "val_accuracy", "lr_max", "train_seconds"]
SPLIT_NAMES = {"test_accuracy": "test", "val_accuracy": "validation"}  # in the lines and the figure a person reads
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
DIGITS = 6  # summary values are rounded here: accuracies to 1e-4 %, seconds to microseconds


class StudyError(CifarResnetError):
    """A study cannot go on: bad arguments, another configuration than the study's, a failed run."""


class StaleRun(StudyError):
    """A run's files are not the ones its dvc.lock records (or are missing): its numbers cannot be trusted."""


@dataclass(frozen=True)
class Config:
    params: dict  # dotted key -> value, every param but the seed
    code: dict  # path -> md5

    @property
    def code_hash(self) -> str:
        return code_hash(self.code)


@dataclass(frozen=True)
class Run:
    """One finished pipeline run: its params (seed included), its code and the study row it makes."""
    params: dict
    code: dict
    row: dict


def say(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------- configuration


def parse_seeds(text: str) -> list[int]:
    """'0-4', '0,3,7-9' -> sorted distinct seeds."""
    seeds = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise StudyError(f"--seeds: expected seeds such as 0-4 or 0,3,7-9, got {text!r}")
        seeds.update(range(int(match[1]), int(match[2] or match[1]) + 1))
    return sorted(seeds)


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested params -> {'train.epochs': 24, ...}; lists stay values. dvc.lock's dotted keys flatten the same way."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def code_hash(code: dict) -> str:
    text = "".join(f"{md5}  {path}\n" for path, md5 in sorted(code.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def wanted_params(overrides: list[str]) -> dict:
    """params.yaml with the overrides applied by DVC's own `-S` code (what `dvc exp run -S` runs), flattened.

    Validated like every stage validates it, so a bad value fails here, before any run.
    """
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    from cifar_resnet.config import parse_params

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_bytes(Path("params.yaml").read_bytes())
        try:
            apply_overrides(path, overrides)
        except InvalidArgumentError as exc:
            cause = f": {exc.__cause__}".splitlines()[0] if exc.__cause__ else ""
            raise StudyError(f"--set {' '.join(overrides)}: not a valid override of params.yaml{cause}") from None
        raw = read_yaml(path.read_text())
    parse_params(raw)
    return flatten(raw)


def dvc_yaml_graph() -> dict[str, tuple[list[str], list[str]]]:
    """dvc.yaml's stages as {stage: (deps, outputs)}: read at run time, so the study follows the pipeline."""
    stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    return {name: (stage.get("deps") or [], list(_declared_outputs(stage))) for name, stage in stages.items()}


def current_code(graph: dict) -> dict:
    """The md5 of each code file that the row-making stages read, as the working tree holds it."""
    return {path: _md5_of_file(Path(path)) for path in source_files(graph)}


def row_targets(graph: dict) -> list[str]:
    """The stages that write ROW_FILES: `dvc exp run` of these runs them and all upstream, and skips the gallery."""
    writer = {out: name for name, (_, outs) in graph.items() for out in outs}
    return sorted({writer[f] for f in ROW_FILES if f in writer})


def _declared_outputs(stage: dict):
    for section in ("outs", "metrics", "plots"):
        for entry in stage.get(section) or []:
            yield entry if isinstance(entry, str) else next(iter(entry))


def _md5_of_file(path: Path) -> str:
    if not path.is_file():
        raise StudyError(f"{path}: listed as a dependency in dvc.yaml, but it is not a file here")
    return hashlib.md5(path.read_bytes()).hexdigest()


def source_files(graph: dict[str, tuple[list[str], list[str]]]) -> list[str]:
    """The deps that no stage writes, of the stages that make a row (`row_stages`).

    `graph` maps a stage to (deps, outputs).
    """
    written = {out for _, outs in graph.values() for out in outs}
    return sorted({dep for name in row_stages(graph) for dep in graph[name][0] if dep not in written})


def row_stages(graph: dict[str, tuple[list[str], list[str]]]) -> set[str]:
    """The stages that write ROW_FILES and every stage upstream of them. Upstream counts: the range test picks
    LRMAX, evaluate turns the weights into the test accuracy; a change to either changes the numbers."""
    writer = {out: name for name, (_, outs) in graph.items() for out in outs}
    missing = [f for f in ROW_FILES if f not in writer]
    if missing:
        raise StaleRun(f"no stage writes {', '.join(missing)}")
    seen, todo = set(), [writer[f] for f in ROW_FILES]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += [writer[dep] for dep in graph[name][0] if dep in writer]
    return seen


# ---------------------------------------------------------------------------------------------- reading a run


def folder_reader(folder: Path):
    """A reader of the files under `folder` (None for a missing one)."""
    def read(rel: str) -> bytes | None:
        path = folder / rel
        return path.read_bytes() if path.is_file() else None
    return read


workspace_reader = folder_reader(Path("."))


def git_reader(ref: str):
    def read(rel: str) -> bytes | None:
        result = subprocess.run(["git", "show", f"{ref}:{rel}"], capture_output=True)
        return result.stdout if result.returncode == 0 else None
    return read


def read_run(read, source: str, make=None) -> Run:
    """A finished run from a reader of its files (the workspace, or an experiment's commit).

    Its dvc.lock must record the very files read here, with the params of its params.yaml: anything else is a run
    whose numbers and params may not belong together (StaleRun). `make(read, seed, code, source)` makes its row
    (default `make_row`, the study's; the ablation has its own).
    """
    lock = load_file(read, "dvc.lock", read_yaml, source)
    stages = lock.get("stages") or {}
    graph = {name: ([d["path"] for d in stage.get("deps") or []], [o["path"] for o in stage.get("outs") or []])
             for name, stage in stages.items()}
    params = flatten(load_file(read, "params.yaml", read_yaml, source))
    hashes = _check_lock(read, stages, graph, params, source)
    code = {path: hashes[path] for path in source_files(graph)}
    return Run(params, code, (make or make_row)(read, params["seed"], code, source))


def load_file(read, rel: str, parse, source: str):
    data = read(rel)
    if data is None:
        raise StaleRun(f"{source}: no {rel}")
    return parse(data.decode())


def _check_lock(read, stages: dict, graph: dict, params: dict, source: str) -> dict:
    """Only the stages that make the row: a stale gallery does not matter (an experiment of the row stages leaves
    its entry as it was, so it may record older files). Returns {path: md5} of those stages' deps."""
    written = {o["path"]: o.get("md5") for stage in stages.values() for o in stage.get("outs") or []}
    recorded = {}
    for name in sorted(row_stages(graph)):
        for dep in stages[name].get("deps") or []:
            if dep["path"] in written and dep.get("md5") != written[dep["path"]]:
                raise StaleRun(f"{source}: stage {name} read another {dep['path']} than dvc.lock records")
            if recorded.setdefault(dep["path"], dep.get("md5")) != dep.get("md5"):
                raise StaleRun(f"{source}: dvc.lock records two versions of {dep['path']} (stage {name} and another)")
        for key, value in flatten((stages[name].get("params") or {}).get("params.yaml") or {}).items():
            if params.get(key, ...) != value:
                raise StaleRun(f"{source}: stage {name} ran with {key}={value!r}, params.yaml has "
                               f"{params.get(key, '(nothing)')!r}")
    for rel in ROW_FILES:
        data = read(rel)
        if data is None or hashlib.md5(data).hexdigest() != written[rel]:
            raise StaleRun(f"{source}: {rel} is not the file dvc.lock records")
    return recorded


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


def headline(has_test: bool) -> str:
    """The column a study is judged by: the test accuracy, or the validation accuracy for a configuration whose
    evaluate stage reports the validation split (data.val_size > 0 and evaluate.split auto or val)."""
    return "test_accuracy" if has_test else "val_accuracy"


def hardware_of(timing: dict) -> str:
    device = timing.get("device", "cpu")
    if device == "cpu":
        return str(timing.get("cpu", ""))
    for key in ("gpu", "gpu_name", "device_name"):
        names = timing.get(key)
        if names:  # timing/train.json's `gpu` is a list: one name per visible device
            return ", ".join(map(str, names)) if isinstance(names, list) else str(names)
    return f"{device} (model not recorded)"


# ---------------------------------------------------------------------------------------------- the study files


def read_rows(path: Path) -> pd.DataFrame:
    # round_trip: the floats read back are the floats written, so the summary recomputes exactly
    return pd.read_csv(path, dtype=TEXT_COLUMNS, float_precision="round_trip", keep_default_na=False,
                       na_values={c: [""] for c in COLUMNS if c not in TEXT_COLUMNS})


def load_study(folder: Path, config: Config) -> pd.DataFrame:
    """The study's rows; refuses when the study was made under another configuration."""
    runs = folder / "runs.csv"
    if not runs.is_file():
        return pd.DataFrame(columns=COLUMNS)
    stored_path = folder / "config.json"
    if not stored_path.is_file():
        raise StudyError(f"{runs} exists without {stored_path}: restore it from git or use another study name")
    stored = json.loads(stored_path.read_text())
    refuse_other(Config(flatten(stored["params"]), stored["code"]), config, f"study {folder.name}")
    rows = read_rows(runs)
    stray = sorted(set(rows["code_hash"]) - {stored["code_hash"]})
    if stray:
        raise StudyError(f"{runs}: rows with code hash {', '.join(stray)}, not the study's {stored['code_hash']}")
    return rows


def refuse_other(theirs: Config, ours: Config, what: str, us: str = "this command") -> None:
    """One line naming what differs between two configurations (`what`'s and `us`'s), or nothing when they are the
    same."""
    keys = sorted(k for k in theirs.params.keys() | ours.params.keys()
                  if theirs.params.get(k, ...) != ours.params.get(k, ...))
    if keys:
        k = keys[0]
        more = f" (and {len(keys) - 1} more: {', '.join(keys[1:])})" if len(keys) > 1 else ""
        raise StudyError(f"{what} has {k}={_show(theirs.params, k)} but {us} has {k}={_show(ours.params, k)}"
                         f"{more}: a study holds one configuration; use another study name")
    paths = sorted(p for p in theirs.code.keys() | ours.code.keys() if theirs.code.get(p) != ours.code.get(p))
    if paths:
        more = f" (and {len(paths) - 1} more: {', '.join(paths[1:])})" if len(paths) > 1 else ""
        raise StudyError(f"{what} was run on other code than {us}: {paths[0]} differs{more}; "
                         "a study holds one version of the code: use another study name")


def _show(params: dict, key: str) -> str:
    return json.dumps(params[key]) if key in params else "(absent)"


def write_study(folder: Path, name: str, config: Config, rows: pd.DataFrame) -> None:
    """Every file of the study, each atomically: rows first, so an interruption never loses a finished seed."""
    rows = rows.sort_values("seed", kind="stable").reset_index(drop=True)[COLUMNS]
    with atomic_path(folder / "runs.csv") as tmp:
        rows.to_csv(tmp, index=False)
    summary = summarise(read_rows(folder / "runs.csv"))
    write_json(folder / "summary.json", summary)
    write_json(folder / "config.json", {"study": name, "params": unflatten(config.params), "code": config.code,
                                        "code_hash": config.code_hash})
    seeds_figure(folder / "seeds.png", name, rows, summary)


# ---------------------------------------------------------------------------------------------- the summary


def summarise(rows) -> dict:
    """n, seeds, the hardware, and per numeric column: n, median, mean, std (ddof 1), min, max and the 95 % interval
    of the mean (Student's t). A column with no values is left out; std and the interval need two values."""
    rows = pd.DataFrame(rows)
    summary = {"n": int(len(rows)), "seeds": sorted(int(s) for s in rows["seed"]),
               "hardware": sorted({str(h) for h in rows["hardware"]})}
    for column in SUMMARISED:
        values = pd.to_numeric(rows[column], errors="coerce").dropna() if column in rows else pd.Series([])
        if len(values):
            summary[column] = describe(values.astype(float))
    return summary


def describe(values: pd.Series) -> dict:
    n = len(values)
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if n > 1 else None
    half = t95(n - 1) * std / math.sqrt(n) if n > 1 else None
    stats = {"n": n, "median": float(values.median()), "mean": mean, "std": std, "min": float(values.min()),
             "max": float(values.max()), "ci95_low": mean - half if half is not None else None,
             "ci95_high": mean + half if half is not None else None}
    return {k: round(v, DIGITS) if isinstance(v, float) else v for k, v in stats.items()}


def t95(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom: a 95 % interval is mean +- t95 * s / sqrt(n).

    Bisection on the exact CDF, not a table: exact for any df (2.0096 at 49, where 1.96 would be 2.5 % short).
    """
    low, high = 0.0, 1e3
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_central(mid, df) < 0.95 else (low, mid)
    return (low + high) / 2


def _t_central(t: float, df: int) -> float:
    """P(|T| < t) for an integer df, in closed form (Abramowitz and Stegun 26.7.3 and 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 0:
        term = total = 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    term = total = 1.0
    for k in range(1, (df - 1) // 2):
        term *= (2 * k) / (2 * k + 1) * c2
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def seeds_figure(path: Path, name: str, rows: pd.DataFrame, summary: dict) -> None:
    """One dot per seed, the median as a line: the spread a single run's accuracy comes from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    column = headline("test_accuracy" in summary)
    acc = summary[column]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(rows["seed"], rows[column].astype(float) * 100, "o", label="one seed")
    ax.axhline(acc["median"] * 100, color="red", linestyle="--", label=f"median {acc['median'] * 100:.2f} %")
    if acc["ci95_low"] is not None:
        ax.axhspan(acc["ci95_low"] * 100, acc["ci95_high"] * 100, color="grey", alpha=0.2,
                   label="95 % interval of the mean")
    ax.set(xlabel="seed", ylabel=f"{SPLIT_NAMES[column]} accuracy (%)", title=f"study {name}: {summary['n']} seeds")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    with atomic_path(path) as tmp:  # no version stamp: the same rows draw the same bytes
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- running seeds


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def head() -> str:
    result = git("rev-parse", "--verify", "HEAD")
    if result.returncode:
        raise StudyError("no git commit here: DVC experiments start from one (commit the repo first)")
    return result.stdout.strip()


def exp_ref(baseline: str, name: str) -> str:
    return f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"


def ref_exists(ref: str) -> bool:
    return git("rev-parse", "--verify", "--quiet", ref).returncode == 0


def workspace_run(config: Config, seeds: list[int]) -> Run | None:
    """The workspace's own run when it is one of `seeds` under the study's params and code, else None (says why)."""
    if not Path("dvc.lock").is_file():
        return None
    clean = git("status", "--porcelain", "--", "dvc.lock", "params.yaml", *ROW_FILES).stdout == ""
    source = f"workspace at {head()[:7]}" if clean else "workspace (uncommitted)"
    try:
        run = read_run(workspace_reader, source)
    except StaleRun as exc:
        say(f"the workspace's run is not reused: {exc}")
        return None
    if run.params.get("seed") not in seeds:
        return None
    try:
        refuse_other(as_config(run), config, f"the {source}", "the study")
    except StudyError as exc:
        say(f"the workspace's run (seed {run.params['seed']}) is not reused: {exc}")
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
            run = read_run(git_reader(ref), f"experiment {name}")
            refuse_other(as_config(run), config, f"experiment {name}", "the study")
        except StudyError:
            continue
        if run.params.get("seed") == seed:
            return run, name
    raise StudyError(f"experiments {study}-seed{seed}-2 to -99 all exist: remove some (`dvc exp remove`)")


def run_seed(seed: int, name: str, overrides: list[str], targets: list[str], baseline: str) -> Run:
    """`dvc exp run --temp` of one seed, in the foreground; its output is DVC's and the stages' own."""
    ref = run_experiment(f"seed {seed}", name, [f"seed={seed}", *overrides], targets, baseline)
    return read_run(git_reader(ref), f"experiment {name}")


def run_experiment(what: str, name: str, overrides: list[str], targets: list[str], baseline: str) -> str:
    """`dvc exp run --temp -n NAME -S ... TARGETS` in the foreground (its output is DVC's and the stages' own);
    returns the experiment's git ref. `what` starts every line said about it."""
    args = ["exp", "run", "--temp", "-n", name, *[a for o in overrides for a in ("-S", o)], *targets]
    say(f"{what}: running dvc {' '.join(args)}")
    process = subprocess.Popen([sys.executable, "-m", "dvc", *args])
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.wait()  # it got the same Ctrl-C: let DVC remove its temporary copy
        raise
    if code:
        raise StudyError(f"{what}: `dvc {' '.join(args)}` failed (exit code {code}); its output is above")
    ref = exp_ref(baseline, name)
    if not ref_exists(ref):
        raise StudyError(f"{what}: dvc exp run succeeded but made no experiment {name}")
    return ref


def check_tracked(code: dict) -> None:
    """A temporary experiment copies tracked files only: an untracked module would be missing there."""
    untracked = git("ls-files", "--others", "--exclude-standard", "--", *code).stdout.split()
    if untracked:
        raise StudyError(f"{untracked[0]} is not tracked by git, so a DVC experiment would run without it: "
                         "`git add` it (or commit it) first")


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
        say(f"study {name}: seed(s) {_list(done)} already done, not run again")
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
        say(f"seed {seed}: {SPLIT_NAMES[column]} accuracy {run.row[column]:.4f} (from {how}); "
            f"{len(rows)} seed(s) in {folder}")
    return rows


def _list(seeds: list[int]) -> str:
    return ", ".join(str(s) for s in seeds)


# ---------------------------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    first, _, rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(prog="python -m cifar_resnet.study", description=first,
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


def set_key(override: str) -> str:
    """The params key a `dvc exp run -S` override names: `+key=...` adds it, `~key` removes it."""
    return override.split("=", 1)[0].lstrip("+~")


def overrides_of(args: argparse.Namespace) -> list[str]:
    keys = [set_key(o) for o in args.set]
    if "seed" in keys:
        raise StudyError("--set seed=...: the seeds come from --seeds")
    if args.device and "train.device" in keys:
        raise StudyError("--device and --set train.device: give one of them")
    return args.set + ([f"train.device={args.device}"] if args.device else [])


def one_line(work):
    """`work()`, where any exception but Ctrl-C ends as one line: a long command's user needs the cause (with
    where it was raised), not a traceback, and the seeds that finished are safe in runs.csv either way."""
    try:
        return work()
    except CifarResnetError:
        raise
    except Exception as exc:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        raise StudyError(f"unexpected {type(exc).__name__}: {exc} (at {Path(frame.filename).name}:{frame.lineno}, "
                         f"in {frame.name})") from exc


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: one_line(lambda: run_study(args.name, parse_seeds(args.seeds), overrides_of(args),
                                                          reuse_workspace=not args.no_workspace)),
                       f"the seeds that finished are in {STUDIES / args.name}/runs.csv; run the same command again "
                       "to go on")


if __name__ == "__main__":
    sys.exit(main())
