"""An exponential moving average of the weights (Page: decay 0.99 every 5 steps): evaluated and saved instead of
the raw weights when `train.ema_decay` > 0.

Every `every` steps: ema = decay * ema + (1 - decay) * weights, for every floating-point tensor of the state dict
(BatchNorm running statistics included: the averaged network needs statistics that match it); integer buffers
(BatchNorm's batch counter) are copied.
"""

from __future__ import annotations

import torch


class WeightEMA:
    def __init__(self, model: torch.nn.Module, decay: float, every: int):
        self.decay, self.every = decay, every
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Call after training step `step` (0-based); averages after every `every`-th step."""
        if (step + 1) % self.every:
            return
        for key, value in model.state_dict().items():
            average = self.state[key]
            if average.is_floating_point():
                average.mul_(self.decay).add_(value.detach(), alpha=1 - self.decay)
            else:
                average.copy_(value)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.state)
