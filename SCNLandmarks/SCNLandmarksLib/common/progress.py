"""Progress reports shared by the CLI, the Python API and the Slicer worker."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TextIO

__all__ = ["Progress", "ProgressCallback", "TextProgressBar"]


@dataclass
class Progress:
    """One progress report.

    Attributes:
        stage: ``"started"``, ``"train"``, ``"validate"``, ``"detect"``, ``"fine-tune"``, ...
        done: units finished (iterations, images).
        total: units planned; None when a time budget, not a count, ends the work.
        elapsed_s: seconds since the start.
        eta_s: estimated seconds left, or None before there is a rate.
        loss: running training loss, when training.
        validation_mre_mm: last validation mean radial error, when measured.
        message: free text for the user.
        completed: share of the work done in [0, 1] when it is not ``done / total`` (a time
            budget ends the work); None otherwise.
    """

    stage: str
    done: int
    total: int | None
    elapsed_s: float
    eta_s: float | None = None
    loss: float | None = None
    validation_mre_mm: float | None = None
    message: str = ""
    completed: float | None = None

    @property
    def fraction(self) -> float:
        """Share of the work done, in [0, 1]."""
        if self.completed is not None:
            return min(1.0, max(0.0, self.completed))
        if self.total is None:
            return 0.0
        return min(1.0, self.done / self.total) if self.total else 1.0

    @property
    def finished(self) -> bool:
        """All planned units are done (never, while a time budget rather than a count ends the work)."""
        return self.total is not None and self.done >= self.total

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


ProgressCallback = Callable[[Progress], None]


def estimate_eta(done: int, total: int, elapsed_s: float) -> float | None:
    return elapsed_s / done * (total - done) if done > 0 else None


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class TextProgressBar:
    """A one-line progress bar on a terminal (redrawn in place), or plain lines in a log."""

    def __init__(self, *, stream: TextIO | None = None, width: int = 30, min_interval_s: float = 0.2) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self._interactive = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        finished = progress.finished
        interval = self.min_interval_s if self._interactive else 10.0
        # A validation result is rare and worth seeing, so it is never throttled away.
        if not finished and progress.validation_mre_mm is None and now - self._last < interval:
            return
        self._last = now
        filled = int(self.width * progress.fraction)
        bar = "#" * filled + "-" * (self.width - filled)
        parts = [f"{progress.stage:>8} [{bar}] {progress.done}/{'?' if progress.total is None else progress.total}",
                 f"{_clock(progress.elapsed_s)}<{_clock(progress.eta_s)}"]
        if progress.loss is not None:
            parts.append(f"loss {progress.loss:.4g}")
        if progress.validation_mre_mm is not None:
            parts.append(f"val MRE {progress.validation_mre_mm:.2f} mm")
        if progress.message:
            parts.append(progress.message)
        line = "  ".join(parts)
        if self._interactive:
            self.stream.write("\r" + line + ("\n" if finished else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
