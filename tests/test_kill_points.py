"""Kills at every kind of point: a stage SIGKILLed at a named event (tests/kill_stage.py), then run again as
`dvc repro` would run it (its declared outputs deleted first), ends with every output, timing/ aside, byte for byte
what an uninterrupted run wrote.

Ten (stage, event, occurrence) points are drawn with a fixed seed from the events an uninterrupted run met: one of
every kind first, the rest at random, so every kind is hit and the points move with the code, not with the clock."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import REPO, make_workspace, stage_env

HARNESS = Path(__file__).with_name("kill_stage.py")
STAGES = ["check_params", "lr_range_test", "train", "evaluate", "gallery"]  # download: the data is already there
KINDS = {"write:before-replace", "write:after-replace", "fsync", "epoch-end", "range-test-iteration", "eval-batch"}
POINTS, SEED = 10, 20_261_203
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def declared_outputs(stage: str) -> list[str]:
    spec = DVC[stage]
    return [o if isinstance(o, str) else next(iter(o)) for kind in ("outs", "metrics", "plots")
            for o in spec.get(kind, [])]


def outputs(ws: Path, stages=STAGES) -> dict[str, bytes]:
    """Every declared output of `stages`, timing/ aside (it measures the run), by relative path."""
    found = {}
    for stage in stages:
        for rel in declared_outputs(stage):
            path = ws / rel
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            found |= {p.relative_to(ws).as_posix(): p.read_bytes() for p in files if not rel.startswith("timing/")}
    return found


def outputs_of(found: dict[str, bytes], stages) -> dict[str, bytes]:
    declared = [rel for stage in stages for rel in declared_outputs(stage)]
    return {rel: data for rel, data in found.items() if any(rel == d or rel.startswith(d + "/") for d in declared)}


def run(stage: str, ws: Path, cache: Path, events: Path, kill_at: str = "") -> subprocess.CompletedProcess:
    env = stage_env(cache, KILL_EVENTS=str(events), KILL_AT=kill_at,
                    GLIBC_TUNABLES="glibc.malloc.mmap_threshold=4294967296")  # as the stage sets it: no re-exec
    return subprocess.run([sys.executable, str(HARNESS), stage], cwd=ws, env=env, capture_output=True, text=True,
                          timeout=300, start_new_session=True)


def rerun(stage: str, ws: Path, cache: Path, events: Path) -> None:
    """As `dvc repro` reruns a stage: its declared outputs deleted, then the command."""
    for rel in declared_outputs(stage):
        path = ws / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    result = run(stage, ws, cache, events)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted pipeline: the workspace before each stage, the outputs at the end, every event met."""
    root = tmp_path_factory.mktemp("uninterrupted")
    ws = make_workspace(root / "ws", per_batch=64, train={"epochs": 3, "batch_size": 64},
                        lr_range_test={"num_iter": 12})
    events, before = root / "events", {}
    for stage in STAGES:
        before[stage] = root / f"before-{stage}"
        shutil.copytree(ws, before[stage], symlinks=True)
        result = run(stage, ws, root / "cache", events)
        assert result.returncode == 0, result.stdout + result.stderr
    met = Counter(tuple(line.split()) for line in events.read_text().splitlines())
    return before, outputs(ws), met


def drawn_points(met: Counter) -> list[tuple[str, str, int]]:
    """One point of every kind of event, then the rest at random from all that an uninterrupted run met."""
    every = sorted((stage, event, n) for (stage, event), count in met.items() for n in range(1, count + 1))
    rng = random.Random(SEED)
    points = [rng.choice([p for p in every if p[1] == kind]) for kind in sorted(KINDS)]
    points += rng.sample([p for p in every if p not in points], POINTS - len(points))
    return points


@pytest.mark.slow
def test_an_uninterrupted_run_meets_every_kind_of_kill_point(reference):
    _, _, met = reference
    assert {event for _, event in met} == KINDS
    assert met[("train", "epoch-end")] == 3 and met[("lr_range_test", "range-test-iteration")] >= 10


@pytest.mark.slow
def test_a_kill_at_any_point_then_a_rerun_gives_the_uninterrupted_outputs(reference, tmp_path):
    before, expected, met = reference
    for i, (stage, event, n) in enumerate(drawn_points(met)):
        ws, cache, events = tmp_path / f"ws{i}", tmp_path / f"cache{i}", tmp_path / f"events{i}"
        shutil.copytree(before[stage], ws, symlinks=True)
        killed = run(stage, ws, cache, events, kill_at=f"{stage}:{event}:{n}")
        point = f"{stage} killed at {event} #{n}"
        assert killed.returncode == -9, f"{point}: not killed ({killed.returncode})\n{killed.stderr}"
        assert events.read_text().splitlines()[-1] == f"{stage} {event}", point
        rerun(stage, ws, cache, events)
        # The stages after it read only its outputs and earlier ones: those equal, so would theirs.
        done = STAGES[:STAGES.index(stage) + 1]
        got, want = outputs(ws, done), outputs_of(expected, done)
        assert sorted(got) == sorted(want), point
        differ = [rel for rel in want if got[rel] != want[rel]]
        assert not differ, f"{point}: {differ} differ from the uninterrupted run"
        assert not list((cache / "checkpoints").glob("*/checkpoint.pt")), f"{point}: a checkpoint was left"
