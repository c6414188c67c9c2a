"""Stage `evaluate`: accuracy, loss and per-class accuracy of the trained model on one split (evaluate.split:
the validation split when data.val_size > 0, else the test split), with optional test-time augmentation
(evaluate.tta); the confusion matrix; the predictions the gallery draws from."""

from cifar_resnet.bootstrap import start_stage_process

start_stage_process(fast_allocator=True)  # before torch is imported: see its docstring

from functools import partial  # noqa: E402

import numpy as np  # noqa: E402

from cifar_resnet.atomic import write_json, write_npz, write_text  # noqa: E402
from cifar_resnet.config import evaluation_split, load_params  # noqa: E402
from cifar_resnet.data import load_split  # noqa: E402
from cifar_resnet.evaluate import evaluate  # noqa: E402
from cifar_resnet.loader import EvalLoader  # noqa: E402
from cifar_resnet.model import load_trained  # noqa: E402
from cifar_resnet.paths import (CONFUSION_CSV, DATA_DIR, EVALUATE_JSON, EVALUATE_TIMING, MODEL,  # noqa: E402
                                PREDICTIONS)
from cifar_resnet.runtime import pick_runtime, synchronize  # noqa: E402
from cifar_resnet.stage_door import log, run_stage  # noqa: E402
from cifar_resnet.timing import PartTimer  # noqa: E402


def main() -> None:
    timer = PartTimer()
    params = load_params()
    runtime = pick_runtime(params.train)
    timer.sync = partial(synchronize, runtime.device)
    with timer.part("data"):  # the weights and the images, on the device
        model, saved = load_trained(MODEL)
        model = model.to(runtime.device, memory_format=runtime.memory_format)
        split = evaluation_split(params)
        images = load_split(DATA_DIR, split, params.data)
        loader = EvalLoader(images.images, images.labels, params.evaluate.batch_size, saved["mean"], saved["std"],
                            runtime.device, memory_format=runtime.memory_format)
    with timer.part("evaluation"):
        loss, accuracy, probs = evaluate(model, loader, runtime, params.evaluate.tta)
        probs = probs.cpu().numpy()
    true, pred = images.labels.numpy(), probs.argmax(1)
    classes = saved["classes"]
    per_class = {name: round(float((pred[true == k] == k).mean()), 6) if (true == k).any() else None
                 for k, name in enumerate(classes)}
    with timer.part("outputs"):
        write_npz(PREDICTIONS, probs=probs.astype(np.float32), labels=true, indices=np.arange(len(true)))
        write_text(CONFUSION_CSV, "actual,predicted\n" + "".join(f"{classes[t]},{classes[p]}\n"
                                                              for t, p in zip(true, pred)))
    timer.write(EVALUATE_TIMING)
    write_json(EVALUATE_JSON, metrics(split, params.evaluate.tta, accuracy, loss, len(true), per_class))
    log(f"evaluate: {split} accuracy {accuracy:.4f}, loss {loss:.4f} on {len(true)} images, TTA "
        f"{params.evaluate.tta} ({runtime.describe()})")


def metrics(split: str, tta: str, accuracy: float, loss: float, n: int, per_class: dict) -> dict:
    """The test split's numbers under `accuracy` and `loss`; the validation split's under `val_accuracy` and
    `val_loss`, so that a test number never stands where a validation one is expected."""
    prefix = "" if split == "test" else "val_"
    out = {f"{prefix}accuracy": round(accuracy, 6), f"{prefix}loss": round(loss, 6), "num_images": n,
           "per_class_accuracy": per_class}
    if split != "test":
        out["split"] = split
    if tta != "none":
        out["tta"] = tta
    return out


if __name__ == "__main__":
    run_stage(main, __doc__)
