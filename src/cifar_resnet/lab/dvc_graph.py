"""dvc.yaml's graph as the lab reads it: which stages make a result row, and the code those stages read.

The files a row is read from are ROW_FILES; the stages that write them, and every stage upstream of them, make the
row's numbers, so their deps that no stage writes are the row's code (the gallery only draws: not part of it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from cifar_resnet.lab.command import LabError
from cifar_resnet.paths import EVALUATE_JSON, TRAIN_JSON, TRAIN_TIMING

ROW_FILES = [EVALUATE_JSON.as_posix(), TRAIN_JSON.as_posix(), TRAIN_TIMING.as_posix()]


class StaleRun(LabError):
    """A run's files are not the ones its dvc.lock records (or are missing): its numbers cannot be trusted."""


def dvc_yaml_graph() -> dict[str, tuple[list[str], list[str]]]:
    """dvc.yaml's stages as {stage: (deps, outputs)}: read at run time, so the lab follows the pipeline."""
    stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    return {name: (stage.get("deps") or [], list(declared_outputs(stage))) for name, stage in stages.items()}


def declared_outputs(stage: dict):
    for section in ("outs", "metrics", "plots"):
        for entry in stage.get(section) or []:
            yield entry if isinstance(entry, str) else next(iter(entry))


def current_code(graph: dict) -> dict:
    """The md5 of each code file that the row-making stages read, as the working tree holds it."""
    return {path: md5_of_file(Path(path)) for path in source_files(graph)}


def md5_of_file(path: Path) -> str:
    if not path.is_file():
        raise LabError(f"{path}: listed as a dependency in dvc.yaml, but it is not a file here")
    return hashlib.md5(path.read_bytes()).hexdigest()


def code_hash(code: dict) -> str:
    text = "".join(f"{md5}  {path}\n" for path, md5 in sorted(code.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def row_targets(graph: dict) -> list[str]:
    """The stages that write ROW_FILES: `dvc exp run` of these runs them and all upstream, and skips the gallery."""
    writer = {out: name for name, (_, outs) in graph.items() for out in outs}
    return sorted({writer[f] for f in ROW_FILES if f in writer})


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
