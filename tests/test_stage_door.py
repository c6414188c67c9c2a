"""How a stage process starts: the right interpreter and allocator before any third-party import, and `--help`."""

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import REPO, stage_env


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """An interpreter without the project's packages, like a system python that DVC may find on PATH."""
    root = tmp_path_factory.mktemp("bare")
    venv.create(root, with_pip=False)
    return root / "bin" / "python"


def _download(python: Path, cwd: Path):
    (cwd / "params.yaml").write_text("lr_mx: 0.3\n")  # fails fast once the real interpreter reads it
    return subprocess.run([str(python), str(REPO / "stages" / "download.py")], cwd=cwd, env=stage_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_a_python_without_the_packages_hands_over_to_the_trees_venv(bare_python, tmp_path):
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))  # the tree's own .venv (here: the one running the tests)
    result = _download(bare_python, tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: lr_mx: unknown key (allowed here: augment, data, evaluate, gallery, " \
                                    "lr_max, lr_min_factor, lr_range_test, model, seed, train)"


@pytest.mark.slow
def test_without_a_venv_it_says_what_to_do(bare_python, tmp_path):
    result = _download(bare_python, tmp_path)
    assert result.returncode != 0
    assert "lacks the project's packages" in result.stderr and "make repro" in result.stderr
    assert "Traceback" not in result.stderr


STAGES = sorted(p.stem for p in (REPO / "stages").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_help_describes_the_stage_and_runs_nothing(stage, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "stages" / f"{stage}.py"), "--help"], cwd=tmp_path,
                            env=stage_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"Stage `{stage}`" in result.stdout and "params.yaml" in result.stdout
    assert list(tmp_path.iterdir()) == []  # no params.yaml was needed, nothing was written


@pytest.mark.slow
def test_a_stage_rejects_arguments_it_does_not_take(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "stages" / "train.py"), "--epochs", "3"], cwd=tmp_path,
                            env=stage_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_installed_package_prints_the_model_summary(tmp_path):
    """As the README says: in the activated .venv (no PYTHONPATH), from any folder."""
    env = {k: v for k, v in stage_env().items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "cifar_resnet.model"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "Total params: 6,573,130"
    help_ = subprocess.run([sys.executable, "-m", "cifar_resnet.model", "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "summary" in help_.stdout and "Traceback" not in help_.stderr
