"""Per-epoch metrics while the train stage runs, in DVCLive's layout, for `dvc exp show` and the DVC VS Code extension.

The final outputs (metrics/train.json, plots/history.tsv) are written once, atomically, after the last epoch, so a
killed run leaves none of them. These live files are separate from them and rewritten after every epoch:

    dvclive/metrics.json              the latest value of each history column, and `step` = the last epoch done
    dvclive/plots/metrics/<name>.tsv  one table per history column: `step` (the epoch) and the value

dvc.yaml declares both (uncached, so the stage keeps DVC's run-cache). `dvc exp show` reads a running experiment's
declared metrics from its workspace, queued experiments' temporary copies included, so it lists the epochs done so
far; `Live.next_step()` also tells the VS Code extension (through DVC's .dvc/tmp) that a new epoch is there.

The files are a function of the history alone: DVCLive 3.49 writes a wall-clock `timestamp` column only when asked
(`log_metric(..., timestamp=True)`, never done here), so identical runs give identical bytes. `Live()` empties its
folder, and DVC deletes declared outputs before it reruns a stage, so the first call after a start writes the whole
history it is given: a resumed run, whose history comes back from the checkpoint, rebuilds the same files as an
uninterrupted one.
"""

from __future__ import annotations

import os
from pathlib import Path

from cifar_resnet.paths import LIVE_METRICS

LIVE_DIR = LIVE_METRICS.parent
STEP = "epoch"  # the history column that is DVCLive's step
# `off` where DVC is not installed: DVCLive imports DVC, and nothing would read the files.
LIVE_ENV = "CIFAR_RESNET_LIVE"


def wanted() -> bool:
    return os.environ.get(LIVE_ENV, "on") != "off"


class LiveHistory:
    """`on_epoch` for `cifar_resnet.train.train`: called with the whole history after each epoch (rank 0 only)."""

    def __init__(self, folder: Path = LIVE_DIR):
        self.folder = Path(folder)
        self._live = self._open()
        self._written: list[dict] = []

    def _open(self):
        from dvclive import Live  # imports dvc and pandas (seconds): only the process that writes pays for it

        # dvcyaml=None: dvc.yaml declares these files itself; save_dvc_exp=False: DVC makes the experiment.
        return Live(dir=str(self.folder), dvcyaml=None, save_dvc_exp=False, report=None)

    def __call__(self, history: list[dict]) -> None:
        if history[:len(self._written)] != self._written:  # not an extension of what is on disk: start again
            self._live.end()
            self._live, self._written = self._open(), []
        for row in history[len(self._written):]:
            self._live.step = int(row[STEP])
            for name, value in row.items():
                if name != STEP:
                    self._live.log_metric(name, value)
            self._live.next_step()  # metrics.json, and the VS Code extension's signal
            self._written.append(dict(row))

    def close(self) -> None:
        """End the DVCLive run (removes the VS Code signal file); the files stay."""
        self._live.end()
