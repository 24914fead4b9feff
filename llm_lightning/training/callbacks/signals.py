"""Signals end a fit at an optimizer-step boundary, with its state saved in last.ckpt.

- `StopOnSignal`: the first SIGTERM or SIGINT (Ctrl-C, `kill`, Kubernetes, a spot-instance
  notice) finishes the current optimizer step; the ranks agree, all save `last.ckpt`, and the
  fit ends with `Interrupted` (the CLI prints where the state is and exits 128 + signal). A
  second signal stops at once.
- `SlurmRequeue`: SLURM's warning before the time limit (SIGUSR1, `#SBATCH
  --signal=SIGUSR1@90`) does the same, then rank 0 requeues the job with `scontrol requeue`.

Why not Lightning's own handlers: its SIGUSR1 handler saves from inside the signal handler,
wherever the process is: in DDP one rank can enter the save's barrier while another waits in a
collective, and both hang (Lightning #21406); its SIGTERM handler broadcasts from inside the
handler and stops mid-step. Here a handler only sets a flag in the training process (DataLoader
workers, which inherit handlers, ignore it); the decision is taken after each optimizer step.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

from llm_lightning.io.checkpoint import LAST


class Interrupted(Exception):
    """The fit was stopped by a signal after saving its state."""

    def __init__(self, signum: int, step: int, path: Path | None) -> None:
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        where = f"the state after step {step} is in {path}" if path else "no optimizer step was completed"
        super().__init__(f"stopped by {name}: {where}; resume with --ckpt_path last")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _AtStepBoundary(L.Callback):
    """Acts on a flag set by a signal handler, once per optimizer step, after the ranks agree."""

    signals: tuple[int, ...] = ()

    def __init__(self) -> None:
        self._pid: int | None = None
        self._received: int | None = None
        self._previous: dict[int, object] = {}
        self._seen_step: int | None = None

    def _install(self) -> None:
        self._pid = os.getpid()
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker inherited this handler
            return
        if self._received is not None:
            self._second_signal(signum)
        self._received = signum

    def _second_signal(self, signum: int) -> None:
        pass

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._seen_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._pid is None or trainer.global_step == self._seen_step:
            return  # not listening, or between the micro-batches of one optimizer step
        self._seen_step = trainer.global_step
        if trainer.strategy.reduce_boolean_decision(self._received is not None, all=False):
            checkpoint = trainer.checkpoint_callback
            path = Path(checkpoint.dirpath) / LAST
            trainer.save_checkpoint(path)
            checkpoint._last_global_step_saved = trainer.global_step  # the final-state save is done
            self._act(trainer, path)

    def _act(self, trainer: L.Trainer, path: Path) -> None:
        raise NotImplementedError

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        self._uninstall()


class StopOnSignal(_AtStepBoundary):
    """SIGTERM / SIGINT: finish the step, save last.ckpt, raise `Interrupted`."""

    signals = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        super().__init__()
        self._trainer: L.Trainer | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        # Here, not in setup: Lightning installs its SIGTERM handler after setup, over ours.
        self._trainer = trainer
        self._install()

    def _second_signal(self, signum: int) -> None:
        launcher = self._trainer.strategy.launcher if self._trainer is not None else None
        if launcher is not None:
            launcher.kill(signal.SIGKILL)  # the other ranks Lightning started would wait forever
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def _act(self, trainer: L.Trainer, path: Path) -> None:
        signum = self._received or signal.SIGTERM  # another rank got it
        self._uninstall()
        raise Interrupted(signum, trainer.global_step, path)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._uninstall()


class SlurmRequeue(_AtStepBoundary):
    """SIGUSR1 under SLURM: finish the step, save last.ckpt, requeue the job, stop."""

    signals = (signal.SIGUSR1,)

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        # In setup, so that Lightning sees a handler and does not install its own.
        if stage == "fit" and SLURMEnvironment.detect():
            self._install()

    def _act(self, trainer: L.Trainer, path: Path) -> None:
        if trainer.is_global_zero:
            subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
        trainer.should_stop = True
