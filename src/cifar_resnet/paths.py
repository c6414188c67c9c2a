"""Where the stages read and write: the one place for each path (tests/test_dvc_yaml.py checks dvc.yaml agrees)."""

from pathlib import Path

PARAMS_CHECKED = Path("data/params_checked.txt")
# Wall time of each stage's parts (cifar_resnet.timing); the train stage's is TRAIN_TIMING
LR_RANGE_TIMING = Path("timing/lr_range_test.json")
EVALUATE_TIMING = Path("timing/evaluate.json")
GALLERY_TIMING = Path("timing/gallery.json")
DATA_DIR = Path("data/cifar-10-batches-py")
LR_RANGE_JSON = Path("metrics/lr_range_test.json")
LR_RANGE_TSV = Path("plots/lr_range_test.tsv")
LR_RANGE_PNG = Path("plots/lr_range_test.png")
MODEL = Path("models/model.pt")
MODEL_SUMMARY = Path("models/summary.txt")
TRAIN_JSON = Path("metrics/train.json")
TRAIN_HISTORY = Path("plots/history.tsv")
TRAIN_TIMING = Path("timing/train.json")
# Live, per epoch, while train runs (cifar_resnet.live; DVCLive's layout under dvclive/)
LIVE_METRICS = Path("dvclive/metrics.json")
LIVE_PLOTS = Path("dvclive/plots/metrics")
EVALUATE_JSON = Path("metrics/evaluate.json")
CONFUSION_CSV = Path("plots/confusion.csv")
PREDICTIONS = Path("models/predictions.npz")
GALLERY_PNG = Path("plots/gallery.png")
CURVES_PNG = Path("plots/curves.png")
SCHEDULE_PNG = Path("plots/lr_schedule.png")
