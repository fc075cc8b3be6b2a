"""Atomic writes: a directory is not a file path, written files get the usual permissions, checkpoints are dicts."""
import pytest
import torch

from trt_qat.errors import TrtQatError
from trt_qat.fileio import atomic_write_text, read_checkpoint


def test_directory_target_is_one_clear_error(tmp_path):
    with pytest.raises(TrtQatError, match="is a directory"):
        atomic_write_text(tmp_path, "x")


def test_written_files_follow_the_umask(tmp_path):
    from trt_qat import fileio

    path = atomic_write_text(tmp_path / "a.txt", "x")
    assert path.read_text() == "x" and (path.stat().st_mode & 0o777) == 0o666 & ~fileio._UMASK
    assert (path.stat().st_mode & 0o777) != 0o600 or fileio._UMASK == 0o066  # not mkstemp's private mode
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary file left behind


def test_checkpoint_must_be_a_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(TrtQatError, match="holds a list"):
        read_checkpoint(tmp_path / "list.pt")
