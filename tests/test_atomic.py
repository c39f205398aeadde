"""write_atomic / create_exclusive: temp names are fresh and never followed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from enclaves.atomic import NotSynced, create_exclusive, temp_name, write_atomic


def _plant_symlinks(path: Path, victim: Path) -> None:
    """Symlinks at the names an attacker could guess (the old ``.NAME.PID.tmp``)."""
    os.symlink(victim, path.with_name(f".{path.name}.{os.getpid()}.tmp"))


@pytest.mark.parametrize("write", [write_atomic, create_exclusive])
def test_a_planted_symlink_at_a_guessable_temp_name_is_not_followed(
    tmp_path: Path, write: object
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = tmp_path / "state"
    _plant_symlinks(path, victim)
    write(path, b"new data")  # type: ignore[operator]
    assert victim.read_bytes() == b"precious"
    assert path.read_bytes() == b"new data" and not path.is_symlink()
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


def test_temp_names_are_random_and_match_the_storage_cleanup(tmp_path: Path) -> None:
    from enclaves.storage.filestore import _is_temp

    names = {temp_name(tmp_path / "x").name for _ in range(50)}
    assert len(names) == 50
    assert all(_is_temp(n) for n in names)


def test_no_temp_file_left_behind(tmp_path: Path) -> None:
    path = tmp_path / "f"
    write_atomic(path, b"1")
    write_atomic(path, b"2")
    create_exclusive(tmp_path / "g", b"3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "g"]


@pytest.mark.parametrize("write", [write_atomic, create_exclusive])
def test_a_failed_directory_sync_after_the_rename_is_not_synced_with_the_file_in_place(
    tmp_path: Path, write: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the last step failed: NotSynced (an OSError with that errno), and
    the new file is what every reader sees; a failure before the rename is a
    plain OSError with the old file untouched."""
    import errno

    import enclaves.atomic

    def dir_fsync_fails(directory: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    path = tmp_path / "state"
    monkeypatch.setattr(enclaves.atomic, "fsync_dir", dir_fsync_fails)
    with pytest.raises(NotSynced) as raised:
        write(path, b"new")  # type: ignore[operator]
    assert isinstance(raised.value, OSError) and raised.value.errno == errno.EIO
    assert raised.value.strerror == "Input/output error"
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
    monkeypatch.undo()
    with pytest.raises(OSError) as before_rename:
        write_atomic(tmp_path / "missing-dir" / "f", b"x")
    assert not isinstance(before_rename.value, NotSynced)
