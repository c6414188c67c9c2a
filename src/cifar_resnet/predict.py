"""Classify image files with the trained weights: `python -m cifar_resnet.predict [options] PATH...`.

Each image (any size, any format Pillow reads) is made to look like a CIFAR-10 image: EXIF orientation applied,
converted to RGB (alpha dropped, grey repeated), resized to 32x32 with Pillow's bicubic filter (antialiased when
shrinking; the whole image, squashed, never cropped) unless it is 32x32 already, then uint8 HWC -> NCHW and
normalised with the mean and std stored in the weights file (0-255 scale). The probabilities come from the evaluate
stage's own forward (`evaluate.tta_logits`, with its test-time augmentation options), on the device and precision
`pick_runtime` chooses; the class names are the file's own.

The library entry points are `predict_files` (a list) and `iter_predictions` (one result per file as soon as its
batch is done); the command line prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cifar_resnet.augment import normalise
from cifar_resnet.config import TrainParams
from cifar_resnet.errors import CifarResnetError, DataError, ParamsError
from cifar_resnet.evaluate import tta_logits
from cifar_resnet.model import load_trained
from cifar_resnet.paths import MODEL
from cifar_resnet.runtime import Runtime, pick_runtime

IMAGE_SIZE = 32
RESAMPLE = Image.Resampling.BICUBIC
DEFAULT_TOP_K = 3
DEFAULT_BATCH_SIZE = 256
TTA_CHOICES = ("none", "flip", "flip+translate")  # as evaluate.tta


@dataclass(frozen=True)
class Prediction:
    """One file's result: every class's probability and the `top` k (class, probability), best first; or, for a
    file that could not be classified, `error` (probs None, top empty)."""

    path: str
    probs: np.ndarray | None = None  # float32, in the order of the weights' class names
    top: tuple[tuple[str, float], ...] = ()
    error: str | None = None

    def line(self) -> str:
        """`path: cat 0.9120, dog 0.0510, frog 0.0120`, or `path: <error>`. Split at the last ': ' to parse."""
        if self.error is not None:
            return f"{self.path}: {self.error}"
        return f"{self.path}: " + ", ".join(f"{name} {p:.4f}" for name, p in self.top)

    def to_json(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "top": [{"class": name, "probability": round(p, 6)} for name, p in self.top]}


class NotAnImage(DataError):
    """A file that Pillow cannot read as an image (the message says why; the caller names the file)."""


@dataclass
class Classifier:
    """Trained weights ready for inference: the model on the runtime's device, its normalisation and class names."""

    model: torch.nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    runtime: Runtime
    tta: str = "none"

    @classmethod
    def load(cls, model_path: str | Path, runtime: Runtime, tta: str = "none") -> Classifier:
        """Raises DataError naming `model_path` for a missing or unreadable file, weights that do not fit the network
        the file describes, or a record without usable mean, std and class names."""
        try:
            model, saved = load_trained(model_path)
            mean, std, classes = (tuple(saved[k]) for k in ("mean", "std", "classes"))
        except DataError:
            raise
        except RuntimeError as exc:  # load_state_dict: tensors of other shapes, missing or unexpected keys
            raise DataError(f"{model_path}: the weights do not fit the network the file describes "
                            f"({_first_detail(exc)})") from None
        except KeyError as exc:
            raise DataError(f"{model_path}: not a model file of this project (no {exc} entry)") from None
        except (IndexError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{model_path}: not a model file of this project ({type(exc).__name__}: "
                            f"{_first_detail(exc)})") from None
        n_classes = model.fc.out_features
        if len(classes) != n_classes or not all(isinstance(c, str) for c in classes):
            raise DataError(f"{model_path}: expected {n_classes} class names, got {list(classes)!r:.200}")
        for name, values in (("mean", mean), ("std", std)):
            if len(values) != 3 or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in values):
                raise DataError(f"{model_path}: '{name}' must be 3 numbers, got {list(values)!r:.200}")
        if min(std) <= 0:
            raise DataError(f"{model_path}: 'std' must be positive, got {list(std)}")
        model = model.to(runtime.device, memory_format=runtime.memory_format)
        return cls(model, mean, std, classes, runtime, tta)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N, 32, 32, 3) -> float32 probabilities (N, classes), on the host."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(self.runtime.device)  # NCHW, as the data
        x = normalise(x, self.mean, self.std).contiguous(memory_format=self.runtime.memory_format)
        return probabilities(self.model, x, self.runtime, self.tta).cpu().numpy()


@torch.no_grad()
def probabilities(model: torch.nn.Module, x: torch.Tensor, runtime: Runtime, tta: str = "none") -> torch.Tensor:
    """float32 softmax probabilities of a normalised batch, computed as the evaluate stage computes them."""
    return torch.softmax(tta_logits(model, x, runtime, tta), dim=1)


def inference_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Device and precision as the stages pick them (`auto`: cuda > mps > cpu; bf16 where native, fp16 on other
    CUDA GPUs, else fp32), channels_last `auto`, every core. Raises ParamsError for a device that is not there."""
    return pick_runtime(TrainParams(device=device, precision=precision))


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> uint8 (32, 32, 3) RGB array, prepared as described in the module docstring.
    Raises NotAnImage (the reason, without the path) for anything Pillow cannot decode, a file it cannot open,
    anything but a regular file (a FIFO would block forever), and an image of more than Image.MAX_IMAGE_PIXELS
    pixels (Pillow's guard against decompression bombs, which only warns up to twice that)."""
    try:
        with _open_regular_file(path) as file:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "palette images with transparency ... RGBA": harmless here
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(file) as image:
                    image = ImageOps.exif_transpose(image).convert("RGB")
                    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), RESAMPLE)
                    return np.array(image, dtype=np.uint8)
    except UnidentifiedImageError:
        raise NotAnImage("not an image (no format Pillow reads)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise NotAnImage(f"refused: more than Image.MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS}) pixels, Pillow's "
                         f"limit against decompression bombs") from None
    except (FileNotFoundError, PermissionError) as exc:
        raise NotAnImage(f"cannot read it ({exc.strerror or type(exc).__name__})") from None
    except NotAnImage:
        raise
    except Exception as exc:  # a truncated or corrupt file raises anything from OSError to SyntaxError in Pillow
        raise NotAnImage(f"not a readable image ({type(exc).__name__}: {_first_detail(exc)})") from None


_KINDS = {"d": "a folder", "p": "a FIFO", "s": "a socket", "c": "a character device", "b": "a block device"}


def _open_regular_file(path: str | Path):
    """`path` opened for reading in binary, or NotAnImage saying what else it is. Opened non-blocking, then
    checked: a FIFO opens at once instead of waiting for a writer, and the check is on what was opened."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotAnImage(f"not a regular file ({_KINDS.get(stat.filemode(mode)[0], 'another kind of file')})")
    return open(fd, "rb")


def image_files(paths) -> list[tuple[str, str | None]]:
    """(path, error) for every input: a file as given; a folder as the files inside with an image extension
    Pillow knows, sorted by name, not recursive (hidden files skipped); a missing path or a folder without image
    files as an error entry. Files given by name are tried whatever their extension."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]  # one path, not its characters
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    found = []
    for path in map(str, paths):
        if os.path.isdir(path):
            inside = sorted(name for name in os.listdir(path) if not name.startswith(".")
                            and os.path.splitext(name)[1].lower() in extensions
                            and os.path.isfile(os.path.join(path, name)))
            if not inside:
                found.append((path, "no image files in this folder"))
            found += [(os.path.join(path, name), None) for name in inside]
        elif os.path.exists(path):
            found.append((path, None))
        else:
            found.append((path, "no such file or folder"))
    return found


def iter_predictions(paths, model_path: str | Path = MODEL, top_k: int = DEFAULT_TOP_K, device: str = "auto",
                     precision: str = "auto", batch_size: int = DEFAULT_BATCH_SIZE, tta: str = "none",
                     runtime: Runtime | None = None):
    """One Prediction per file of `image_files(paths)`, in that order, as each batch of `batch_size` images is done.
    A file that is not an image gives a Prediction with `error`; the weights being unusable raises DataError."""
    if top_k < 1 or batch_size < 1:
        raise ParamsError(f"top_k and batch_size must be at least 1, got {top_k} and {batch_size}")
    if tta not in TTA_CHOICES:
        raise ParamsError(f"tta: expected one of {', '.join(TTA_CHOICES)}, got {tta!r}")
    runtime = runtime or inference_runtime(device, precision)
    classifier = Classifier.load(model_path, runtime, tta)
    k = min(top_k, len(classifier.classes))
    pending: list[tuple[str, str | None]] = []  # (path, error) in input order, up to one batch of images
    images: list[np.ndarray] = []

    def flush():
        probs = iter(classifier(np.stack(images)) if images else ())
        for path, error in pending:
            if error is not None:
                yield Prediction(path, error=error)
                continue
            p = next(probs)
            best = np.argsort(-p, kind="stable")[:k]  # ties: the lower class index first
            yield Prediction(path, p, tuple((classifier.classes[i], float(p[i])) for i in best))
        pending.clear()
        images.clear()

    for path, error in image_files(paths):
        if error is None:
            try:
                images.append(read_image(path))
            except NotAnImage as exc:
                error = str(exc)
        pending.append((path, error))
        if len(images) == batch_size:
            yield from flush()
    yield from flush()


def predict_files(paths, model_path: str | Path = MODEL, top_k: int = DEFAULT_TOP_K, device: str = "auto",
                  precision: str = "auto", batch_size: int = DEFAULT_BATCH_SIZE, tta: str = "none") -> list[Prediction]:
    """Every file's Prediction (see `iter_predictions`), in the order of `image_files(paths)`."""
    return list(iter_predictions(paths, model_path, top_k, device, precision, batch_size, tta))


def _first_detail(exc: BaseException) -> str:
    """One line of an exception's message: the first specific line of a multi-line one (load_state_dict's)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and lines[0].endswith(":"):
        more = len(lines) - 2
        return lines[1].rstrip(".") + (f" (and {more} more)" if more else "")
    return lines[0]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


HELP = """Print the top-k CIFAR-10 classes of each image file, with their probabilities, best first.

Each image (any size, any format Pillow reads) is made to look like a CIFAR-10 image: EXIF orientation applied,
converted to RGB, resized to 32x32 with Pillow's bicubic filter unless it is 32x32 already (the whole image,
squashed, never cropped), then normalised with the mean and std stored in the weights file, whose class names
are printed. Device and precision as the stages pick them (see --device, --precision).

Output: one line per file on stdout, in the order given (a folder's files sorted by name), best class first:
  cats/01.png: cat 0.9120, dog 0.0510, frog 0.0120
(split a line at its last ': '). A file that cannot be classified (not an image, unreadable, missing, not a
regular file such as a FIFO, more pixels than Pillow's decompression-bomb limit) gets `path: <reason>` on stderr
instead, the other files are still classified, and the exit code is 1. Weights that
cannot be used end the run at once with one line naming the file, exit code 1. With --json, every file's line is a
JSON object on stdout instead: {"path", "top": [{"class", "probability"}, ...]} or {"path", "error"}.

The weights are the train stage's output, declared in dvc.yaml as the DVC model artifact `cifar-resnet`: once a
version is registered (`gto register cifar-resnet`) and pushed with the weights in a DVC remote,
`dvc artifacts get <repo URL> cifar-resnet [--rev v1.0.0]` fetches them anywhere."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifar_resnet.predict", description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="image files (any format Pillow reads), or folders: their image files, not recursive")
    parser.add_argument("--model", default=str(MODEL), help="the weights file (default: %(default)s)")
    parser.add_argument("--top-k", type=_positive, default=DEFAULT_TOP_K,
                        help="classes printed per file, best first (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                        help="auto: cuda, then mps, then cpu (default: %(default)s)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="auto: bf16 where the device runs it natively, fp16 on other CUDA GPUs, else fp32 "
                             "(default: %(default)s)")
    parser.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE,
                        help="images per forward pass (default: %(default)s)")
    parser.add_argument("--tta", choices=TTA_CHOICES, default="none",
                        help="test-time augmentation, as evaluate.tta: flip averages the logits of the image and its "
                             "mirror; flip+translate also of copies shifted 1 px each way (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="one JSON object per file on stdout")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="first print the weights file, device, precision and TTA on stderr")
    args = parser.parse_args(argv)
    failed = False
    try:
        runtime = inference_runtime(args.device, args.precision)
        if args.verbose:
            print(f"predict: {args.model} on {runtime.describe()}, TTA {args.tta}", file=sys.stderr, flush=True)
        for result in iter_predictions(args.paths, args.model, args.top_k, batch_size=args.batch_size,
                                       tta=args.tta, runtime=runtime):
            failed |= result.error is not None
            if args.json:
                print(json.dumps(result.to_json()), flush=True)
            else:
                print(result.line(), file=sys.stderr if result.error else sys.stdout, flush=True)
    except ParamsError as exc:  # pick_runtime names the params key; here it is the option
        message = str(exc).replace("train.device", "--device").replace("train.precision", "--precision")
        print(f"error: {message}", file=sys.stderr)
        return 1
    except CifarResnetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
