"""Atomic, durable writes: a reader sees the whole old file or the whole new one, and failures leave no debris."""

from __future__ import annotations

import json

import pytest

from qa_service import files


def test_atomic_writes_replace_whole_files_and_leave_nothing_beside(tmp_path):
    target = tmp_path / "state.json"
    files.write_json_atomically(target, {"generation": 1})
    files.write_json_atomically(target, {"generation": 2})
    assert json.loads(target.read_text()) == {"generation": 2}
    files.write_bytes_atomically(tmp_path / "blob", b"\x00\x01")
    files.write_text_atomically(tmp_path / "note.txt", "é")
    assert (tmp_path / "blob").read_bytes() == b"\x00\x01" and (tmp_path / "note.txt").read_text("utf-8") == "é"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob", "note.txt", "state.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "state.json"
    files.write_json_atomically(target, {"generation": 1})

    def fail(fh):
        fh.write("{half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        files.write_atomically(target, fail)
    assert json.loads(target.read_text()) == {"generation": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_publish_folder_renames_a_finished_folder_into_place(tmp_path):
    tmp = tmp_path / ".build.tmp"
    tmp.mkdir()
    (tmp / "manifest.json").write_text("{}")
    files.publish_folder(tmp, tmp_path / "build")
    assert (tmp_path / "build" / "manifest.json").exists() and not tmp.exists()
