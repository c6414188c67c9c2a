"""One Cycle LR, stepped per batch, without annihilation: torch's OneCycleLR, tabled once per run.

The LR rises linearly from LRMIN at the first step to LRMAX at the last step of epoch `peak_epoch`, then falls
linearly to LRMIN at the last step of the last epoch (`peak_epoch` 0: it starts at LRMAX and only falls). It never
goes below LRMIN. Momentum stays constant (Nesterov 0.9) unless `train.cycle_momentum` asks for the 1cycle policy's:
0.95 -> 0.85 -> 0.95, inversely to the LR.

The table holds every step's LR and momentum as plain floats, indexed by the step: a step reads its values without
stepping a scheduler, so that a resumed run and a compiled or graph-captured step can take any step's values.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

MOMENTUM_CYCLE = (0.95, 0.85)  # momentum at the ends of the cycle, and at its peak


@dataclass(frozen=True)
class OneCycle:
    lr_min: float
    lr_max: float
    lrs: tuple[float, ...]  # the LR of each step of the run
    momenta: tuple[float, ...]  # the cycled momentum of each step
    peak_step: int  # index of the step that runs at lr_max

    @classmethod
    def for_run(cls, lr_min: float, lr_max: float, epochs: int, peak_epoch: int, steps_per_epoch: int) -> "OneCycle":
        total, peak = epochs * steps_per_epoch, max(peak_epoch * steps_per_epoch - 1, 0)
        if peak == 0:
            # The cycle starts at its peak (peak_epoch 0, or a one-step rise). OneCycleLR's rise cannot be empty (its
            # first phase would end at step -1 and its fall would miss LRMAX at step 0, or it divides by zero), so
            # table a cycle one step longer whose rise is that extra step, and drop it.
            lrs, momenta = _one_cycle_table(lr_min, lr_max, total + 1, peak_steps=2)
            return cls(lr_min, lr_max, lrs[1:], momenta[1:], 0)
        lrs, momenta = _one_cycle_table(lr_min, lr_max, total, peak_steps=peak + 1)
        return cls(lr_min, lr_max, lrs, momenta, peak)

    @property
    def total_steps(self) -> int:
        return len(self.lrs)

    def __call__(self, step: int) -> float:
        """LR of step `step` (0-based, counted over the whole run)."""
        return self.lrs[self._index(step)]

    def momentum(self, step: int) -> float:
        """The cycled momentum of step `step`: highest where the LR is lowest."""
        return self.momenta[self._index(step)]

    def _index(self, step: int) -> int:
        if not 0 <= step < self.total_steps:  # a negative step would index from the end
            raise IndexError(f"step {step} outside the schedule of {self.total_steps} steps")
        return step


def _one_cycle_table(lr_min: float, lr_max: float, total: int, peak_steps: int) -> tuple[tuple, tuple]:
    """The LR and momentum of each of `total` steps of torch's two-phase linear OneCycleLR whose LR peaks at step
    `peak_steps - 1`, stepped on a throwaway optimizer: OneCycleLR ends its rise at pct_start * total_steps - 1, starts
    at max_lr / div_factor and ends at that / final_div_factor."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr_max, momentum=MOMENTUM_CYCLE[0])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr_max, total_steps=total, pct_start=peak_steps / total, anneal_strategy="linear",
        div_factor=lr_max / lr_min, final_div_factor=1.0, three_phase=False, cycle_momentum=True,
        base_momentum=MOMENTUM_CYCLE[1], max_momentum=MOMENTUM_CYCLE[0])
    group = optimizer.param_groups[0]
    lrs, momenta = [group["lr"]], [group["momentum"]]  # step 0's, set by the scheduler as it is made
    with warnings.catch_warnings():
        # the throwaway optimizer never steps: torch warns that its scheduler steps first
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(total - 1):
            scheduler.step()
            lrs.append(group["lr"])
            momenta.append(group["momentum"])
    # its linear interpolation can land an ulp outside [LRMIN, LRMAX] at the ends: the recipe never leaves them
    return tuple(min(max(lr, lr_min), lr_max) for lr in lrs), tuple(momenta)
