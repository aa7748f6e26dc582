"""sage.files: atomic_write (readers see the old file or the new one, never a part of either), and
the readers that turn a damaged file into one line naming it (tests/test_corruption.py: every file
kind, through the scripts)."""

from __future__ import annotations

import os
import re

import pytest
import torch

from sage.files import FileKind, atomic_write, load_tensors, read_json


def test_atomic_write_replaces_whole_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    atomic_write(target, "old")
    atomic_write(target, b"\x00new bytes")
    assert target.read_bytes() == b"\x00new bytes"
    atomic_write(target, "text é")
    assert target.read_text(encoding="utf-8") == "text é"

    def crash(src, dst):  # the process dies between writing the temporary file and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, "half")
    assert target.read_text(encoding="utf-8") == "text é"
    # What was written went to the temporary file beside it (the next write of this process reuses it).
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".manifest.json.tmp-{os.getpid()}", "manifest.json"]


DAMAGED = FileKind("the test's record", ValueError, "write it again")


@pytest.mark.parametrize("content, problem", [
    (None, "the file is missing"),
    (b"", "not valid JSON (it is empty)"),
    (b'{"a": [1, 2', "truncated or corrupted, not valid JSON (line 1 column"),
    (b"\xff\xfe{}", "corrupted, not text (byte 0xff at offset 0)"),
    (b"[1, 2]", "it holds a list where an object belongs"),
    (b'{"b": 1}', "incomplete or corrupted, it lacks 'a'"),
])
def test_read_json_names_the_file_what_is_wrong_and_what_to_do(tmp_path, content, problem):
    path = tmp_path / "record.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError) as raised:
        read_json(path, DAMAGED, keys=("a",))
    message = str(raised.value)
    assert message.startswith(f"{path}: cannot read the test's record: ") and message.endswith("; write it again")
    assert problem in message and "\n" not in message
    if content is not None:
        assert path.read_bytes() == content  # left as it was, for the user to look at


def test_load_tensors_refuses_damage_and_code_in_one_line(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"a": torch.ones(2)}, path)
    assert load_tensors(path, DAMAGED, keys=("a",))["a"].tolist() == [1.0, 1.0]
    whole = path.read_bytes()
    for content, problem in [(whole[: len(whole) // 2], "truncated or corrupted (PytorchStreamReader failed"),
                             (b"\x80\x04garbage", "corrupted, not a tensors-only torch file")]:
        path.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(problem)) as raised:
            load_tensors(path, DAMAGED)
        assert "\n" not in str(raised.value) and "weights_only" not in str(raised.value)
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="it holds a list where an object belongs"):
        load_tensors(path, DAMAGED, keys=())
