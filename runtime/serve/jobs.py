"""One generation at a time, in a worker thread, with the state ``/progress`` reads and the flags ``/interrupt``
and ``/skip`` set. The HTTP side never waits on the engine: it submits a job and awaits its future, so progress
and interrupt requests are answered while the worker generates."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class QueueFull(RuntimeError):
    """More jobs are waiting than the server takes (``max_queue``)."""


@dataclass
class JobState:
    """A job's progress, as A1111's ``State``: ``job_no`` of ``job_count`` batches (``n_iter``), ``sampling_step``
    of ``sampling_steps`` in the current one; ``denoised``: a function returning the latest clean estimate."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    job: str = ""
    job_count: int = 1
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 1
    started: float = field(default_factory=time.time)
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))
    interrupted: threading.Event = field(default_factory=threading.Event)
    skipped: threading.Event = field(default_factory=threading.Event)
    denoised: Callable[[], Any] | None = None
    steps_done: list[int] = field(default_factory=list)  # the UNet calls each finished batch ran
    pipeline: Any = None  # the Pipeline the job runs on (its previews decode with that model's VAE)

    def fraction(self) -> float:
        """A1111's progress: 0.01 + job_no / job_count + (1 / job_count) x step / steps, at most 1."""
        steps = max(self.sampling_steps, 1)
        return min(1.0, 0.01 + self.job_no / self.job_count + self.sampling_step / steps / self.job_count)


class Worker:
    """A FIFO of jobs run by ``threads`` threads (default one: one generation at a time; a Pipeline serves
    concurrent calls, so more threads run that many generations at once, sharing the CPU or GPU)."""

    def __init__(self, max_queue: int = 8, threads: int = 1):
        self._jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.running: list[JobState] = []  # in the order they started
        self.last: JobState | None = None  # the job that ended last (what a test or a log looks at)
        self.finished = 0  # jobs ended (done, failed or interrupted)
        self._lock = threading.Lock()
        for k in range(max(1, threads)):
            threading.Thread(target=self._run, name=f"edgediff-worker-{k}", daemon=True).start()

    @property
    def current(self) -> JobState | None:
        """The job that started first among those running: what A1111's global progress and interrupt mean."""
        with self._lock:
            return self.running[0] if self.running else None

    def submit(self, fn: Callable[[JobState], Any], job: str) -> tuple[JobState, concurrent.futures.Future]:
        state, future = JobState(job=job), concurrent.futures.Future[Any]()
        try:
            self._jobs.put_nowait((fn, state, future))
        except queue.Full:
            raise QueueFull(f"{self._jobs.maxsize} jobs are already waiting; try again later") from None
        return state, future

    def queued(self) -> int:
        """Jobs waiting behind the running one."""
        return self._jobs.qsize()

    def _run(self) -> None:
        while True:
            fn, state, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():  # the client went away before it started
                continue
            with self._lock:
                self.running.append(state)
            try:
                future.set_result(fn(state))
            except BaseException as e:  # handed to the request that submitted it; the worker goes on
                future.set_exception(e)
            finally:
                with self._lock:
                    self.running.remove(state)
                    self.last = state
                    self.finished += 1
