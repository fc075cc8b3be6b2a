"""``python -m trt_qat.build_engine``: kept because README documents it; the command lives in
:mod:`trt_qat.cli.build` and the library in :mod:`trt_qat.trt`."""
from __future__ import annotations

from trt_qat.cli.build import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
