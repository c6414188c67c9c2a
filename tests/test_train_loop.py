"""The divergence watch: the first bad step is named even when the watch is read only every few steps."""

import math
import multiprocessing
from dataclasses import replace

import pytest
import torch

from cifar_resnet.errors import DivergedError
from cifar_resnet.schedule import OneCycle
from cifar_resnet.step import DivergenceWatch, earliest


def _watch(schedule, every: int) -> DivergenceWatch:
    watch = DivergenceWatch(torch.device("cpu"), max_loss=1000.0, lr_of=schedule, steps_per_epoch=4)
    watch.every = every  # as on an accelerator: read only every `every` steps
    return watch


def _feed(watch, losses):
    for step, value in enumerate(losses):
        watch.update(torch.tensor(value), step)
    watch.check()  # the end of the last epoch


@pytest.mark.parametrize("bad", [math.nan, math.inf, 5e6])
def test_first_bad_step_is_reported_even_when_read_later(bad):
    schedule = OneCycle.for_run(0.01, 1.0, epochs=3, peak_epoch=1, steps_per_epoch=4)
    losses = [2.3, 2.2, 2.1, 2.0, 1.9, 1.8, 1.7, bad, math.nan, 1.0]  # first bad: global step 7
    watch = _watch(schedule, every=5)  # read after steps 5 and 10 only
    with pytest.raises(DivergedError) as info:
        _feed(watch, losses)
    err = info.value
    assert (err.epoch, err.step) == (2, 4) and err.lr == pytest.approx(schedule(7))
    assert "epoch 2, step 4 of 4" in str(err) and f"LR {schedule(7):.6g}" in str(err)


def test_the_watch_reads_on_its_interval():
    schedule = OneCycle.for_run(0.01, 1.0, epochs=3, peak_epoch=1, steps_per_epoch=4)
    watch = _watch(schedule, every=5)
    for step in range(4):
        watch.update(torch.tensor(math.nan if step == 1 else 2.0), step)  # not read yet
    with pytest.raises(DivergedError):
        watch.update(torch.tensor(2.0), 4)  # the fifth step reads it


def test_healthy_losses_pass():
    schedule = OneCycle.for_run(0.01, 1.0, epochs=3, peak_epoch=1, steps_per_epoch=4)
    _feed(_watch(schedule, every=1), [2.3] * 12)


def test_the_watch_reads_every_step_on_the_cpu_and_every_20_elsewhere():
    assert DivergenceWatch(torch.device("cpu"), 1000.0, lambda s: 0.1, 4).every == 1
    assert DivergenceWatch(torch.device("meta"), 1000.0, lambda s: 0.1, 4).every == 20


def test_the_earliest_bad_step_of_any_rank_comes_with_that_ranks_loss():
    first, loss = earliest(torch.tensor([-1, 7, 5, 5]), torch.tensor([0.0, math.nan, 5e6, 3e3]))
    assert (int(first), float(loss)) == (5, 5e6)  # step 5, first on rank 2 (rank 3's tie comes after)
    assert int(earliest(torch.tensor([-1, -1]), torch.tensor([0.0, 0.0]))[0]) == -1


def _diverging_rank(rank: int, store: str, out) -> None:
    """One of two gloo ranks: rank 1's loss goes over the ceiling at step 2, rank 0's stays healthy."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        watch = DivergenceWatch(torch.device("cpu"), max_loss=1000.0, lr_of=lambda s: 0.1, steps_per_epoch=4,
                                world_size=2)
        losses = [2.3, 2.2, 5e6 if rank == 1 else 2.1, 2.0]
        try:
            _feed(watch, losses)
            out.put((rank, None))
        except DivergedError as err:
            out.put((rank, (err.epoch, err.step, err.loss)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_every_rank_names_the_loss_of_the_rank_that_diverged(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_diverging_rank, args=(r, str(tmp_path / "store"), out)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert results == {0: (1, 3, 5e6), 1: (1, 3, 5e6)}  # rank 0 stops too, naming rank 1's loss


# ------------------------------------------------------------------------------- evaluation and checkpoint knobs


def _run(tmp_path, monkeypatch, val_size=0, **train):
    """The history and the checkpointed epochs of a tiny training (the last `val_size` images held out)."""
    import cifar_resnet.checkpoint as checkpoint
    from cifar_resnet.config import parse_params
    from cifar_resnet.runtime import pick_runtime
    from cifar_resnet.train import train as train_loop
    from conftest import tiny_params
    from helpers import tiny_data

    monkeypatch.setenv("CIFAR_RESNET_CACHE", str(tmp_path))
    saved = []
    monkeypatch.setattr(checkpoint, "save", lambda key, state: saved.append(state["epoch"]))
    params = parse_params(tiny_params(data={"val_size": val_size}, train={
        "epochs": 4, "batch_size": 64, "device": "cpu", "threads": 1, **train}))
    data = tiny_data()
    if val_size:
        n = len(data.train_images) - val_size
        data = replace(data, train_images=data.train_images[:n], train_labels=data.train_labels[:n],
                       val_images=data.train_images[n:], val_labels=data.train_labels[n:])
    mean, std = data.mean_std()
    result = train_loop(params, data, mean, std, 0.05, 0.0005, pick_runtime(params.train), run_key="k",
                        log=lambda *_: None)
    return result.history, saved


def test_per_epoch_evaluation_follows_its_knobs(tmp_path, monkeypatch):
    history, _ = _run(tmp_path, monkeypatch)
    assert all("test_acc" in row for row in history)  # the default: every epoch, the test split (no val split)
    history, _ = _run(tmp_path, monkeypatch, eval_split="none")
    assert not any("test_acc" in row or "val_acc" in row for row in history)
    history, _ = _run(tmp_path, monkeypatch, eval_every=3)
    assert ["test_acc" in row for row in history] == [False, False, True, True]  # every 3rd, and the last


def test_with_a_validation_split_no_test_number_is_computed_unless_asked_for(tmp_path, monkeypatch):
    """Choosing on validation: auto evaluates the validation split alone; the test split only when named."""
    def splits(history):
        return [sorted(k for k in row if k.endswith(("_acc", "_loss")) and not k.startswith("train_"))
                for row in history]

    assert splits(_run(tmp_path, monkeypatch, val_size=64, epochs=2)[0]) == [["val_acc", "val_loss"]] * 2
    assert splits(_run(tmp_path, monkeypatch, val_size=64, epochs=2, eval_split="test")[0]) == \
        [["test_acc", "test_loss"]] * 2


def test_checkpoints_follow_their_interval(tmp_path, monkeypatch):
    assert _run(tmp_path, monkeypatch)[1] == [1, 2, 3]  # the last epoch's outputs are the run's own record
    assert _run(tmp_path, monkeypatch, checkpoint_every=2)[1] == [2]


def test_history_with_blank_cells_is_a_rectangular_table(tmp_path):
    from cifar_resnet.atomic import write_tsv

    write_tsv(tmp_path / "h.tsv", [{"epoch": 1, "lr": 0.5}, {"epoch": 2, "lr": 0.25, "test_acc": 0.5}])
    assert (tmp_path / "h.tsv").read_text() == "epoch\tlr\ttest_acc\n1\t0.5\t\n2\t0.25\t0.5\n"
