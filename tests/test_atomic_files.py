"""Local files written whole or not at all (l2t_core.atomic_files)."""

import json
import os
import stat

import pytest

from l2t_core.atomic_files import write_json_atomic, write_jsonl_atomic, write_text_atomic


def test_writes_replace_whole_files_with_an_ordinary_files_mode(tmp_path):
    path = write_text_atomic(tmp_path / "sub" / "a.txt", "old")
    assert path.read_text() == "old"
    write_json_atomic(path, {"é": [1, 2]})
    assert json.loads(path.read_text()) == {"é": [1, 2]}
    write_jsonl_atomic(path, [{"a": "é"}, {"b": 2}])
    assert path.read_text(encoding="utf-8") == '{"a": "é"}\n{"b": 2}\n'
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = write_text_atomic(tmp_path / "r.jsonl", "kept\n")
    with pytest.raises(TypeError):
        write_jsonl_atomic(path, [{"a": 1}, {"b": object()}])  # the second row does not serialise
    with pytest.raises(TypeError):
        write_json_atomic(path, {"c": object()})
    assert path.read_text() == "kept\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]


def test_overwrite_false_refuses_an_existing_file(tmp_path):
    path = write_text_atomic(tmp_path / "t.txt", "first", overwrite=False)
    with pytest.raises(FileExistsError, match="already exists"):
        write_text_atomic(path, "second", overwrite=False)
    assert path.read_text() == "first"


def test_overwrite_false_never_replaces_a_file_that_appears_meanwhile(tmp_path, monkeypatch):
    """The no-clobber write links the finished file in: a file another writer created after the
    first check is kept, and no temporary file is left."""
    from pathlib import Path

    path = tmp_path / "race.txt"
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self: False if self == path else real_exists(self))
    path.write_text("theirs")
    with pytest.raises(FileExistsError, match="already exists"):
        write_text_atomic(path, "mine", overwrite=False)
    assert path.read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["race.txt"]
