"""`make bench` end to end on a tiny params.yaml: every part runs and the last line is the promised JSON."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import stage_env, tiny_params


@pytest.mark.slow
def test_bench_prints_the_summary_json(tmp_path):
    params = tiny_params(train={"batch_size": 32, "device": "cpu"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "cifar_resnet.lab.bench", "--steps", "2"], cwd=tmp_path,
                         env=stage_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("img_per_s", "reference_img_per_s", "floor_img_per_s", "speedup", "conv_fraction",
                "peak_fraction", "precision", "threads", "cpu"):
        assert key in summary, key
    assert summary["speedup"] == round(summary["img_per_s"] / summary["reference_img_per_s"], 2)
    assert summary["conv_fraction"] == round(summary["img_per_s"] / summary["floor_img_per_s"], 3)
    assert summary["img_per_s"] > 0 and summary["threads"] >= 1


@pytest.mark.slow
def test_bench_profile_names_the_operators(tmp_path):
    params = tiny_params(train={"batch_size": 32, "device": "cpu"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "cifar_resnet.lab.bench", "--profile", "--steps", "2"], cwd=tmp_path,
                         env=stage_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "convolution" in out.stdout and "Self CPU" in out.stdout
