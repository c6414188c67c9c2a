"""The project's own exceptions: user errors a person can act on. Stage entry points print them and exit 1."""

import errno

NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # a write that fails for want of room: disk, quota, size limit


class CifarResnetError(Exception):
    """Base of every user-facing error (bad params, bad data, a diverged run)."""


class ParamsError(CifarResnetError):
    """params.yaml holds a wrong type, an out-of-range value or an unknown key."""


class DataError(CifarResnetError):
    """The CIFAR-10 files are missing, corrupt or not what they claim to be."""


class OutputError(CifarResnetError):
    """An output or checkpoint cannot be written: no room on the disk, a quota, a file-size limit."""


class DivergedError(CifarResnetError):
    """Training produced a non-finite (or exploding) loss."""

    def __init__(self, epoch: int, step: int, steps_per_epoch: int, lr: float, loss: float):
        self.epoch, self.step, self.lr, self.loss = epoch, step, lr, loss
        super().__init__(
            f"training diverged: loss {loss:.4g} (not finite, or above train.max_loss) at epoch {epoch}, "
            f"step {step} of {steps_per_epoch}, LR {lr:.6g}; lower lr_max and run again"
        )
