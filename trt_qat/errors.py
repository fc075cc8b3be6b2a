"""One error type and one logger for the whole package.

Every user-facing failure is a :class:`TrtQatError` whose message names the problem *and* the fix.
The command-line entry points (:mod:`trt_qat.cli`) turn such an error into a single line on stderr and exit
code 2, with no traceback (:func:`trt_qat.cli.args.cli_main`).
"""
from __future__ import annotations

import logging
import os
import sys

__all__ = ["TrtQatError", "LOG", "setup_logging"]

LOG = logging.getLogger("trt_qat")


class TrtQatError(RuntimeError):
    """A problem the user can fix. The message says what is wrong and how to fix it."""


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (pytest and notebooks replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(verbose: bool = False) -> None:
    """Configure the package logger once (idempotent)."""
    level = logging.DEBUG if verbose or os.environ.get("TRT_QAT_VERBOSE") else logging.INFO
    # Under a host that already configured logging (pytest, an application), propagate to it instead.
    host_handlers = [h for h in logging.getLogger().handlers if type(h).__name__ != "ABSLHandler"]
    if not LOG.handlers and not host_handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[trt_qat] %(levelname)s: %(message)s"))
        LOG.addHandler(handler)
        LOG.propagate = False
    LOG.setLevel(level)
