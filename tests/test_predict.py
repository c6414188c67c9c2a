"""`predict` (the function and `python -m cifar_resnet.predict`) against the evaluate stage's own predictions on
real CIFAR-10 test images written as PNG files; images of other sizes and formats; files and weights it must
refuse with one line naming the file; the model declared as a DVC artifact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cifar_resnet import paths
from cifar_resnet.config import ModelParams
from cifar_resnet.data import load_test_split
from cifar_resnet.errors import DataError
from cifar_resnet.model import ResNet9, save_trained
from cifar_resnet.predict import (RESAMPLE, Classifier, image_files, inference_runtime, main, predict_files,
                                  read_image)

from conftest import CLASSES, REPO, run_stage, stage_env, tiny_params

N_IMAGES = 50  # the evaluate stage's fixed test subset (data.test_limit), evaluated in one batch
# Probabilities of one image from two forward passes (other batch sizes, other kernels) agree within this:
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 5e-3}
PRECISIONS = ["auto", "fp32", "bf16"]  # `auto`: what the stage and the command do by default


def _cli(*args, cwd=REPO, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cifar_resnet.predict", *map(str, args)], cwd=cwd,
                          env=stage_env(), capture_output=True, text=True, timeout=timeout)


def _png(array_hwc: np.ndarray, path: Path) -> Path:
    Image.fromarray(array_hwc).save(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mirror):
    """The train stage (on the CPU) on a small real subset, then the evaluate stage on the device `auto` picks, as
    predict does, once per precision and once with TTA (its predictions.npz kept for each, by (precision, tta)), and
    the evaluated test images written as PNG files, named in test-subset order."""
    ws = tmp_path_factory.mktemp("predict_ws")
    (ws / "data").mkdir()
    (ws / "data" / "cifar-10-batches-py").symlink_to(mirror / "cifar-10-batches-py")  # read, never copied
    env = stage_env(tmp_path_factory.mktemp("cache"), CIFAR10_MIRROR=str(mirror))
    # Two epochs on 2048 real images: about 24 % test accuracy, most classes predicted somewhere.
    params = tiny_params(data={"train_limit": 2048, "test_limit": N_IMAGES},
                         train={"epochs": 2, "batch_size": 128, "threads": 0},
                         evaluate={"batch_size": 1000}, lr_max=0.4)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run_stage("train", ws, env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    evaluated = {}
    params["train"]["device"] = "auto"
    runs = [(p, "none") for p in sorted({inference_runtime().precision, "fp32", "bf16"})]  # auto: one of these
    for precision, tta in runs + [("fp32", "flip+translate")]:
        params["train"]["precision"], params["evaluate"]["tta"] = precision, tta
        (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        result = run_stage("evaluate", ws, env, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        with np.load(ws / paths.PREDICTIONS) as npz:
            evaluated[precision, tta] = {k: npz[k] for k in npz.files}
    test = load_test_split(mirror / "cifar-10-batches-py", N_IMAGES)  # the very images the stage evaluated
    assert np.array_equal(evaluated["fp32", "none"]["labels"], test.labels.numpy())
    images = ws / "images"
    images.mkdir()
    hwc = test.images.permute(0, 2, 3, 1).numpy()
    pngs = [_png(im, images / f"{i:03d}.png") for i, im in enumerate(hwc)]
    return SimpleNamespace(ws=ws, model=ws / paths.MODEL, evaluated=evaluated, images=images, pngs=pngs, hwc=hwc)


# ------------------------------------------------------------------------------------- against the evaluate stage


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
def test_predict_gives_the_evaluate_stages_classes_and_probabilities(trained, precision):
    resolved = inference_runtime(precision=precision).precision  # `auto` resolves here as in the stage
    tol = TOLERANCE[resolved]
    evaluated = trained.evaluated[resolved, "none"]["probs"]
    assert len(set(evaluated.argmax(1))) >= 4, "a model that predicts one class everywhere proves little"
    # As the stage ran: one batch of the 50 images. The same class for every image, probabilities within tol.
    results = predict_files([trained.images], trained.model, top_k=10, precision=precision, batch_size=N_IMAGES)
    assert [r.path for r in results] == [str(p) for p in trained.pngs]  # the folder's files, sorted
    assert all(r.error is None for r in results)
    probs = np.stack([r.probs for r in results])
    assert probs.dtype == np.float32 and probs.shape == evaluated.shape == (N_IMAGES, 10)
    assert np.array_equal(probs.argmax(1), evaluated.argmax(1))
    np.testing.assert_allclose(probs, evaluated, rtol=0, atol=tol)
    # Every class, best first, named from the weights file; the top probabilities are the probabilities.
    for r in results:
        names, values = zip(*r.top)
        assert sorted(names) == sorted(CLASSES) and list(values) == sorted(values, reverse=True)
        assert names[0] == CLASSES[int(r.probs.argmax())]
        assert values == tuple(float(r.probs[CLASSES.index(n)]) for n in names)
        assert abs(sum(values) - 1) < 1e-5
    # Batches of 16 (the last one partial): each file keeps its own result, within the precision's tolerance;
    # the class may differ only where the stage's top two are closer than that.
    batched = np.stack([r.probs for r in predict_files(trained.pngs, trained.model, top_k=1,
                                                       precision=precision, batch_size=16)])
    np.testing.assert_allclose(batched, evaluated, rtol=0, atol=tol)
    top2 = np.sort(evaluated, axis=1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * tol
    assert np.array_equal(batched.argmax(1)[decided], evaluated.argmax(1)[decided])


@pytest.mark.slow
def test_fp32_in_the_stages_batch_gives_the_stages_bytes(trained):
    """The same pixels (PNG is lossless), normalisation, batch and forward as the stage: the same numbers."""
    results = predict_files(trained.pngs, trained.model, top_k=1, precision="fp32", batch_size=N_IMAGES)
    assert np.array_equal(np.stack([r.probs for r in results]), trained.evaluated["fp32", "none"]["probs"])


@pytest.mark.slow
def test_test_time_augmentation_is_the_stages(trained, capsys):
    """--tta runs the evaluate stage's own views (flip+translate: 6 views) and averages them as it does."""
    evaluated = trained.evaluated["fp32", "flip+translate"]["probs"]
    assert not np.allclose(evaluated, trained.evaluated["fp32", "none"]["probs"], atol=1e-3)  # TTA changed them
    results = predict_files(trained.pngs, trained.model, top_k=1, precision="fp32", batch_size=N_IMAGES,
                            tta="flip+translate")
    probs = np.stack([r.probs for r in results])
    assert np.array_equal(probs.argmax(1), evaluated.argmax(1))
    np.testing.assert_allclose(probs, evaluated, rtol=0, atol=TOLERANCE["fp32"])
    assert main(["--model", str(trained.model), "--precision", "fp32", "--tta", "flip+translate", "--top-k", "1",
                 str(trained.pngs[0])]) == 0
    name, p = capsys.readouterr().out.strip().rpartition(": ")[2].split(" ")
    assert name == CLASSES[int(evaluated[0].argmax())] and abs(float(p) - evaluated[0].max()) <= 5e-5 + 1e-5


@pytest.mark.slow
def test_the_command_prints_top_k_and_names_the_files_it_cannot_read(trained, tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "notes.png").write_text("not an image at all\n")  # an image's name, text inside
    (extra / "empty.png").write_bytes(b"")
    Image.fromarray(trained.hwc[0]).resize((64, 48), RESAMPLE).save(extra / "wide.png")  # not 32x32
    Image.fromarray(trained.hwc[1]).save(extra / "photo.jpg", quality=95)  # lossy, another format
    (extra / "README.txt").write_text("a folder's other files are skipped")
    result = _cli("--model", trained.model, "--top-k", "3", "--precision", "fp32", trained.images, extra)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"{extra / 'empty.png'}: not an image (no format Pillow reads)",
                                          f"{extra / 'notes.png'}: not an image (no format Pillow reads)"]
    lines = result.stdout.splitlines()
    printed = [str(p) for p in trained.pngs] + [str(extra / "photo.jpg"), str(extra / "wide.png")]
    assert [line.rpartition(": ")[0] for line in lines] == printed
    expected = predict_files(printed, trained.model, top_k=3, precision="fp32")
    for line, want in zip(lines, expected):
        top = [pair.split(" ") for pair in line.rpartition(": ")[2].split(", ")]
        assert [name for name, _ in top] == [name for name, _ in want.top]
        assert all(abs(float(p) - q) <= 5e-5 + 1e-5 for (_, p), (_, q) in zip(top, want.top))
    evaluated = trained.evaluated["fp32", "none"]["probs"]
    assert [line.rpartition(": ")[2].split(" ")[0] for line in lines[:N_IMAGES]] == \
        [CLASSES[k] for k in evaluated.argmax(1)]


@pytest.mark.slow
def test_the_command_writes_json_lines(trained, tmp_path, capsys):
    missing = tmp_path / "gone.png"
    assert main(["--model", str(trained.model), "--json", "--top-k", "2", str(trained.pngs[0]), str(missing)]) == 1
    out, err = capsys.readouterr()
    assert err == ""
    first, second = (json.loads(line) for line in out.splitlines())
    assert first["path"] == str(trained.pngs[0]) and len(first["top"]) == 2
    assert first["top"][0]["probability"] >= first["top"][1]["probability"]
    assert first["top"][0]["class"] in CLASSES
    assert second == {"path": str(missing), "error": "no such file or folder"}


# ------------------------------------------------------------------------------------- weights it must refuse


def _mismatched(path: Path) -> Path:
    """A model file whose weights (channels 8..64) do not fit the network its own config describes (16..128)."""
    save_trained(path, ResNet9((8, 16, 32, 64)), ModelParams(channels=(16, 32, 64, 128)), (125.0,) * 3,
                 (63.0,) * 3, CLASSES, {})
    return path


def _text(path: Path) -> Path:
    path.write_text("hello")
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _bare_state_dict(path: Path) -> Path:
    """Weights alone, without the config, mean, std and class names the train stage saves with them."""
    torch.save(ResNet9((8, 16, 32, 64)).state_dict(), path)
    return path


BAD_MODELS = {  # a file -> words its one line holds
    "mismatched": (_mismatched, "not fit"),
    "text": (_text, "not a readable model file"),
    "empty": (_empty, "not a readable model file"),
    "bare state dict": (_bare_state_dict, "'model'"),
    "missing": (lambda path: path, "missing (run the train stage)"),
}


@pytest.mark.parametrize("kind", BAD_MODELS)
def test_unusable_weights_raise_one_line_naming_the_file(kind, tmp_path):
    make, words = BAD_MODELS[kind]
    model = make(tmp_path / "model.pt")
    _png(np.zeros((32, 32, 3), np.uint8), tmp_path / "a.png")
    with pytest.raises(DataError) as info:
        predict_files([tmp_path / "a.png"], model, device="cpu", precision="fp32")
    message = str(info.value)
    assert message.startswith(f"{model}: ") and words in message and "\n" not in message


def test_the_command_names_the_weights_file_in_one_line(tmp_path, capsys):
    model = _mismatched(tmp_path / "model.pt")
    image = _png(np.zeros((32, 32, 3), np.uint8), tmp_path / "a.png")
    assert main(["--model", str(model), str(image)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"error: {model}: ") and "not fit" in err


def test_weights_with_the_wrong_number_of_class_names_are_refused(tmp_path):
    model = tmp_path / "model.pt"
    save_trained(model, ResNet9((8, 16, 32, 64)), ModelParams(channels=(8, 16, 32, 64)), (125.0,) * 3,
                 (63.0,) * 3, CLASSES[:9], {})
    with pytest.raises(DataError, match=f"^{model}: expected 10 class names"):
        Classifier.load(model, inference_runtime("cpu", "fp32"))


# ------------------------------------------------------------------------------------- images, files, folders


def test_images_of_any_size_and_mode_become_32x32_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(read_image(_png(rgb, tmp_path / "same.png")), rgb)  # 32x32 PNG: byte for byte
    wide = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    wide.save(tmp_path / "wide.png")
    assert np.array_equal(read_image(tmp_path / "wide.png"),
                          np.asarray(wide.resize((32, 32), Image.Resampling.BICUBIC)))  # squashed, bicubic
    grey = Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8))  # mode L
    grey.save(tmp_path / "grey.png")
    out = read_image(tmp_path / "grey.png")
    assert out.shape == (32, 32, 3) and np.array_equal(out[..., 0], out[..., 2])
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.gif")
    Image.fromarray(rgb).save(tmp_path / "photo.jpg")
    for name in ("alpha.png", "palette.gif", "photo.jpg"):
        out = read_image(tmp_path / name)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8, name


@pytest.fixture
def untrained(tmp_path) -> Path:
    """An untrained narrow model: enough to show which files get a prediction."""
    path = tmp_path / "model.pt"
    save_trained(path, ResNet9((8, 16, 32, 64)), ModelParams(channels=(8, 16, 32, 64)), (125.0,) * 3, (63.0,) * 3,
                 CLASSES, {})
    return path


@pytest.mark.parametrize("times_the_limit", [1.5, 3])  # Pillow warns up to twice its limit, then raises
def test_decompression_bombs_are_refused_and_the_others_classified(untrained, tmp_path, monkeypatch,
                                                                  times_the_limit):
    big = _png(np.zeros((60, 100, 3), np.uint8), tmp_path / "big.png")  # 6,000 pixels
    good = _png(np.zeros((40, 40, 3), np.uint8), tmp_path / "good.png")  # 1,600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(6000 / times_the_limit))
    results = predict_files([big, good], untrained, device="cpu", precision="fp32")
    assert [r.path for r in results] == [str(big), str(good)]
    assert results[0].error == (f"refused: more than Image.MAX_IMAGE_PIXELS ({int(6000 / times_the_limit)}) "
                                f"pixels, Pillow's limit against decompression bombs")
    assert results[1].error is None and results[1].probs.shape == (10,)


def test_a_fifo_a_device_and_a_folder_are_refused_without_blocking(untrained, tmp_path):
    good = [_png(np.full((32, 32, 3), v, np.uint8), tmp_path / f"{v}.png") for v in (0, 255)]
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer that never comes
    folder = tmp_path / "folder.png"
    folder.mkdir()
    for path, kind in ((os.devnull, "a character device"), (folder, "a folder")):
        with pytest.raises(DataError, match=rf"^not a regular file \({kind}\)$"):
            read_image(path)
    # The FIFO only in a subprocess, whose timeout stands between a regression and a hung suite.
    result = _cli("--model", untrained, "--device", "cpu", "--precision", "fp32", good[0], fifo, os.devnull,
                  good[1], timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"{fifo}: not a regular file (a FIFO)",
                                          f"{os.devnull}: not a regular file (a character device)"]
    assert [line.rpartition(": ")[0] for line in result.stdout.splitlines()] == [str(good[0]), str(good[1])]


def test_folders_give_their_image_files_sorted_and_not_recursively(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.PNG", "a.jpg", "c.webp", "notes.txt", ".hidden.png", "sub/deep.png"):
        (folder / name).write_bytes(b"")
    (tmp_path / "empty").mkdir()
    assert image_files([folder, tmp_path / "empty", tmp_path / "gone", folder / "notes.txt"]) == [
        (str(folder / "a.jpg"), None), (str(folder / "b.PNG"), None), (str(folder / "c.webp"), None),
        (str(tmp_path / "empty"), "no image files in this folder"),
        (str(tmp_path / "gone"), "no such file or folder"),
        (str(folder / "notes.txt"), None)]  # named on purpose: tried (and refused if it is no image)
    assert image_files(folder / "a.jpg") == image_files([folder / "a.jpg"])  # one path, not a list of them


def test_help_documents_the_command(tmp_path):
    result = _cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for words in ("python -m cifar_resnet.predict", "PATH", "--top-k", "--device", "--model", "--json",
                  "bicubic", "mean and std", "exit code 1"):
        assert words in result.stdout, words
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- the DVC artifact


def test_the_model_is_declared_as_a_dvc_model_artifact():
    from dvc.repo import Repo
    from dvc.repo.artifacts import check_name_format

    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    with Repo(str(REPO)) as repo:
        artifacts = repo.artifacts.read()
        where = repo.artifacts.get_path("cifar-resnet")  # how `dvc artifacts get` resolves the name
    assert list(artifacts) == ["dvc.yaml"]
    (name, artifact), = artifacts["dvc.yaml"].items()
    check_name_format(name)  # a name `dvc artifacts get` and Studio accept
    assert name == "cifar-resnet" and where == paths.MODEL.as_posix()
    assert artifact.type == "model" and artifact.path == paths.MODEL.as_posix() and artifact.desc
    assert paths.MODEL.as_posix() in dvc_yaml["stages"]["train"]["outs"]  # the train stage makes it


@pytest.mark.slow
def test_dvc_artifacts_get_fetches_a_tagged_version_of_the_weights(tmp_path):
    """A project with this dvc.yaml's `artifacts:` and a stage whose out is the model: after `dvc push` and a GTO
    version tag (annotated, as `gto register` makes), `dvc artifacts get` fetches the weights elsewhere."""
    src, out = tmp_path / "project", tmp_path / "elsewhere"
    src.mkdir()
    out.mkdir()
    env = dict(stage_env(), GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")

    def run(*args, cwd=src):
        result = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"

    dvc = [sys.executable, "-m", "dvc"]
    weights = _mismatched(tmp_path / "weights.pt")  # any bytes will do: the artifact is a file
    shutil.copy(weights, src / "weights.pt")
    stage = {"cmd": "mkdir -p models && cp weights.pt models/model.pt", "deps": ["weights.pt"],
             "outs": [paths.MODEL.as_posix()]}
    artifacts = yaml.safe_load((REPO / "dvc.yaml").read_text())["artifacts"]
    (src / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}, "artifacts": artifacts}))
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run(*dvc, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    run(*dvc, "repro", "-q")
    run(*dvc, "push", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "weights")
    run("git", "tag", "-a", "cifar-resnet@v1.0.0", "-m", "Registering artifact cifar-resnet version v1.0.0")
    run(*dvc, "artifacts", "get", str(src), "cifar-resnet", "--rev", "v1.0.0", cwd=out)
    assert (out / "model.pt").read_bytes() == weights.read_bytes()
