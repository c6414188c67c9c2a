"""The augmentation semantics (pad + random crop, flip, one cutout hole, normalisation) of both backends.

Every output is explained independently of the code under test: the reference windows come from
torch.nn.functional.pad on the (normalised) float image, and the parameters are recovered from the pixels.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chi2_contingency, chisquare

from cifar_resnet.augment import BatchAugment, albumentations_pipeline
from helpers import (CIFAR_MEAN, CIFAR_STD, CROP, HOLE, HOLE_SPAN, MEAN0, PAD, SPAN, STD1, aug_params, ramp_image,
                     random_images)

MODES = ["reflect", "replicate", "constant"]
NORMS = {"raw": (MEAN0, STD1), "cifar": (CIFAR_MEAN, CIFAR_STD)}


pytestmark = pytest.mark.usefixtures("one_thread")


def normalised(image: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (image.float() - m) / s


def reference_windows(image_f: torch.Tensor, mode: str) -> torch.Tensor:
    """Every unflipped crop of the padded float (3, 32, 32) image, as a view: (SPAN [dy], SPAN [dx], 3, CROP, CROP)."""
    padded = F.pad(image_f[None], (PAD, PAD, PAD, PAD), mode=mode)[0]  # constant pads with 0 (the mean)
    return padded.unfold(1, CROP, 1).unfold(2, CROP, 1).permute(1, 2, 0, 3, 4)


BLOCKS = torch.zeros(HOLE_SPAN, HOLE_SPAN, CROP, CROP, dtype=torch.bool)
for _y in range(HOLE_SPAN):
    for _x in range(HOLE_SPAN):
        BLOCKS[_y, _x, _y:_y + HOLE, _x:_x + HOLE] = True


def explain(out: torch.Tensor, image_f: torch.Tensor, mode: str, atol: float = 0.0):
    """(dy, dx, flip), [(hy, hx), ...]: the one window that `out` shows, and the 8x8 holes that fit its zeros.

    Asserts: exactly one window agrees with `out` on every pixel that is not 0 in `out`, and the zeros of `out`
    are that window's own zeros (constant fill) plus one 8x8 block lying wholly inside the crop.
    """
    wins = reference_windows(image_f, mode)
    zero = (out == 0).all(dim=0)
    # a flipped window equals `out` where the plain window equals `out` read backwards
    agree = torch.stack([((wins - o).abs() <= atol).all(dim=2) for o in (out, out.flip(-1))], dim=2)
    agree[:, :, 1] = agree[:, :, 1].flip(-1)  # (9, 9, 2, 32, 32), in output coordinates
    match = (agree | zero).all(dim=(-2, -1)).nonzero().tolist()
    assert len(match) == 1, f"{len(match)} windows explain the output"
    dy, dx, flip = match[0]
    window = wins[dy, dx].flip(-1) if flip else wins[dy, dx]
    if mode != "constant":  # no fill: the zeros are exactly one 8x8 block
        hy, hx = (int(zero.any(dim=1).float().argmax()), int(zero.any(dim=0).float().argmax()))
        assert int(zero.sum()) == HOLE * HOLE and hy <= CROP - HOLE and hx <= CROP - HOLE
        assert torch.equal(zero, BLOCKS[hy, hx]), "the zeros of the output are not one 8x8 block inside the crop"
        return (dy, dx, bool(flip)), [(hy, hx)]
    window_zero = (window == 0).all(dim=0)
    fits = ((window_zero | BLOCKS) == zero).all(dim=(-2, -1)).nonzero().tolist()
    assert fits, "the zeros of the output are not the fill plus one 8x8 block inside the crop"
    return (dy, dx, bool(flip)), [tuple(f) for f in fits]


# ------------------------------------------------------------------------------------------------- pins, batched


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("mode", MODES)
def test_batched_output_is_a_padded_window_with_one_hole(mode, norm):
    mean, std = NORMS[norm]
    images = random_images(24, seed=1)
    aug = BatchAugment(aug_params(pad_mode=mode), mean, std, "cpu")
    p = aug.draw(len(images), torch.Generator().manual_seed(2))
    out = aug(images, p)
    assert out.shape == (24, 3, CROP, CROP) and out.dtype == torch.float32
    for i in range(len(images)):
        (dy, dx, flip), holes = explain(out[i], normalised(images[i], mean, std), mode)
        # the recovered parameters are the drawn ones
        assert (dy, dx, flip) == (int(p["dy"][i]), int(p["dx"][i]), bool(p["flip"][i]))
        assert (int(p["hy"][i]), int(p["hx"][i])) in holes
        hy, hx = int(p["hy"][i]), int(p["hx"][i])
        assert 0 <= hy <= CROP - HOLE and 0 <= hx <= CROP - HOLE
        assert torch.all(out[i, :, hy:hy + HOLE, hx:hx + HOLE] == 0)
        if mode == "constant":  # padded rows/columns are the mean: exactly 0
            top, bottom = max(0, PAD - dy), max(0, dy - PAD)
            assert torch.all(out[i, :, :top] == 0) and torch.all(out[i, :, CROP - bottom:] == 0)
            left, right = max(0, PAD - dx), max(0, dx - PAD)
            cols = out[i].flip(-1) if flip else out[i]  # undo the flip to find the left pad
            assert torch.all(cols[:, :, :left] == 0) and torch.all(cols[:, :, CROP - right:] == 0)


def test_batched_raw_output_equals_input_pixels():
    """mean 0, std 1: the unholed output pixels are exactly input pixel values (as float)."""
    images = random_images(8, seed=3)
    aug = BatchAugment(aug_params(pad=0, cutout=0, flip_p=0.0), MEAN0, STD1, "cpu")
    out = aug(images, aug.draw(8, torch.Generator().manual_seed(0)))
    assert torch.equal(out, images.float())


@pytest.mark.parametrize("backend", ["batched", "albumentations"])
@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_flip_reverses_column_order(backend, flip_p):
    aug = aug_params(pad=0, cutout=0, flip_p=flip_p)
    image = ramp_image()
    if backend == "batched":
        ba = BatchAugment(aug, MEAN0, STD1, "cpu")
        images = image[None].expand(4, 3, 32, 32).contiguous()
        outs = ba(images, ba.draw(4, torch.Generator().manual_seed(0)))
    else:
        pipe = albumentations_pipeline(aug, MEAN0, STD1, seed=0)
        outs = torch.stack([torch.from_numpy(pipe(image=image.permute(1, 2, 0).numpy())["image"]).permute(2, 0, 1)
                            for _ in range(4)])
    cols = torch.arange(1, 33, dtype=torch.float32)
    expected = cols.flip(0) if flip_p == 1.0 else cols
    for out in outs:
        assert torch.allclose(out[1], expected.expand(32, 32), atol=1e-4)  # every row reads the columns
        assert torch.allclose(out[0], cols.view(32, 1).expand(32, 32), atol=1e-4)  # rows untouched


# ------------------------------------------------------------------------------------------ pins, albumentations


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("mode", MODES)
def test_albumentations_output_is_normalised_padded_window_with_one_hole(mode, norm):
    mean, std = NORMS[norm]
    images = random_images(24, seed=4)
    pipe = albumentations_pipeline(aug_params(pad_mode=mode, backend="albumentations"), mean, std, seed=5)
    flips = []
    for image in images:
        out = pipe(image=image.permute(1, 2, 0).numpy())["image"]
        assert out.shape == (CROP, CROP, 3) and out.dtype == np.float32
        out = torch.from_numpy(out).permute(2, 0, 1)
        (dy, dx, flip), holes = explain(out, normalised(image, mean, std), mode, atol=1e-4)
        flips.append(flip)
        for hy, hx in holes:  # the hole is exactly 0 (the mean) and wholly inside
            assert torch.all(out[:, hy:hy + HOLE, hx:hx + HOLE] == 0)
    assert 0 < sum(flips) < len(flips)  # both flipped and unflipped images occur


# ----------------------------------------------------------------------- statistics: batched vs albumentations

N_DRAWS = 4000


def _padded_profiles():
    """Row profiles of the 9 dy and column profiles of the 18 (dx, flip) for the reflect-padded ramp image."""
    padded = F.pad(ramp_image().float()[None], (PAD,) * 4, mode="reflect")[0]
    rows = torch.stack([padded[0, dy:dy + CROP, 0] for dy in range(SPAN)])  # (9, 32)
    cols = torch.stack([padded[1, 0, dx:dx + CROP] for dx in range(SPAN)])
    cols = torch.cat([cols, cols.flip(-1)])  # index dx + 9 * flip
    assert len(set(map(tuple, rows.tolist()))) == SPAN and len(set(map(tuple, cols.tolist()))) == 2 * SPAN
    return rows, cols


def recover(outs: torch.Tensor):
    """dy, dx, flip, hy, hx of raw (mean 0, std 1) ramp outputs (N, 3, 32, 32), from the pixels alone."""
    outs = outs.round()
    rows, cols = _padded_profiles()
    row_prof = outs[:, 0].amax(dim=2)  # a hole row still shows 24 pixels of its source row
    col_prof = outs[:, 1].amax(dim=1)
    dy_match = (row_prof[:, None] == rows[None]).all(-1)
    col_match = (col_prof[:, None] == cols[None]).all(-1)
    assert torch.all(dy_match.sum(1) == 1) and torch.all(col_match.sum(1) == 1)
    dy, c = dy_match.float().argmax(1), col_match.float().argmax(1)
    zero = (outs == 0).all(dim=1)  # (N, 32, 32): the ramp has no zero, reflect has no fill
    assert torch.all(zero.sum(dim=(1, 2)) == HOLE * HOLE)
    hy = zero.any(dim=2).float().argmax(1)
    hx = zero.any(dim=1).float().argmax(1)
    block = BLOCKS[hy, hx]  # one whole 8x8 block inside the crop
    assert torch.equal(block, zero)
    return dy, c % SPAN, c >= SPAN, hy, hx


@pytest.fixture(scope="module")
def drawn():
    aug = aug_params()
    image = ramp_image()
    ba = BatchAugment(aug, MEAN0, STD1, "cpu")
    batched = ba(image[None].expand(N_DRAWS, 3, 32, 32), ba.draw(N_DRAWS, torch.Generator().manual_seed(11)))
    pipe = albumentations_pipeline(aug, MEAN0, STD1, seed=12)
    hwc = image.permute(1, 2, 0).numpy()
    alb = torch.from_numpy(np.stack([pipe(image=hwc)["image"] for _ in range(N_DRAWS)])).permute(0, 3, 1, 2)
    return {"batched": recover(batched), "albumentations": recover(alb)}


@pytest.mark.parametrize("backend", ["batched", "albumentations"])
def test_crop_offsets_uniform_over_81_positions(drawn, backend):
    dy, dx, *_ = drawn[backend]
    counts = torch.bincount(dy * SPAN + dx, minlength=SPAN * SPAN).numpy()
    assert len(counts) == SPAN * SPAN and counts.min() > 0
    assert chisquare(counts).pvalue > 1e-3


def test_crop_offsets_same_distribution_in_both_backends(drawn):
    table = [torch.bincount(dy * SPAN + dx, minlength=SPAN * SPAN).numpy()
             for dy, dx, *_ in (drawn["batched"], drawn["albumentations"])]
    assert chi2_contingency(np.array(table)).pvalue > 1e-3


@pytest.mark.parametrize("backend", ["batched", "albumentations"])
def test_flip_rate_is_one_half(drawn, backend):
    flip = drawn[backend][2]
    assert abs(flip.float().mean().item() - 0.5) < 0.03


@pytest.mark.parametrize("backend", ["batched", "albumentations"])
def test_hole_positions_uniform(drawn, backend):
    _, _, _, hy, hx = drawn[backend]  # recover() already checked: one 8x8 block per image, wholly inside
    assert hy.min() == 0 and hx.min() == 0 and hy.max() == CROP - HOLE and hx.max() == CROP - HOLE
    for axis in (hy, hx):
        assert chisquare(torch.bincount(axis, minlength=HOLE_SPAN).numpy()).pvalue > 1e-3
    joint = torch.bincount(hy * HOLE_SPAN + hx, minlength=HOLE_SPAN ** 2).numpy()
    assert (joint > 0).sum() >= 600  # 4000 draws over 625 positions: ~624 distinct expected
    assert chisquare(joint).pvalue > 1e-3
