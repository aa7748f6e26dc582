"""sage.files.atomic_write: readers see the old file or the new one, never a part of either."""

from __future__ import annotations

import os

import pytest

from sage.files import atomic_write


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
