"""One Cycle LR, stepped per batch, without annihilation.

The LR rises linearly from LRMIN at the first step to LRMAX at the last step of epoch `peak_epoch`, then falls
linearly to LRMIN at the last step of the last epoch (`peak_epoch` 0: it starts at LRMAX and only falls). It never goes below LRMIN. Momentum stays constant (Nesterov
0.9) unless `train.cycle_momentum` asks for the 1cycle policy's: 0.95 -> 0.85 -> 0.95, inversely to the LR.
"""

from __future__ import annotations

from dataclasses import dataclass


MOMENTUM_CYCLE = (0.95, 0.85)  # momentum at the ends of the cycle, and at its peak


@dataclass(frozen=True)
class OneCycle:
    lr_min: float
    lr_max: float
    total_steps: int
    peak_step: int  # index of the step that runs at lr_max

    @classmethod
    def for_run(cls, lr_min: float, lr_max: float, epochs: int, peak_epoch: int, steps_per_epoch: int) -> "OneCycle":
        # peak_epoch 0: the first step runs at LRMAX and the whole run anneals (a one-epoch run can have a cycle)
        return cls(lr_min, lr_max, epochs * steps_per_epoch, max(peak_epoch * steps_per_epoch - 1, 0))

    def __call__(self, step: int) -> float:
        """LR of step `step` (0-based, counted over the whole run)."""
        frac = self._frac(step)
        return (1 - frac) * self.lr_min + frac * self.lr_max  # exact at both ends

    def momentum(self, step: int) -> float:
        """The cycled momentum of step `step`: highest where the LR is lowest."""
        frac = self._frac(step)
        return (1 - frac) * MOMENTUM_CYCLE[0] + frac * MOMENTUM_CYCLE[1]

    def _frac(self, step: int) -> float:
        """Where step `step` stands between the ends (0) and the peak (1)."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside the schedule of {self.total_steps} steps")
        if step <= self.peak_step:
            return step / self.peak_step if self.peak_step else 1.0
        return (self.total_steps - 1 - step) / (self.total_steps - 1 - self.peak_step)
