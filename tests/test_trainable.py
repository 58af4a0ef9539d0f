"""The trial's scratch folders: named after their process, and cleared once it is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from workers.trainable import SCRATCH_PREFIXES, remove_stale_scratch, scratch_folder


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _folder(root, name, age_s):
    path = root / name
    path.mkdir()
    (path / "state.pt").write_bytes(b"x" * 1024)
    past = time.time() - age_s
    os.utime(path, (past, past))
    return path


def test_scratch_folders_name_their_process(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    folder = scratch_folder("fgd-ckpt-")
    assert folder.parent == tmp_path
    assert folder.name.startswith(f"fgd-ckpt-{os.getpid()}-")


def test_folders_of_this_process_and_old_ones_of_dead_processes_are_removed(tmp_path):
    dead = _dead_pid()
    stale = [_folder(tmp_path, f"{prefix}{dead}-abc", 2 * 3600) for prefix in SCRATCH_PREFIXES]
    fresh = _folder(tmp_path, f"fgd-ckpt-{dead}-new", 60)  # its process may still be uploading
    alive = _folder(tmp_path, f"fgd-ckpt-{os.getppid()}-old", 2 * 3600)
    own = _folder(tmp_path, f"fgd-teacher-{os.getpid()}-abc", 1)  # an earlier trial's, here
    foreign = _folder(tmp_path, "fgd-ckpt-notapid", 2 * 3600)
    other = _folder(tmp_path, f"something-{dead}-abc", 2 * 3600)

    removed = remove_stale_scratch(tmp_path)

    assert sorted(removed) == sorted([*stale, own])
    assert not any(p.exists() for p in (*stale, own))
    assert all(p.exists() for p in (fresh, alive, foreign, other))
    assert remove_stale_scratch(tmp_path, older_than=0) == [fresh]
