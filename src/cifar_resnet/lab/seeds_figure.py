"""A seed study's figure: one dot per seed, the median as a line, the 95 % interval of the mean as a band."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cifar_resnet.atomic import atomic_path


def seeds_figure(path: Path, name: str, rows: pd.DataFrame, summary: dict, column: str, split: str) -> None:
    """The spread a single run's accuracy comes from: `column` of the study's rows and summary (the `split`'s
    accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    acc = summary[column]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(rows["seed"], rows[column].astype(float) * 100, "o", label="one seed")
    ax.axhline(acc["median"] * 100, color="red", linestyle="--", label=f"median {acc['median'] * 100:.2f} %")
    if acc["ci95_low"] is not None:
        ax.axhspan(acc["ci95_low"] * 100, acc["ci95_high"] * 100, color="grey", alpha=0.2,
                   label="95 % interval of the mean")
    ax.set(xlabel="seed", ylabel=f"{split} accuracy (%)", title=f"study {name}: {summary['n']} seeds")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    with atomic_path(path) as tmp:  # no version stamp: the same rows draw the same bytes
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
