"""The loaders: the training epoch as a pure function of (seed, epoch, rank), rank shares, evaluation order, layout."""

import pytest
import torch

from cifar_resnet.loader import EvalLoader, TrainLoader, derive_seed
from helpers import CIFAR_MEAN, CIFAR_STD, CROP, MEAN0, STD1, aug_params, ramp_image, random_images

pytestmark = pytest.mark.usefixtures("one_thread")


N_IMAGES, BATCH = 100, 16


@pytest.fixture(scope="module")
def dataset():
    """Every image is the ramp in channels 0-1 (so they show only the augmentation) and its index + 1 in channel 2."""
    images = ramp_image()[None].repeat(N_IMAGES, 1, 1, 1)
    images[:, 2] = (torch.arange(N_IMAGES, dtype=torch.uint8) + 1).view(-1, 1, 1)
    return images, torch.arange(N_IMAGES)


def identity(x: torch.Tensor) -> torch.Tensor:
    """The dataset index each raw output shows (channel 2 outside the hole)."""
    return x[:, 2].amax(dim=(1, 2)).round().long() - 1


def make_loader(dataset, backend, **kw):
    images, labels = dataset
    return TrainLoader(images, labels, BATCH, MEAN0, STD1, "cpu", aug=aug_params(backend=backend), **kw)


BACKENDS = ["batched", "albumentations"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_loader_epoch_is_a_pure_function_of_seed_and_epoch(dataset, backend):
    loader = make_loader(dataset, backend, seed=3)
    assert len(loader) == N_IMAGES // BATCH == 6  # drop last
    first = list(loader.epoch(1))
    assert len(first) == 6
    for x, y in first:
        assert x.shape == (BATCH, 3, CROP, CROP) and x.dtype == torch.float32
        assert torch.equal(identity(x), y)  # images and labels stay paired
    labels = torch.cat([y for _, y in first])
    assert len(set(labels.tolist())) == 96 and labels.max() < N_IMAGES  # a permutation minus the dropped tail

    def same(a, b):
        return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))

    assert same(first, list(loader.epoch(1)))  # the same epoch again
    assert same(first, list(make_loader(dataset, backend, seed=3).epoch(1)))  # a fresh loader: no hidden state
    other = list(loader.epoch(2))
    assert not torch.equal(torch.cat([y for _, y in other]), labels)  # another order
    # the same images in the same slots would still be augmented differently
    assert not torch.equal(torch.cat([x[:, :2] for x, _ in other]), torch.cat([x[:, :2] for x, _ in first]))
    assert not same(first, list(make_loader(dataset, backend, seed=4).epoch(1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_loader_ranks_take_disjoint_halves_of_the_global_batch(dataset, backend):
    whole = list(make_loader(dataset, backend, seed=7).epoch(5))
    r0 = make_loader(dataset, backend, seed=7, rank=0, world_size=2)
    r1 = make_loader(dataset, backend, seed=7, rank=1, world_size=2)
    assert len(r0) == len(r1) == len(whole)
    b0, b1 = list(r0.epoch(5)), list(r1.epoch(5))
    for (x0, y0), (x1, y1), (_, y) in zip(b0, b1, whole):
        assert len(y0) == len(y1) == BATCH // 2
        assert not set(y0.tolist()) & set(y1.tolist())
        assert torch.equal(torch.cat([y0, y1]), y)  # rank r takes the r-th half of the global batch
        assert torch.equal(identity(x0), y0) and torch.equal(identity(x1), y1)
    # channels 0-1 are the same image everywhere: they differ only if the augmentation does
    assert not torch.equal(torch.cat([x[:, :2] for x, _ in b0]), torch.cat([x[:, :2] for x, _ in b1]))
    again = list(r1.epoch(5))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(b1, again))


def test_eval_loader_is_in_order_normalised_and_keeps_the_last_batch(dataset):
    images, labels = dataset
    images = random_images(N_IMAGES, seed=9)
    loader = EvalLoader(images, labels, BATCH, CIFAR_MEAN, CIFAR_STD, "cpu")
    assert len(loader) == 7
    batches = list(loader)
    assert [len(y) for _, y in batches] == [16] * 6 + [4]
    assert torch.equal(torch.cat([y for _, y in batches]), labels)
    x = torch.cat([x for x, _ in batches])
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    assert torch.allclose(x, (images.float() - mean) / std, atol=1e-6)
    assert torch.equal(x, torch.cat([x for x, _ in loader]))  # no shuffling: every pass is the same


def _batches(loader):
    return loader.epoch(1) if isinstance(loader, TrainLoader) else iter(loader)


@pytest.mark.parametrize("backend", BACKENDS + [None])
def test_loaders_honour_channels_last(dataset, backend):
    images, labels = dataset
    if backend:
        aug = aug_params(backend=backend)
        plain = TrainLoader(images, labels, BATCH, MEAN0, STD1, "cpu", aug=aug, seed=1)
        cl = TrainLoader(images, labels, BATCH, MEAN0, STD1, "cpu", aug=aug, seed=1, memory_format=torch.channels_last)
    else:
        plain = EvalLoader(images, labels, BATCH, MEAN0, STD1, "cpu")
        cl = EvalLoader(images, labels, BATCH, MEAN0, STD1, "cpu", memory_format=torch.channels_last)
    for (xp, yp), (xc, yc) in zip(_batches(plain), _batches(cl)):
        assert xp.is_contiguous() and not xp.is_contiguous(memory_format=torch.channels_last)
        assert xc.is_contiguous(memory_format=torch.channels_last) and not xc.is_contiguous()
        assert xc.shape == xp.shape and torch.equal(xc, xp) and torch.equal(yc, yp)


def test_derive_seed_is_stable_and_separates_keys():
    assert derive_seed(0, "shuffle", 1) == derive_seed(0, "shuffle", 1)
    assert len({derive_seed(0, "shuffle", 1), derive_seed(0, "augment", 1), derive_seed(1, "shuffle", 1),
                derive_seed(0, "shuffle", 2)}) == 4
    assert 0 <= derive_seed("anything") < 2**63
