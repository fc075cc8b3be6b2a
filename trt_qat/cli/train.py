"""`trt-qat train`: the command line over :mod:`trt_qat.train.fp32`."""
from __future__ import annotations

import argparse
import os

from trt_qat.cli.args import ArgumentParser, cli_main, imgsz, learning_rate, non_negative_int, positive_int
from trt_qat.errors import TrtQatError
from trt_qat.fileio import check_not_input, output_lock
from trt_qat.train.fp32 import train_fp32
from trt_qat.train.loop import OPTIMIZERS


def _build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="trt-qat train", description="Train a detector from scratch in FP32 (the baseline for "
                                "PTQ and QAT): the built-in one, or an Ultralytics model yaml with "
                                "--model-family ultralytics.")
    p.add_argument("--data", required=True, help="YOLO data.yaml with train and val splits")
    p.add_argument("--model", default="yolo-n",
                   help="yolo-n or yolo-s; with --model-family ultralytics a model yaml such as yolov8n.yaml "
                        "(default: %(default)s)")
    p.add_argument("--model-family", default=None, help="model family (builtin, ultralytics; default: builtin)")
    p.add_argument("--epochs", type=positive_int, default=30, help="default: %(default)s")
    p.add_argument("--batch", type=positive_int, default=32, help="batch size (default: %(default)s)")
    p.add_argument("--imgsz", type=imgsz, default=128, help="letterbox size (default: %(default)s)")
    p.add_argument("--lr", type=learning_rate, default=None,
                   help="peak learning rate (default: 0.01 sgd, 0.002 adamw)")
    p.add_argument("--optimizer", default="sgd", choices=sorted(OPTIMIZERS), help="default: %(default)s")
    p.add_argument("--out", default="runs/fp32/best.pt", help="best checkpoint (default: %(default)s)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="default: %(default)s")
    p.add_argument("--workers", type=non_negative_int, default=0, help="data-loader workers (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--eval-every", type=positive_int, default=None,
                   help="evaluate every N epochs (default: epochs // 10)")
    p.add_argument("--no-augment", action="store_true", help="disable the train-split augmentation")
    p.add_argument("--half", action="store_true",
                   help="store the best checkpoint's weights in FP16 (half the file; loaded back as FP32)")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh even when <out>.last.pt holds a killed run of the same settings")
    return p


@cli_main
def main(argv=None):
    args = _build_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise TrtQatError("trt-qat train runs in one process (under torchrun every rank would train and write the "
                          "same files); run it without torchrun")
    check_not_input(args.out, args.data, flag="--out")
    with output_lock(args.out, is_dir=False):
        train_fp32(args.data, model_name=args.model, epochs=args.epochs, batch_size=args.batch, imgsz=args.imgsz,
                   lr=args.lr, out=args.out, seed=args.seed, workers=args.workers, device=args.device,
                   optimizer=args.optimizer, eval_every=args.eval_every, augment=not args.no_augment,
                   threads=args.threads, family=args.model_family, resume=not args.no_resume,
                   half=args.half)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
