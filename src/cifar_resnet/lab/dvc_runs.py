"""Finished pipeline runs and DVC experiments: reading a run's files (the workspace's, or an experiment's commit),
checking them against the run's dvc.lock, and running one experiment (`dvc exp run --temp`) in the foreground."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cifar_resnet.config import read_yaml
from cifar_resnet.lab.command import LabError
from cifar_resnet.stage_door import log
from cifar_resnet.lab.dvc_graph import ROW_FILES, StaleRun, code_hash, row_stages, source_files
from cifar_resnet.lab.params import flatten


@dataclass(frozen=True)
class Config:
    params: dict  # dotted key -> value
    code: dict  # path -> md5

    @property
    def code_hash(self) -> str:
        return code_hash(self.code)

    def differences(self, other: Config) -> tuple[list[str], list[str]]:
        """(the params keys, the code paths) whose values differ between the two, each sorted."""
        keys = sorted(k for k in self.params.keys() | other.params.keys()
                      if self.params.get(k, ...) != other.params.get(k, ...))
        paths = sorted(p for p in self.code.keys() | other.code.keys() if self.code.get(p) != other.code.get(p))
        return keys, paths


@dataclass(frozen=True)
class Run:
    """One finished pipeline run: its params (seed included), its code and the row a command makes of it."""
    params: dict
    code: dict
    row: dict


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


def load_file(read, rel: str, parse, source: str):
    data = read(rel)
    if data is None:
        raise StaleRun(f"{source}: no {rel}")
    return parse(data.decode())


def read_run(read, source: str, make) -> Run:
    """A finished run from a reader of its files (the workspace, or an experiment's commit).

    Its dvc.lock must record the very files read here, with the params of its params.yaml: anything else is a run
    whose numbers and params may not belong together (StaleRun). `make(read, seed, code, source)` makes its row.
    """
    lock = load_file(read, "dvc.lock", read_yaml, source)
    stages = lock.get("stages") or {}
    graph = {name: ([d["path"] for d in stage.get("deps") or []], [o["path"] for o in stage.get("outs") or []])
             for name, stage in stages.items()}
    params = flatten(load_file(read, "params.yaml", read_yaml, source))
    hashes = check_lock(read, stages, graph, params, source)
    code = {path: hashes[path] for path in source_files(graph)}
    return Run(params, code, make(read, params["seed"], code, source))


def check_lock(read, stages: dict, graph: dict, params: dict, source: str) -> dict:
    """Only the stages that make the row: a stale gallery does not matter (an experiment of the row stages leaves
    its entry as it was, so it may record older files). Returns {path: md5} of those stages' deps."""
    written = written_md5s(stages)
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
        recorded_bytes(read, written, rel, source)
    return recorded


def written_md5s(stages: dict) -> dict:
    """{output path: md5} of every stage in a dvc.lock's `stages`."""
    return {o["path"]: o.get("md5") for stage in stages.values() for o in stage.get("outs") or []}


def recorded_bytes(read, written: dict, rel: str, source: str) -> bytes:
    """The bytes of `rel`, when they are the file dvc.lock records (`written`: written_md5s); else StaleRun."""
    data = read(rel)
    if data is None or hashlib.md5(data).hexdigest() != written.get(rel):
        raise StaleRun(f"{source}: {rel} is not the file dvc.lock records")
    return data


def recorded_file(read, rel: str, source: str) -> bytes:
    """`rel` of a run (a stage output beyond the row's files: the range test's JSON or curve), checked against
    the run's own dvc.lock."""
    lock = load_file(read, "dvc.lock", read_yaml, source)
    return recorded_bytes(read, written_md5s(lock.get("stages") or {}), rel, source)


def hardware_of(timing: dict) -> str:
    """The machine a run's timing file names: the CPU model, or the GPU model(s)."""
    device = timing.get("device", "cpu")
    if device == "cpu":
        return str(timing.get("cpu", ""))
    for key in ("gpu", "gpu_name", "device_name"):
        names = timing.get(key)
        if names:  # timing/train.json's `gpu` is a list: one name per visible device
            return ", ".join(map(str, names)) if isinstance(names, list) else str(names)
    return f"{device} (model not recorded)"


# ---------------------------------------------------------------------------------------------- experiments


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def head() -> str:
    result = git("rev-parse", "--verify", "HEAD")
    if result.returncode:
        raise LabError("no git commit here: DVC experiments start from one (commit the repo first)")
    return result.stdout.strip()


def exp_ref(baseline: str, name: str) -> str:
    return f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"


def ref_exists(ref: str) -> bool:
    return git("rev-parse", "--verify", "--quiet", ref).returncode == 0


def check_tracked(code: dict) -> None:
    """A temporary experiment copies tracked files only: an untracked module would be missing there."""
    untracked = git("ls-files", "--others", "--exclude-standard", "--", *code).stdout.split()
    if untracked:
        raise LabError(f"{untracked[0]} is not tracked by git, so a DVC experiment would run without it: "
                       "`git add` it (or commit it) first")


def run_experiment(what: str, name: str, overrides: list[str], targets: list[str], baseline: str) -> str:
    """`dvc exp run --temp -n NAME -S ... TARGETS` in the foreground (its output is DVC's and the stages' own);
    returns the experiment's git ref. `what` starts every line said about it."""
    args = ["exp", "run", "--temp", "-n", name, *[a for o in overrides for a in ("-S", o)], *targets]
    log(f"{what}: running dvc {' '.join(args)}")
    process = subprocess.Popen([sys.executable, "-m", "dvc", *args])
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.wait()  # it got the same Ctrl-C: let DVC remove its temporary copy
        raise
    if code:
        raise LabError(f"{what}: `dvc {' '.join(args)}` failed (exit code {code}); its output is above")
    ref = exp_ref(baseline, name)
    if not ref_exists(ref):
        raise LabError(f"{what}: dvc exp run succeeded but made no experiment {name}")
    return ref
