"""What the bad-input tests share: run a command and check that it failed the promised way."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from trt_qat.__main__ import main


def tree(*dirs) -> dict:
    """``{path: sha256}`` of every file under ``dirs``: equal before and after = nothing written, nothing changed."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in dirs for p in sorted(Path(d).rglob("*")) if p.is_file()}


def one_line_error(capsys, argv, *watched) -> str:
    """Run ``trt-qat argv``: exit code 2, exactly one stderr line starting ``trt_qat: error:``, no traceback, and
    no file under ``watched`` created or changed. Returns the line."""
    before = tree(*watched)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("trt_qat: error: ") and "Traceback" not in err
    assert tree(*watched) == before
    return lines[0]
