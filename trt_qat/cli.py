"""Argument groups shared by the stage CLIs, and the helpers that turn them into models and datasets."""
from __future__ import annotations

import argparse

from .errors import TrtQatError

__all__ = ["add_model_args", "add_data_args", "load_fp32_model", "make_dataset"]


def add_model_args(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("model")
    group.add_argument("--checkpoint", required=True, help="FP32 checkpoint written by `trt-qat train`")
    group.add_argument("--model", default=None, help="built-in model name (default: the checkpoint's)")
    return group


def add_data_args(parser: argparse.ArgumentParser, default_split: str = "val"):
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=True, help="YOLO-format data.yaml (see `trt-qat make-data`)")
    group.add_argument("--split", default=default_split, help=f"split key in data.yaml. Default {default_split}")
    group.add_argument("--imgsz", type=int, default=128, help="letterbox size. Default 128")
    group.add_argument("--batch-size", type=int, default=16)
    group.add_argument("--max-images", type=int, default=None, help="use only the first N images")
    return group


def load_fp32_model(args):
    from .models.yolo import load_checkpoint

    model, _ = load_checkpoint(args.checkpoint)
    if getattr(args, "model", None) and model.cfg.get("name") != args.model:
        raise TrtQatError(f"checkpoint '{args.checkpoint}' holds {model.cfg.get('name')}, not {args.model}; drop "
                          "--model or pass the matching checkpoint")
    return model


def make_dataset(args, split: str, augment: bool = False):
    from .data.yolo import YoloDataset

    return YoloDataset(args.data, split=split, imgsz=args.imgsz, augment=augment,
                       max_images=getattr(args, "max_images", None))
