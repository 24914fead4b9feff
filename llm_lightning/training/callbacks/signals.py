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

The ranks agree without waiting on each other every step: after each optimizer step every rank
starts an asynchronous all-reduce (max) of its flag, a host (numpy-backed) tensor on a gloo group,
and reads the result one step later, when it has long arrived. All ranks read the same result
after the same step, so they stop together, one step after the signal; nothing in a step waits on
the device or on another rank.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
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


def _nothing() -> None:
    pass


def _multi_process() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AtStepBoundary(L.Callback):
    """Acts on a flag set by a signal handler, once per optimizer step, after the ranks agree."""

    signals: tuple[int, ...] = ()

    def __init__(self) -> None:
        self._pid: int | None = None
        self._received: int | None = None
        self._previous: dict[int, object] = {}
        self._seen_step: int | None = None
        self._group = None  # the gloo process group the flags travel on (None: one process)
        self._pending: tuple | None = None  # (async all-reduce, its tensor, the numpy flag under it)

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
        self._pending = None
        if self._pid is not None and self._group is None and _multi_process():
            # Every rank runs on_train_start: the group is created in step on all of them. The flags
            # are host memory, so they need a CPU backend even when training runs on NCCL.
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._pid is None or trainer.global_step == self._seen_step:
            return  # not listening, or between the micro-batches of one optimizer step
        self._seen_step = trainer.global_step
        if self._agreed():
            checkpoint = trainer.checkpoint_callback
            path = Path(checkpoint.dirpath) / LAST
            trainer.save_checkpoint(path)
            checkpoint._last_global_step_saved = trainer.global_step  # the final-state save is done
            self._act(trainer, path)

    def _agreed(self) -> bool:
        """Whether any rank had a signal by the previous step (one process: by this step)."""
        if self._group is None:
            return self._received is not None
        if self._pending is not None:
            work, _, flag = self._pending
            work.wait()  # started a step ago: done by now (gloo runs it on its own thread)
            self._pending = None
            if flag[0]:
                return True  # the same answer on every rank: none starts another
        flag = np.array([self._received is not None], dtype=np.int32)
        shared = torch.from_numpy(flag)  # the array's memory: read back without a tensor op
        work = dist.all_reduce(shared, dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, shared, flag)
        return False

    def _act(self, trainer: L.Trainer, path: Path) -> None:
        raise NotImplementedError

    def _finish_pending(self) -> None:
        if self._pending is not None:  # every rank started it: let it complete before the group goes
            self._pending[0].wait()
            self._pending = None

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._finish_pending()

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        self._finish_pending()
        self._uninstall()


class StopOnSignal(_AtStepBoundary):
    """SIGTERM / SIGINT: finish the step, save last.ckpt, raise `Interrupted`."""

    signals = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        super().__init__()
        self._trainer: L.Trainer | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        # Here, not in setup: Lightning installs its SIGTERM handler after setup, over ours.
        self._trainer = trainer
        self._install()
        # Lightning 2.6 broadcasts its own SIGTERM flag from rank 0 before every micro-batch and
        # reads it back on the host (a blocking collective and a device sync each time). Ours has
        # replaced its SIGTERM handler, so that flag can never be set: skip the broadcast.
        epoch_loop = trainer.fit_loop.epoch_loop
        if hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
            epoch_loop._broadcast_sigterm_tensor = _nothing
        super().on_train_start(trainer, pl_module)  # after installing: it sets up the ranks' flags

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
        super().on_train_end(trainer, pl_module)
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
