"""`trt-qat finetune-pruned`: fine-tune a pruned (or 2:4-sparsified) FP32 checkpoint, distilling from the unpruned
model it came from when that file exists (:mod:`trt_qat.prune.finetune`); then calibrate, QAT and export as usual."""
from __future__ import annotations

import argparse

from trt_qat.cli.args import (
    ArgumentParser,
    add_data_args,
    cli_main,
    learning_rate,
    non_negative_float,
    non_negative_int,
    positive_int,
    resolve_imgsz,
)
from trt_qat.errors import LOG, TrtQatError
from trt_qat.fileio import check_not_input, check_writable_file, output_lock
from trt_qat.prune.sparsity import DEFAULT_MIN_CHANNELS


def _build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="trt-qat finetune-pruned", description="Fine-tune a checkpoint written by `trt-qat prune` "
                       "or `trt-qat sparsify` (2:4 masks kept), with output distillation from the unpruned model.")
    p.add_argument("--checkpoint", required=True, help="the pruned or sparsified FP32 checkpoint")
    add_data_args(p, default_split="val")
    p.add_argument("--epochs", type=positive_int, default=10, help="default: %(default)s")
    p.add_argument("--lr", type=learning_rate, default=None, help="peak learning rate (default: 0.005 sgd)")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"), help="default: %(default)s")
    p.add_argument("--max-steps", type=positive_int, default=None, help="cap on steps per epoch")
    p.add_argument("--teacher", default=None,
                   help="unpruned FP32 checkpoint to distil from (default: the one the checkpoint was pruned from, "
                        "when it still exists)")
    p.add_argument("--no-distill", action="store_true", help="fine-tune on the labels alone")
    p.add_argument("--distill-weight", type=non_negative_float, default=1.0, help="default: %(default)s")
    p.add_argument("--min-channels", type=positive_int, default=None,
                   help="2:4 eligibility threshold used to find sparse convs (default: the one `trt-qat sparsify` "
                        f"used, else {DEFAULT_MIN_CHANNELS})")
    p.add_argument("--seed", type=non_negative_int, default=0, help="default: %(default)s")
    p.add_argument("--workers", type=non_negative_int, default=0, help="data-loader workers (default: %(default)s)")
    p.add_argument("--out", required=True, help="the fine-tuned FP32 checkpoint (still pruned)")
    return p


@cli_main
def main(argv=None):
    args = _build_parser().parse_args(argv)
    from trt_qat.models.adapter import adapter_for_checkpoint, adapter_for_model, read_checkpoint_or_name_family
    from trt_qat.prune.finetune import finetune_fp32, has_output_distill, teacher_for

    if args.no_distill and args.teacher:
        raise TrtQatError("--teacher and --no-distill contradict each other; drop one")
    check_not_input(args.out, args.checkpoint, args.data, *([args.teacher] if args.teacher else []), flag="--out")
    check_writable_file(args.out)
    ckpt = read_checkpoint_or_name_family(args.checkpoint)
    adapter = adapter_for_checkpoint(ckpt)
    model = adapter.tag(adapter.from_checkpoint(ckpt, args.checkpoint), ckpt)
    resolve_imgsz(args, model, adapter=adapter)
    implied = ckpt.get("pruned_from") if not args.teacher else None
    if implied:  # the unpruned checkpoint it came from is an input too (the teacher): never written over
        check_not_input(args.out, implied, flag="--out")
    distill = not args.no_distill and has_output_distill(adapter)
    if not args.no_distill and not distill:
        if args.teacher:
            raise TrtQatError(f"model family '{adapter.family}' has no output distillation, so --teacher would not be "
                              "used; drop it (fine-tuning then uses the labels alone)")
        LOG.warning("model family '%s' has no output distillation: fine-tuning on the labels alone",
                    adapter.family)
    teacher = teacher_for(ckpt, args.teacher) if distill else None
    if teacher is not None and adapter_for_model(teacher).family != adapter.family:
        raise TrtQatError(f"the teacher is a {adapter_for_model(teacher).family} model and the student a "
                          f"{adapter.family} one; give the unpruned checkpoint of this model as --teacher")
    min_channels = args.min_channels or (ckpt.get("sparsity_2_4") or {}).get("min_channels") or DEFAULT_MIN_CHANNELS
    with output_lock(args.out, is_dir=False):
        result = finetune_fp32(model, adapter, args.data, epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                               imgsz=args.imgsz, batch_size=args.batch_size, max_steps=args.max_steps,
                               teacher_model=teacher, distill_weight=args.distill_weight,
                               min_channels=min_channels, max_val_images=args.max_images, seed=args.seed,
                               workers=args.workers)
        extra = {k: ckpt[k] for k in ("pruned_from", "prune", "sparsity_2_4", "train_args") if k in ckpt}
        adapter.save(model, args.out, map50=result["map50"], map50_95=result["map50_95"], imgsz=args.imgsz, **extra,
                     finetune={"epochs": args.epochs, "best_epoch": result["best_epoch"], "distilled": bool(teacher)})
    print(f"fine-tuned {args.epochs} epochs{' with distillation' if teacher else ''}: best val mAP50 "
          f"{result['map50']:.4f}, mAP50-95 {result['map50_95']:.4f} at epoch {result['best_epoch']} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
