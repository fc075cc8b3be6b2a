"""One error type and one logger for the whole package.

Every user-facing failure is a :class:`TrtQatError` whose message names the problem *and* the fix.
CLI entry points wrap their work in :func:`cli_main`, which turns such an error into a single line on
stderr and a non-zero exit code, with no traceback.
"""
from __future__ import annotations

import functools
import logging
import os
import sys

__all__ = ["TrtQatError", "LOG", "cli_main", "setup_logging"]

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


def cli_main(func):
    """Decorate a ``main(argv=None)``: a TrtQatError becomes one line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(argv=None):
        import argparse

        setup_logging()
        # argparse's own errors (a missing or malformed flag) become one line too, not usage + error
        parser_error = argparse.ArgumentParser.error
        argparse.ArgumentParser.error = _argparse_error
        try:
            return func(argv)
        except TrtQatError as exc:
            print(f"trt_qat: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("trt_qat: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        finally:
            argparse.ArgumentParser.error = parser_error

    return wrapper


def _argparse_error(parser, message):
    raise TrtQatError(f"{parser.prog}: {message} (see {parser.prog} --help)")
