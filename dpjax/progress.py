"""A one-line progress display: a bar on a terminal, plain log lines otherwise.

It shows only what is public or covered by the run's guarantee (the step,
epsilon so far, test-split metrics): the loop never passes it a non-private value.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("dpjax")


class Progress:
    """A one-line progress bar on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, every: int, stream=None):
        self.total, self.every = total, every
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, step: int, fields: dict[str, Any]) -> None:
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in fields.items())
        if self.tty:
            width = 24
            done = int(width * step / max(self.total, 1))
            bar = "#" * done + "." * (width - done)
            elapsed = time.perf_counter() - self.start
            self.stream.write(f"\r[{bar}] {step}/{self.total} {text} ({elapsed:.0f}s)\x1b[K")
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            log.info("step %d/%d %s", step, self.total, text)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
