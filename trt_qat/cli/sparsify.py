"""`trt-qat sparsify`: magnitude 2:4 sparsity of the large convs (:mod:`trt_qat.prune.sparsity`), optionally
fine-tuned with the masks enforced after every step."""
from __future__ import annotations

import argparse

from trt_qat.cli.args import (
    ArgumentParser,
    add_data_args,
    add_model_args,
    cli_main,
    learning_rate,
    load_fp32_model,
    non_negative_int,
    positive_int,
    resolve_imgsz,
)
from trt_qat.errors import TrtQatError
from trt_qat.fileio import check_not_input, check_writable_file, output_lock
from trt_qat.prune.sparsity import DEFAULT_MIN_CHANNELS


def _build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="trt-qat sparsify", description="2:4 structured sparsity (for each output channel and "
                       "kernel position, 2 of every 4 consecutive input channels zero) on the convs large enough for "
                       "TensorRT's sparse kernels; with --data and --epochs, fine-tuned with the masks kept.")
    add_model_args(p)
    add_data_args(p, default_split="val", required=False)
    p.add_argument("--min-channels", type=positive_int, default=DEFAULT_MIN_CHANNELS,
                   help="convs with fewer input or output channels stay dense (default: %(default)s)")
    p.add_argument("--epochs", type=non_negative_int, default=0,
                   help="fine-tuning epochs with the masks enforced (needs --data; default: %(default)s)")
    p.add_argument("--lr", type=learning_rate, default=None, help="fine-tuning peak learning rate (default: 0.005)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="cap on fine-tuning steps per epoch")
    p.add_argument("--workers", type=non_negative_int, default=0, help="data-loader workers (default: %(default)s)")
    p.add_argument("--out", required=True, help="the sparsified FP32 checkpoint")
    return p


@cli_main
def main(argv=None):
    args = _build_parser().parse_args(argv)
    from trt_qat.prune.sparsity import sparsify

    if args.epochs and not args.data:
        raise TrtQatError("--epochs fine-tunes on --data; pass the data.yaml the model was trained on")
    check_not_input(args.out, args.checkpoint, *([args.data] if args.data else []), flag="--out")
    check_writable_file(args.out)
    model, adapter = load_fp32_model(args)
    resolve_imgsz(args, model, adapter=adapter)
    with output_lock(args.out, is_dir=False):
        result = sparsify(model, args.min_channels)  # prints the rule; no eligible conv is one error line
        tuned = None
        if args.epochs:
            from trt_qat.prune.finetune import finetune_fp32

            tuned = finetune_fp32(model, adapter, args.data, epochs=args.epochs, lr=args.lr, imgsz=args.imgsz,
                                  batch_size=args.batch_size, max_steps=args.max_steps,
                                  min_channels=args.min_channels, max_val_images=args.max_images,
                                  workers=args.workers)
        info = {"min_channels": args.min_channels, "layers": sorted(result["masks"]), "rule": result["rule"],
                "finetune": None if tuned is None else {k: tuned[k] for k in ("map50", "map50_95", "best_epoch")}}
        adapter.save(model, args.out, sparsity_2_4=info, imgsz=args.imgsz)
    tail = f"; fine-tuned {args.epochs} epochs: val mAP50-95 {tuned['map50_95']:.4f}" if tuned else ""
    print(f"2:4 on {len(result['masks'])} convs, {len(result['skipped'])} left dense{tail} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
