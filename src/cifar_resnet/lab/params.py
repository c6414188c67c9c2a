"""params.yaml as the lab compares it: flattened to dotted keys, with overrides applied by DVC's own `-S` code."""

from __future__ import annotations

import tempfile
from pathlib import Path

from cifar_resnet.config import parse_params, read_yaml
from cifar_resnet.lab.command import LabError


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


def set_key(override: str) -> str:
    """The params key a `dvc exp run -S` override names: `+key=...` adds it, `~key` removes it."""
    return override.split("=", 1)[0].lstrip("+~")


def wanted_params(overrides: list[str]) -> dict:
    """params.yaml with the overrides applied by DVC's own `-S` code (what `dvc exp run -S` runs), flattened.

    Validated like every stage validates it, so a bad value fails here, before any run.
    """
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_bytes(Path("params.yaml").read_bytes())
        try:
            apply_overrides(path, overrides)
        except InvalidArgumentError as exc:
            cause = f": {exc.__cause__}".splitlines()[0] if exc.__cause__ else ""
            raise LabError(f"--set {' '.join(overrides)}: not a valid override of params.yaml{cause}") from None
        raw = read_yaml(path.read_text())
    parse_params(raw)
    return flatten(raw)
