"""A callback that kills its own process (SIGKILL, no cleanup) when an epoch starts: a preempted node."""

import os
import signal

import lightning as L


class KillAtEpochStart(L.Callback):
    """kill -9 every rank at the start of `epoch`, after the previous epoch's checkpoint was written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)
