"""The opt-in ``encoder_cores`` tuning: encoder threads pinned to CPUs, core sharing between workers, and the
OS and onnxruntime hooks it relies on."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from qa_service.config import Settings
from qa_service.embedding import load_index_encoder
from qa_service.embedding.onnx_encoder import SERVING_THREADS, OnnxEmbedder
from qa_service.store import read_manifest
from qa_service.tuning import encoder_cores
from qa_service.tuning.encoder_cores import (
    CoreSharing,
    PinnedCaller,
    helper_placement,
    pinned_session_config,
    run_on_cpus,
    share_cores,
)

from .support.encoders import dev_questions, idle_cpu_after_questions

TWO_CPUS = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                              reason="needs two CPUs and sched_setaffinity")


def _thread_cpus() -> dict[str, set[int]]:
    """Each thread of this process and the CPUs it may run on."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[tid] = os.sched_getaffinity(int(tid))
        except OSError:  # the thread ended meanwhile
            pass
    return out


def _new_threads_cpus(before: dict, helpers: tuple[int, ...], seconds: float = 5.0) -> list[set[int]]:
    """The CPU sets of threads started since ``before``; waits (up to ``seconds``) for one on ``helpers``, since a
    pool thread applies its affinity itself once it runs."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        new = [cpus for tid, cpus in _thread_cpus().items() if tid not in before]
        if set(helpers) in new or time.monotonic() > deadline:
            return new
        time.sleep(0.01)


class Busy:
    """A stand-in for ``WorkerActivity`` whose "others answering" is set by the test."""

    def __init__(self, busy: bool):
        self.busy = busy

    def others_answering(self) -> bool:
        return self.busy


class Recording:
    """A session that notes the CPUs its caller may use while it runs."""

    def __init__(self, session):
        self.session, self.seen = session, []

    def run(self, *args):
        self.seen.append(os.sched_getaffinity(0))
        return self.session.run(*args)

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    def get_session_options(self):
        return self.session.get_session_options()


class _Worker:
    """What gunicorn's worker object is to ``WorkerActivity``: something to hang a slot number on."""


# --------------------------------------------------------------------------- the hooks the tuning needs

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread pinning is Linux-only")
def test_the_os_and_onnxruntime_hooks_it_needs_are_there(tmp_path):
    """Fails, rather than letting the tuning fall back unseen, when an OS call or onnxruntime setting it uses is
    gone: the affinity calls, the SessionOptions fields, and helper threads actually placed by the affinity key."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    assert callable(os.sched_getaffinity) and callable(os.sched_setaffinity)
    options = ort.SessionOptions()
    for field in ("intra_op_num_threads", "inter_op_num_threads", "execution_mode", "graph_optimization_level"):
        assert hasattr(options, field), field
    config = pinned_session_config((1,))
    for key, value in config.items():
        options.add_session_config_entry(key, value)
        assert options.get_session_config_entry(key) == value
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("placing a helper thread needs two CPUs")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor("w", TensorProto.FLOAT, [64, 64], np.ones(64 * 64).tolist())])
    path = tmp_path / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    helpers, _ = helper_placement(2)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    for key, value in pinned_session_config(helpers).items():
        options.add_session_config_entry(key, value)
    before = _thread_cpus()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert set(helpers) in _new_threads_cpus(before, helpers)  # onnxruntime's helper thread, on the helper CPU only
    assert session.run(None, {"x": np.ones((2, 64), dtype=np.float32)})[0].shape == (2, 64)


# --------------------------------------------------------------------------- placement

def test_helper_placement_puts_helpers_and_caller_on_different_cpus(monkeypatch):
    """The helpers take the last CPUs the process may use, the caller the rest; no plan when it cannot work."""
    allowed = {0, 1}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(allowed))
    assert helper_placement(2) == ((1,), frozenset({0}))
    assert helper_placement(1) is None  # no helper threads
    allowed = {2, 3, 5}
    assert helper_placement(2) == ((5,), frozenset({2, 3}))
    assert helper_placement(3) == ((3, 5), frozenset({2}))
    assert helper_placement(4) is None  # fewer CPUs than threads
    allowed = {0}
    assert helper_placement(2) is None
    monkeypatch.delattr(os, "sched_getaffinity")  # not Linux
    assert helper_placement(2) is None


@TWO_CPUS
def test_run_on_cpus_keeps_the_caller_there_and_gives_its_cpus_back():
    before = os.sched_getaffinity(0)
    cpu = min(before)
    assert run_on_cpus(frozenset({cpu}), os.sched_getaffinity, 0) == {cpu}
    assert os.sched_getaffinity(0) == before

    def fail():
        assert os.sched_getaffinity(0) == {cpu}
        raise KeyError("inside")

    with pytest.raises(KeyError):
        run_on_cpus(frozenset({cpu}), fail)
    assert os.sched_getaffinity(0) == before
    # CPUs the thread may not use: a plain call, not an error
    assert run_on_cpus(frozenset({max(before) + 1000}), os.sched_getaffinity, 0) == before


# --------------------------------------------------------------------------- a pinned encoder

@pytest.mark.slow
@pytest.mark.parametrize("pin", [False, True])
def test_serving_encoder_leaves_no_thread_busy_after_a_question(real_index, pin):
    """Two serving workers of two threads each share two cores, so after a question no thread may stay busy.
    Unpinned, the pool sleeps between operators; pinned apart from the caller, it spins between the operators of
    a run and stops with the run (docs/decisions/encoder-thread-pinning.md)."""

    encoder = load_index_encoder(read_manifest(real_index.index_dir), pin_threads=pin)
    options = encoder.session.get_session_options()
    spinning = options.get_session_config_entry("session.intra_op.allow_spinning")
    if not isinstance(encoder.runner, PinnedCaller):
        assert spinning == "0"
    else:
        assert spinning == "1" and options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert pin or encoder.runner is None
    assert options.intra_op_num_threads == SERVING_THREADS >= 1
    assert idle_cpu_after_questions(encoder, dev_questions()) < 0.05  # of 5 x 50 ms after a question


@TWO_CPUS
def test_a_question_encoder_runs_its_helper_and_its_caller_on_different_cpus(real_index):
    """The pinned encoder puts its helper thread on the helper CPU and keeps its caller off it, with the same
    vectors. The one-thread session (busy workers) and an unpinned encoder leave threads alone."""
    manifest = read_manifest(real_index.index_dir)
    questions = dev_questions()
    helpers, caller = helper_placement(2)
    threads_before = _thread_cpus()
    pinned = OnnxEmbedder.from_manifest(manifest, threads=2, open_session=False)
    assert encoder_cores.pin_threads(pinned) is True
    assert set(helpers) in _new_threads_cpus(threads_before, helpers)  # the helper thread, on the helper CPU only
    assert isinstance(pinned.runner, PinnedCaller) and pinned.runner.cpus == caller
    with pytest.raises(ValueError, match="not open yet"):  # an open session's threads are placed already
        encoder_cores.pin_threads(pinned)

    wide = pinned._session = Recording(pinned._session)
    before = os.sched_getaffinity(0)
    vectors = pinned.encode(questions[:3])
    assert wide.seen and all(cpus == set(caller) for cpus in wide.seen)
    assert os.sched_getaffinity(0) == before

    share_cores(pinned, Busy(True))
    assert isinstance(pinned.runner, CoreSharing) and isinstance(pinned.runner.then, PinnedCaller)
    narrow = pinned.runner.narrow = Recording(pinned.runner.narrow)
    assert np.array_equal(pinned.encode(questions[:3]), vectors)
    assert narrow.seen and all(cpus == before for cpus in narrow.seen)  # one thread: nothing to keep apart

    threads_before = _thread_cpus()
    plain = OnnxEmbedder.from_manifest(manifest, threads=2)
    new = [cpus for tid, cpus in _thread_cpus().items() if tid not in threads_before]
    assert new and all(cpus == before for cpus in new) and plain.runner is None
    assert np.array_equal(plain.encode(questions[:3]), vectors)


def test_the_serving_encoder_is_pinned_only_when_asked(real_index):
    """``load_index_encoder(pin_threads=True)`` pins (where this machine can); the default and a Searcher on
    default settings do not."""
    from qa_service.retrieval import Searcher

    manifest = read_manifest(real_index.index_dir)
    expected = helper_placement(SERVING_THREADS)
    pinned = load_index_encoder(manifest, pin_threads=True)
    if expected is None:
        assert pinned.runner is None
    else:
        assert isinstance(pinned.runner, PinnedCaller) and pinned.runner.cpus == expected[1]
    assert load_index_encoder(manifest).runner is None
    assert Searcher(real_index).embedder.runner is None


@pytest.mark.skipif("tuning" not in Settings.__dataclass_fields__,
                    reason="Settings.tuning (QA_TUNING) not present")
def test_the_tuning_setting_pins_the_searchers_encoder(real_index):
    from qa_service.retrieval import Searcher

    expected = helper_placement(SERVING_THREADS)
    tuned = Searcher(real_index.with_(tuning=frozenset({"encoder_cores"}))).embedder
    pinned_to = tuned.runner.cpus if isinstance(tuned.runner, PinnedCaller) else None
    assert pinned_to == (expected[1] if expected else None)
    assert Searcher(real_index.with_(tuning=frozenset())).embedder.runner is None


# --------------------------------------------------------------------------- core sharing

@pytest.mark.slow
def test_a_busy_server_encodes_on_one_thread_with_the_same_vectors(real_index):
    """``share_cores``: while other workers answer, the encoder uses its one-thread session (less CPU in thread
    hand-offs); alone, the two-thread one (lower latency). Both give bit-identical vectors."""
    encoder = OnnxEmbedder.from_manifest(read_manifest(real_index.index_dir), threads=2)
    questions = dev_questions()
    alone = encoder.encode(questions[:1])
    activity = Busy(False)
    share_cores(encoder, activity)
    assert isinstance(encoder.runner, CoreSharing) and encoder.runner.then is None
    wide = encoder._session = Recording(encoder._session)
    narrow = encoder.runner.narrow = Recording(encoder.runner.narrow)
    assert wide.get_session_options().intra_op_num_threads == 2
    assert narrow.get_session_options().intra_op_num_threads == 1
    encoder.encode(questions[:1])
    assert (len(wide.seen), len(narrow.seen)) == (1, 0)
    activity.busy = True
    encoder.encode(questions[:1])
    assert (len(wide.seen), len(narrow.seen)) == (1, 1)
    narrow_vectors = np.stack([encoder.encode([q])[0] for q in questions])
    activity.busy = False
    wide_vectors = np.stack([encoder.encode([q])[0] for q in questions])
    assert np.array_equal(narrow_vectors, wide_vectors) and np.array_equal(wide_vectors[:1], alone)
    batch_wide = encoder.encode(questions)
    activity.busy = True
    assert np.array_equal(encoder.encode(questions), batch_wide)  # batches too

    again = Busy(True)
    runner = encoder.runner
    share_cores(encoder, again)  # a second call keeps the sessions and takes the new activity
    assert encoder.runner is runner and runner.contended == again.others_answering

    single = OnnxEmbedder.from_manifest(read_manifest(real_index.index_dir), threads=1)
    share_cores(single, Busy(True))  # already one thread: no extra one-thread session
    assert single.runner is None


def test_share_cores_leaves_other_embedders_alone(fake_embedder):
    share_cores(fake_embedder, Busy(True))
    assert not hasattr(fake_embedder, "runner")
