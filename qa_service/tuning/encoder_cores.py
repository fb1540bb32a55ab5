"""Opt-in tuning ``encoder_cores``: the question encoder's threads pinned to CPUs, and core sharing between workers.

Used only when "encoder_cores" is in ``settings.tuning`` (``QA_TUNING``); without it a serving encoder runs
``SERVING_THREADS`` unpinned threads and never changes its session. Pinning keeps onnxruntime's helper thread
and the calling thread on different CPUs (docs/decisions/encoder-thread-pinning.md); core sharing lets a
worker encode on one thread while other workers answer (docs/decisions/encoder-threads-and-core-sharing.md).
It relies on ``os.sched_getaffinity`` / ``os.sched_setaffinity`` and onnxruntime's session config keys
``session.intra_op_thread_affinities``, ``session.intra_op.allow_spinning`` and ``session.force_spinning_stop``;
tests/test_tuning_encoder_cores.py fails when those are gone.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import threading
from contextlib import contextmanager
from typing import Callable

from ..embedding.onnx_encoder import SESSION_CONFIG, OnnxEmbedder, Runner

logger = logging.getLogger(__name__)

NAME = "encoder_cores"


def helper_placement(threads: int) -> tuple[tuple[int, ...], frozenset[int]] | None:
    """Where a question encoder's threads run: (CPUs of onnxruntime's helper threads, CPUs of the calling thread).

    onnxruntime runs each operator on the calling thread plus ``threads - 1`` pool threads ("helpers"); left to
    the kernel, a helper woken after idleness may land on the caller's CPU, and the two take turns. So the
    helpers get the last ``threads - 1`` CPUs this process may use, the caller the rest. None with one thread,
    fewer CPUs than threads, or no ``sched_getaffinity`` here.
    """
    if threads < 2 or not hasattr(os, "sched_getaffinity"):
        return None
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except OSError:
        return None
    if len(allowed) < threads:
        return None
    helpers = tuple(allowed[len(allowed) - (threads - 1):])
    return helpers, frozenset(allowed) - frozenset(helpers)


def run_on_cpus(cpus: frozenset[int], fn: Callable, *args):
    """Call ``fn(*args)`` with the calling thread kept on ``cpus`` (those of them it may use), then restore its own
    CPU set. A plain call when the thread may use none of them or its CPU set cannot be changed."""
    try:
        before = os.sched_getaffinity(0)
    except OSError:
        return fn(*args)
    target = before & cpus
    if not target or target == before:
        return fn(*args)
    try:
        os.sched_setaffinity(0, target)  # pid 0: this thread only
    except OSError:
        return fn(*args)
    try:
        return fn(*args)
    finally:
        try:
            os.sched_setaffinity(0, before)
        except OSError:  # pragma: no cover - the CPU set changed under us; the thread keeps the narrower one
            pass


def pinned_session_config(helpers: tuple[int, ...]) -> dict[str, str]:
    """Session config entries that put onnxruntime's helper threads on ``helpers``, spinning only within a run.

    Pinned apart from the caller, spinning between the operators of a run is cheaper than waking up; it stops
    with the run, so an idle worker burns no CPU.
    """
    return {"session.intra_op_thread_affinities": ";".join(str(cpu + 1) for cpu in helpers),  # numbered from 1
            "session.intra_op.allow_spinning": "1",
            "session.force_spinning_stop": "1"}


class PinnedCaller:
    """A runner that calls ``session.run`` with the calling thread kept on ``cpus`` (off the helpers' CPUs)."""

    def __init__(self, cpus: frozenset[int]):
        self.cpus = cpus

    def __call__(self, session, outputs: list, feeds: dict) -> list:
        return run_on_cpus(self.cpus, session.run, outputs, feeds)


def pin_threads(embedder: OnnxEmbedder) -> bool:
    """Open ``embedder``'s session with its helper threads pinned (``helper_placement``) and route its runs
    through ``PinnedCaller``; return whether it is pinned. Call before the session is opened.

    A placement this machine cannot have (one thread, too few CPUs) leaves the encoder as it is; a missing OS or
    onnxruntime hook does too, with a warning, since the tuning was asked for.
    """
    if embedder.is_open:
        raise ValueError("pin_threads needs an encoder whose session is not open yet (open_session=False)")
    if embedder.threads < 2:
        return False
    if not hasattr(os, "sched_setaffinity"):
        logger.warning("%s: this system has no sched_setaffinity; encoder threads are not pinned", NAME)
        return False
    placement = helper_placement(embedder.threads)
    if placement is None:
        logger.info("%s: fewer CPUs than encoder threads; encoder threads are not pinned", NAME)
        return False
    helpers, caller = placement
    try:
        session = embedder.new_session(embedder.threads, pinned_session_config(helpers))
    except Exception as exc:  # onnxruntime refused the placement: the encoder opens unpinned
        logger.warning("%s: onnxruntime could not pin the encoder threads (%s: %s)", NAME, type(exc).__name__, exc)
        return False
    embedder.open(session)
    embedder.runner = PinnedCaller(caller)
    return True


class CoreSharing:
    """A runner that uses a one-thread session while ``contended()`` says other workers are answering, else the
    encoder's own session (through ``then``, the runner it had before, when there was one)."""

    def __init__(self, narrow, contended: Callable[[], bool], then: Runner | None):
        self.narrow, self.contended, self.then = narrow, contended, then

    def __call__(self, session, outputs: list, feeds: dict) -> list:
        if self.contended():
            return self.narrow.run(outputs, feeds)
        if self.then is not None:
            return self.then(session, outputs, feeds)
        return session.run(outputs, feeds)


def share_cores(embedder, activity: "WorkerActivity") -> None:
    """Make an ONNX ``embedder`` encode on one thread while other workers answer (``activity.others_answering``).

    Two threads make a lone question faster but cost more CPU in thread hand-offs, a loss once the other core is
    busy; both sessions give the same vectors. A no-op for embedders that cannot (not ONNX, or one thread
    already); a second call only changes whose activity counts.
    """
    if not isinstance(embedder, OnnxEmbedder) or embedder.threads <= 1:
        return
    if isinstance(embedder.runner, CoreSharing):
        embedder.runner.contended = activity.others_answering
        return
    narrow = embedder.new_session(1, SESSION_CONFIG)
    embedder.warm_up(narrow)  # its lazy set-up, before any request
    embedder.runner = CoreSharing(narrow, activity.others_answering, embedder.runner)


class WorkerActivity:
    """How many questions each of the server's worker processes holds at this moment (answering or waiting).

    One counter per worker in a shared-memory array the master makes before it forks: each worker writes only its
    own counter (under a thread lock, around the whole of a question, waiting for the encoder included) and reads
    the others', with no lock. The master hands out a counter before each fork (``assign``) and zeroes it when
    the worker exits (``release``), so a worker killed mid-answer does not look busy for ever. Counting waiting
    questions too keeps a loaded worker's counter from dropping to zero between two answers. gunicorn starts a
    new worker before an old one is gone when it reloads, so there are twice as many counters as workers, plus
    two; a worker that finds none free does not publish (others see it as idle).
    """

    def __init__(self, workers: int):
        self._counts = multiprocessing.RawArray(ctypes.c_int, 2 * max(1, workers) + 2)
        self._free = list(range(len(self._counts)))  # master-side bookkeeping
        self._slot: int | None = None  # this worker's counter (after the fork)
        self._lock = threading.Lock()  # the worker's threads share its counter

    # master side (gunicorn hooks)
    def assign(self, worker) -> None:
        worker.qa_activity_slot = self._free.pop(0) if self._free else None

    def release(self, worker) -> None:
        slot = getattr(worker, "qa_activity_slot", None)
        if slot is not None:
            self._counts[slot] = 0
            self._free.append(slot)

    # worker side
    def adopt(self, worker) -> None:
        self._slot = getattr(worker, "qa_activity_slot", None)

    @contextmanager
    def answering(self):
        slot = self._slot
        if slot is None:
            yield
            return
        with self._lock:
            self._counts[slot] += 1
        try:
            yield
        finally:
            with self._lock:
                self._counts[slot] -= 1

    def others_answering(self) -> bool:
        own = self._slot
        return any(count for i, count in enumerate(self._counts) if i != own)
