"""``python -m trt_qat.benchmark``: kept because README documents it; the command lives in
:mod:`trt_qat.cli.bench` and the library in :mod:`trt_qat.measure.benchmark`."""
from __future__ import annotations

from trt_qat.cli.bench import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
