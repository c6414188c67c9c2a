"""The pipeline's stages run without DVC, for a machine that has torch but not DVC (a lent GPU box: the kind of
machine `make gpu-check` is for).

`run_stages(folder, names, overrides)` copies what the stages read (stages/, src/, dvc.yaml, and params.yaml with
the overrides applied) into `folder`, then runs each named stage's `cmd` from dvc.yaml there, in dvc.yaml's order:
what `dvc repro` runs on a fresh clone, minus DVC's caching (every named stage runs) and minus the live metrics
(DVCLive needs DVC, so `CIFAR_RESNET_LIVE=off`). Calling it again on the same folder with other overrides rewrites
params.yaml and runs the stages named then: the outputs of the earlier ones stay, as in a workspace.

Overrides are `KEY=VALUE`: a dotted key that params.yaml already has and a YAML value, the part of
`dvc exp run -S` an ablation row uses (no `+key` or `~key`). The result is validated like every stage validates
params.yaml, before anything runs.
"""

from __future__ import annotations

import copy
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from cifar_resnet.config import parse_params
from cifar_resnet.errors import CifarResnetError
from cifar_resnet.live import LIVE_ENV

COPIED = ("src", "stages", "dvc.yaml")  # what the stage commands read besides params.yaml and their inputs


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """params.yaml's mapping with each `KEY=VALUE` applied (a copy), validated."""
    out = copy.deepcopy(raw)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key.startswith(("+", "~")):
            raise CifarResnetError(f"override {override!r}: expected KEY=VALUE with a key params.yaml has "
                                   "(without DVC, +key and ~key are not supported)")
        *parents, leaf = key.split(".")
        section = out
        for i, part in enumerate(parents):
            section = section.get(part) if isinstance(section, dict) else None
            if not isinstance(section, dict):
                raise CifarResnetError(f"override {override!r}: params.yaml has no section "
                                       f"{'.'.join(parents[:i + 1])}")
        if leaf not in section:
            raise CifarResnetError(f"override {override!r}: params.yaml has no key {key}")
        section[leaf] = yaml.safe_load(value)
    parse_params(out)
    return out


def stage_commands(names) -> list[tuple[str, str]]:
    """(stage, cmd) for each of `names`, in dvc.yaml's order (which is the pipeline's)."""
    stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    unknown = sorted(set(names) - set(stages))
    if unknown:
        raise CifarResnetError(f"dvc.yaml has no stage {', '.join(unknown)}")
    return [(name, stage["cmd"]) for name, stage in stages.items() if name in set(names)]


def prepare(folder: Path, params: dict) -> None:
    """The code (once) and params.yaml (each time) in `folder`; a `python` on PATH that is this interpreter."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (folder / name).exists():
            continue
        if Path(name).is_dir():
            shutil.copytree(name, folder / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(name, folder / name)
    bin_dir = folder / ".bin"
    if not bin_dir.is_dir():
        bin_dir.mkdir()
        # The commands say `python`; a box may have only python3. A script, not a symlink: a virtual environment's
        # interpreter knows its packages only when started by its own path.
        launcher = bin_dir / "python"
        launcher.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        launcher.chmod(0o755)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stages(folder: Path, names, overrides: list[str], say=print) -> None:
    """Run the stages `names` (dvc.yaml's commands) in `folder` with params.yaml plus `overrides`."""
    params = apply_overrides(yaml.safe_load(Path("params.yaml").read_text()) or {}, overrides)
    commands = stage_commands(names)
    prepare(folder, params)
    env = dict(os.environ, **{LIVE_ENV: "off"})
    env["PATH"] = os.pathsep.join([str(folder / ".bin"), env.get("PATH", "")])
    for name, cmd in commands:
        say(f"stage {name} (without DVC, in {folder}): {cmd}")
        code = subprocess.run(cmd, shell=True, cwd=folder, env=env, check=False).returncode
        if code:
            raise CifarResnetError(f"stage {name} failed (exit code {code}) in {folder}; its output is above")
