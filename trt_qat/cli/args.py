"""What every command shares: the parser whose errors are one line, the ``cli_main`` wrapper, typed flags, the
argument groups, and the helpers that turn them into models and datasets."""
from __future__ import annotations

import argparse
import functools
import sys

from trt_qat.config import MAX_IMGSZ, MAX_LR, MIN_IMGSZ
from trt_qat.errors import LOG, TrtQatError, setup_logging
from trt_qat.models.adapter import FAMILY_MODULES

__all__ = ["ArgumentParser", "cli_main", "add_model_args", "add_data_args",
           "load_fp32_model", "make_dataset", "resolve_imgsz", "positive_int", "non_negative_int",
           "positive_float", "non_negative_float", "unit_interval", "imgsz", "learning_rate", "regex"]


#: the input size when neither --imgsz nor the checkpoint gives one (the demo's)
DEFAULT_IMGSZ = 128


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors (a missing or malformed flag) are a :class:`TrtQatError`, so
    that :func:`cli_main` prints them as one line instead of usage plus error."""

    def error(self, message):
        raise TrtQatError(f"{self.prog}: {message} (see {self.prog} --help)")


def cli_main(func):
    """Decorate a command's ``main(argv=None)``: a TrtQatError becomes one line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(argv=None):
        setup_logging()
        previous = _on_sigterm(_terminate)
        try:
            return func(argv)
        except TrtQatError as exc:
            print(f"trt_qat: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except Terminated:
            print("trt_qat: terminated (SIGTERM)", file=sys.stderr)
            raise SystemExit(143) from None
        except KeyboardInterrupt:
            print("trt_qat: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        finally:
            _on_sigterm(previous)

    return wrapper


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, a scheduler's kill) raised like Ctrl-C, so that partial files are removed and locks
    released on the way out."""


def _terminate(signum, frame):
    raise Terminated()


def _on_sigterm(handler):
    """Install ``handler`` for SIGTERM (main thread only); returns the previous one."""
    import signal
    import threading

    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (seeds, workers)."""
    return _int_at_least(text, 0)


def _finite(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (learning rates)."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a positive number")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (tolerances, targets)."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def unit_interval(text: str) -> float:
    """argparse type: a number in [0, 1] (thresholds, cosine similarity)."""
    value = _finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1]")
    return value


def regex(text: str) -> str:
    """argparse type: a valid regular expression (kept as text)."""
    import re

    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regex ({exc})") from None
    return text


def imgsz(text: str) -> int:
    """argparse type: an input size the detectors take (a multiple of their largest stride, 32, in [32, 8192])."""
    value = positive_int(text)
    if value % 32 or not MIN_IMGSZ <= value <= MAX_IMGSZ:
        raise argparse.ArgumentTypeError(f"{value} must be a multiple of 32 (the detector's largest stride) between "
                                         f"{MIN_IMGSZ} and {MAX_IMGSZ}")
    return value


def learning_rate(text: str) -> float:
    """argparse type: a learning rate, finite and in (0, 1]."""
    value = positive_float(text)
    if value > MAX_LR:
        raise argparse.ArgumentTypeError(f"{value:g} is too large for a learning rate (at most {MAX_LR:g}; "
                                         "fine-tuning uses about 1e-4)")
    return value


def add_model_args(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("model")
    group.add_argument("--checkpoint", required=True,
                       help="FP32 checkpoint: written by `trt-qat train`, or an Ultralytics .pt (YOLOv5u/v8/11/26)")
    group.add_argument("--model", default=None, help="built-in model name (default: the checkpoint's)")
    group.add_argument("--model-family", default=None, choices=sorted(FAMILY_MODULES),
                       help="the checkpoint's model family (default: recognised from the checkpoint)")
    return group


def add_data_args(parser: argparse.ArgumentParser, default_split: str = "val", required: bool = True):
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=required, help="YOLO-format data.yaml (see `trt-qat make-data`)")
    group.add_argument("--split", default=default_split, help=f"split key in data.yaml. Default {default_split}")
    group.add_argument("--imgsz", type=imgsz, default=None,
                       help="letterbox size, a multiple of the model's largest stride (default: the size the "
                            "checkpoint or ONNX records, else 128)")
    group.add_argument("--batch-size", type=positive_int, default=16)
    group.add_argument("--max-images", type=positive_int, default=None, help="use only the first N images")
    return group


def load_fp32_model(args):
    """``(model, adapter)``: the FP32 model of ``--checkpoint`` through its family's adapter, checked against
    ``--model``."""
    from trt_qat.models.adapter import load_fp32

    model, adapter = load_fp32(args.checkpoint, getattr(args, "model_family", None))
    held = adapter.model_name(model)
    if getattr(args, "model", None) and held != args.model:
        raise TrtQatError(f"checkpoint '{args.checkpoint}' holds {held}, not {args.model}; drop "
                          "--model or pass the matching checkpoint")
    return model, adapter


def resolve_imgsz(args, model=None, onnx=None, adapter=None) -> int:
    """Set and return ``args.imgsz``: ``--imgsz`` when given, else the size the checkpoint records
    (``model.trt_qat_imgsz``: its training or calibration size) or the static input size of ``onnx``, else
    :data:`DEFAULT_IMGSZ`; checked against the model's largest stride."""
    if args.imgsz is None:
        held = getattr(model, "trt_qat_imgsz", None) if model is not None else None
        if held is None and onnx is not None:
            from trt_qat.onnx.io import static_input_size

            held = static_input_size(onnx)
        args.imgsz = int(held) if held else DEFAULT_IMGSZ
        LOG.debug("imgsz %d (%s)", args.imgsz, "recorded in the model" if held else "the default; pass --imgsz")
    if model is not None and adapter is not None:
        adapter.check_imgsz(model, args.imgsz)
    return args.imgsz


def make_dataset(args, split: str, augment: bool = False, adapter=None):
    """The ``--data`` split ``split``, read the way the model family (``adapter``, default built-in) reads it."""
    from trt_qat.models.adapter import get_adapter

    return (adapter or get_adapter()).dataset(args.data, split, imgsz=args.imgsz, augment=augment,
                                              max_images=getattr(args, "max_images", None))
