"""Graceful stop on SIGTERM / SIGUSR2: save at the next step boundary, then exit.

Slurm sends SIGTERM on preemption or cancellation (then SIGKILL after
``KillWait``) and, with ``--signal=USR2@S``, SIGUSR2 ``S`` seconds before the
time limit (submitit asks for it). The handlers installed here only set a
flag; the training loop checks it between steps, saves a checkpoint and raises
:class:`Preempted`. A handler that was installed before (submitit's, which
requeues the job) is then called, so requeueing keeps working.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

import numpy as np

log = logging.getLogger("dpjax")

SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class Preempted(Exception):  # noqa: N818  (a stop request, not an error)
    """Training stopped on a signal after saving a checkpoint at ``step``.

    The command line exits with ``exit_code`` = 128 + the signal number (143
    for SIGTERM, 140 for SIGUSR2), as if the signal had ended it.
    """

    def __init__(self, signum: int, step: int, checkpoint_dir: str):
        self.signum, self.step, self.checkpoint_dir = signum, step, checkpoint_dir
        name = signal.Signals(signum).name
        super().__init__(
            f"Stopped by {name} after step {step}; checkpoint saved in {checkpoint_dir}. "
            "Run the same command with the same output directory to resume."
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopFlag:
    """Records the first stop signal received; checked by the loop between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def requested(self) -> bool:
        """Whether any process of the run received a stop signal (a collective when
        there are several processes, so that all stop at the same step)."""
        import jax  # noqa: PLC0415

        local = self.signum is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils  # noqa: PLC0415

        signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
        if self.signum is None and np.any(signums):
            self.signum = int(np.max(signums))
        return bool(np.any(signums))

    def forward(self) -> None:
        """Calls the handler that was installed before ours, if it is a Python function
        (submitit's requeue); it may exit the process."""
        previous = self._previous.get(self.signum)
        if callable(previous):
            previous(self.signum, None)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Installs the flag-setting handlers for the duration of the block (main thread
    only: elsewhere Python cannot install handlers, and the flag never rises)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        log.warning("not in the main thread: SIGTERM/SIGUSR2 will not save a checkpoint")
        yield flag
        return
    for sig in SIGNALS:
        flag._previous[sig] = signal.signal(sig, flag._handle)
    try:
        yield flag
    finally:
        for sig, previous in flag._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
