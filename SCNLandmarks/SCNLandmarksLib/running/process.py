"""Running the worker (``python -m SCNLandmarksLib.running.worker``) in the background.

:class:`BackgroundProcess` starts the worker, reads its JSON lines on a thread into a
queue, and hands them to the caller's thread when :meth:`~BackgroundProcess.poll` is
called: in Slicer a ``qt.QTimer`` calls it (so callbacks run on the GUI thread and Slicer
stays responsive), in a script :meth:`~BackgroundProcess.wait` does. Nothing here imports
Slicer, Qt or torch.

Cancel asks first, then insists: it creates the cancel file the worker polls (works on
every system) and sends SIGTERM (POSIX), so the worker stops between two iterations and
reports ``cancelled``; whatever is still alive after a grace period is killed, with its
whole process group or tree (the worker may have started data-loading processes).

Exit codes of the worker: 0 finished, 2 error (an ``error`` event says why), 3 cancelled.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..common.progress import Progress

__all__ = [
    "EXIT_CANCELLED",
    "EXIT_ERROR",
    "EXIT_OK",
    "BackgroundProcess",
    "WorkerOutcome",
    "progress_from_event",
    "worker_command",
    "worker_environment",
]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_CANCELLED = 3

_END = object()


@dataclass(frozen=True)
class WorkerOutcome:
    """How a worker run ended: the one form a finish, a cancel or a failure takes to the caller.

    Attributes:
        status: ``"done"``, ``"cancelled"`` or ``"failed"``.
        message: for the user: the worker's own summary when done, what a cancel kept, or why
            the run failed.
        report: the worker's ``done`` event (empty unless done): for a fine-tuning ``output``,
            ``verdict``, ``start_error_mm``, ``new_error_mm``...; for a batch ``succeeded``,
            ``failed``, ``cancelled``, ``review_order``...
        details: the end of the worker's error output when it failed, for a details box or a log.
    """

    status: str
    message: str
    report: Mapping[str, Any] = field(default_factory=dict)
    details: str = ""

    @property
    def output(self) -> Path | None:
        """The file or folder the run wrote; None when it wrote none (or kept the starting model)."""
        value = self.report.get("output")
        return Path(value) if value else None


_PROGRESS_FIELDS = {f.name for f in fields(Progress)}


def progress_from_event(event: Mapping[str, Any]) -> Progress | None:
    """A worker's ``started`` or ``progress`` event as a :class:`Progress`; None for other events.

    ``started`` becomes stage ``"started"`` with nothing done and, as its message, the cases and
    device of a fine-tuning or the device of a batch.
    """
    kind = event.get("event")
    if kind == "started":
        cases = event.get("cases")
        what = f"{len(cases)} cases, " if isinstance(cases, list) else ""
        return Progress("started", 0, event.get("iterations"), 0.0, message=f"{what}{event.get('device', '')}")
    if kind != "progress":
        return None
    values = {name: event[name] for name in _PROGRESS_FIELDS if name in event}
    values.setdefault("stage", "")
    values.setdefault("done", 0)
    values.setdefault("total", None)
    values.setdefault("elapsed_s", 0.0)
    return Progress(**values)


def lib_parent_folder() -> Path:
    """The folder that holds the ``SCNLandmarksLib`` package (what the worker needs on its path)."""
    return Path(__file__).resolve().parents[2]


def worker_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with ``SCNLandmarksLib`` importable.

    Inside Slicer the module folder is on ``sys.path`` of the application only, not of a
    Python started from it, hence the explicit ``PYTHONPATH``.
    """
    environment = dict(os.environ if base is None else base)
    parts = [str(lib_parent_folder())]
    if environment.get("PYTHONPATH"):
        parts.append(environment["PYTHONPATH"])
    environment["PYTHONPATH"] = os.pathsep.join(parts)
    # Progress lines must arrive as they are printed, not when a buffer fills.
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def worker_command(arguments: Sequence[str], *, python: str | os.PathLike[str] | None = None) -> list[str]:
    """The command line that runs the worker with ``arguments`` under ``python`` (default: this one)."""
    return [str(python or sys.executable), "-m", "SCNLandmarksLib.running.worker", *map(str, arguments)]


class BackgroundProcess:
    """A worker process whose JSON-line events are collected on a thread and delivered on demand.

    Args:
        command: the full command line (see :func:`worker_command`). A ``--cancel-file``
            option is appended so that cancelling works on every system.
        env: environment (default :func:`worker_environment`).
        cwd: working folder of the process.
        on_event: called with each event dict (``{"event": "progress", ...}``) from
            :meth:`poll` / :meth:`wait`, i.e. on the caller's thread.
        on_finished: called once with this object when the process has ended and all of its
            events were delivered.

    Example::

        job = BackgroundProcess(worker_command(["finetune", ...]), on_event=print)
        job.start()
        returncode = job.wait()      # or: call job.poll() from a timer
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        on_finished: Callable[[BackgroundProcess], None] | None = None,
    ) -> None:
        self.cancel_file = Path(tempfile.gettempdir()) / f"scn-cancel-{uuid.uuid4().hex}"
        self.command = [*map(str, command), "--cancel-file", str(self.cancel_file)]
        self.env = env if env is not None else worker_environment()
        self.cwd = cwd
        self.on_event = on_event
        self.on_finished = on_finished
        self.events: list[dict[str, Any]] = []
        self.cancel_requested = False
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=200)
        self._queue: queue.Queue[object] = queue.Queue()
        self._process: subprocess.Popen[str] | None = None
        self._threads: list[threading.Thread] = []
        self._stream_ended = False
        self._finished_reported = False
        self._kill_deadline: float | None = None

    # ------------------------------------------------------------------ starting

    def start(self) -> BackgroundProcess:
        """Start the process and its reader threads; returns self."""
        if self._process is not None:
            msg = "This background process was already started"
            raise RuntimeError(msg)
        options: dict[str, Any] = {}
        if os.name == "nt":
            # Its own process group, so that the whole tree can be ended without touching Slicer;
            # no console window (as Slicer's launchConsoleProcess), which a user could close and
            # so kill the training.
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            options["start_new_session"] = True
        log.info("Starting worker: %s", " ".join(self.command))
        self._process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            env=self.env,
            cwd=self.cwd,
            **options,
        )
        self._threads = [
            threading.Thread(target=self._read_stdout, name="scn-worker-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name="scn-worker-stderr", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def _read_stdout(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            text = line.strip()
            if not text:
                continue
            try:
                event = json.loads(text)
                if not isinstance(event, dict) or "event" not in event:
                    raise ValueError(text)
            except ValueError:
                # Anything that is not one of our events is passed on as a log line.
                event = {"event": "log", "message": text}
            self._queue.put(event)
        self._queue.put(_END)

    def _read_stderr(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        for line in self._process.stderr:
            self._stderr_tail.append(line.rstrip("\n"))

    # ------------------------------------------------------------------ state

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def finished(self) -> bool:
        """True once the process has ended and every event was delivered."""
        return self._finished_reported

    def is_running(self) -> bool:
        return self._process is not None and not self._finished_reported

    @property
    def stderr_tail(self) -> str:
        """The last lines the worker wrote to stderr (warnings, tracebacks)."""
        return "\n".join(self._stderr_tail)

    def last_event(self, kind: str) -> dict[str, Any] | None:
        """The last delivered event of this kind (``"progress"``, ``"done"``, ``"error"``...)."""
        for event in reversed(self.events):
            if event.get("event") == kind:
                return event
        return None

    # ------------------------------------------------------------------ delivering

    def poll(self) -> list[dict[str, Any]]:
        """Deliver the events that arrived since the last call; returns them.

        Calls ``on_event`` for each and, once the process ended and its output is drained,
        ``on_finished`` (once).
        """
        if (
            self._kill_deadline is not None
            and time.monotonic() >= self._kill_deadline
            and self._process is not None
            and self._tree_alive()
        ):
            log.warning("The worker did not stop after being asked to; killing it")
            self.kill()
            self._kill_deadline = None
        delivered = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _END:
                self._stream_ended = True
                continue
            event = dict(item)  # type: ignore[call-overload]
            self.events.append(event)
            delivered.append(event)
            if self.on_event is not None:
                self.on_event(event)
        if self._stream_ended and not self._finished_reported and self._process is not None:
            if self._process.poll() is None:
                return delivered  # stdout closed but still alive: try again at the next poll (never block a GUI)
            for thread in self._threads:
                thread.join(timeout=1.0)
            self._finished_reported = True
            self.cancel_file.unlink(missing_ok=True)
            if self.on_finished is not None:
                self.on_finished(self)
        return delivered

    def wait(self, timeout: float | None = None, *, interval_s: float = 0.05) -> int | None:
        """Block, delivering events, until the process ends; returns its exit code.

        Returns None when ``timeout`` seconds passed first (the process keeps running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._finished_reported:
            self.poll()
            if self._finished_reported:
                break
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(interval_s)
        return self.returncode

    # ------------------------------------------------------------------ stopping

    def cancel(self, *, grace_s: float = 10.0) -> None:
        """Ask the worker to stop; its process tree is killed if it is still alive ``grace_s`` later.

        Returns at once (a GUI must not freeze): the kill, when needed, happens in a later
        :meth:`poll` / :meth:`wait`, and the ``cancelled`` event and exit code arrive there too.
        """
        self.cancel_requested = True
        if self._process is None or self._process.poll() is not None:
            return
        if self._kill_deadline is None:
            self._kill_deadline = time.monotonic() + grace_s
        try:
            self.cancel_file.touch()
        except OSError:
            log.warning("Could not create the cancel file %s", self.cancel_file)
        if os.name != "nt":
            self._signal_group(signal.SIGTERM)

    def _tree_alive(self) -> bool:
        """True while the worker or anything it started still runs.

        Inside Slicer the worker is ``PythonSlicer``, a launcher whose child does the work: the
        launcher may be gone while its child still runs, so the process group is asked too.
        """
        if self._process is None:
            return False
        if self._process.poll() is None:
            return True
        if os.name == "nt":
            return False
        try:
            os.killpg(self._process.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def kill(self) -> None:
        """End the worker and everything it started, at once (no ``cancelled`` event)."""
        if not self._tree_alive():
            return
        if os.name == "nt":
            # taskkill /T ends the tree; Popen.kill alone would leave the children running.
            subprocess.run(
                ["taskkill", "/F", "/T", "/PID", str(self._process.pid)],
                capture_output=True,
                check=False,
            )
        else:
            self._signal_group(signal.SIGKILL)
        if self._process.poll() is None:
            try:
                self._process.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                self._process.kill()

    def _signal_group(self, number: int) -> None:
        assert self._process is not None
        try:
            # The worker leads its own session (start_new_session), so its group id is its pid.
            os.killpg(self._process.pid, number)
        except (ProcessLookupError, PermissionError):
            try:
                self._process.send_signal(number)
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------------ results

    def outcome(self) -> WorkerOutcome:
        """How the finished run ended.

        Raises:
            RuntimeError: the run has not finished yet.
        """
        if not self._finished_reported:
            msg = "The worker has not finished yet"
            raise RuntimeError(msg)
        done = self.last_event("done")
        if self.returncode == EXIT_OK and done is not None:
            return WorkerOutcome("done", str(done.get("message", "")), dict(done))
        if self.returncode == EXIT_CANCELLED or self.last_event("cancelled") is not None or self.cancel_requested:
            if "detect" in self.command:
                msg = "Batch detection was cancelled; the images finished before it are kept"
            else:
                msg = "Fine-tuning was cancelled; no new model was written and the previous model is unchanged"
            return WorkerOutcome("cancelled", msg)
        error = self.last_event("error")
        if error is not None:
            return WorkerOutcome("failed", str(error.get("message", "unknown error")), details=self.stderr_tail)
        tail = self.stderr_tail.strip().splitlines()[-5:]
        msg = f"The background process ended unexpectedly (exit code {self.returncode})" + (
            ":\n" + "\n".join(tail) if tail else ""
        )
        return WorkerOutcome("failed", msg, details=self.stderr_tail)
