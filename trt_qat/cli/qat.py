"""`trt-qat qat`: the command line over :mod:`trt_qat.train.qat`."""
from __future__ import annotations

from pathlib import Path

import torch

from trt_qat.cli.args import ArgumentParser, cli_main
from trt_qat.config import DISTILL_MODES, QATConfig, check_device
from trt_qat.errors import TrtQatError
from trt_qat.train.qat import finetune


@cli_main
def main(argv=None):
    from trt_qat.cli.args import (
        add_data_args,
        learning_rate,
        make_dataset,
        non_negative_float,
        non_negative_int,
        positive_int,
        resolve_imgsz,
    )

    parser = ArgumentParser(prog="trt-qat qat", description="Quantization-aware fine-tuning of a "
                                     "calibrated checkpoint (scales frozen by default). Resumes from --out/last.pt.")
    parser.add_argument("--checkpoint", required=True, help="calibrated checkpoint (trt-qat calibrate output)")
    add_data_args(parser, default_split="train", required=False)
    parser.add_argument("--epochs", type=positive_int, default=2)
    parser.add_argument("--lr", type=learning_rate, default=1e-4)
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    parser.add_argument("--max-steps", type=positive_int, default=None, help="cap on steps per epoch")
    parser.add_argument("--no-freeze-amax", action="store_true")
    parser.add_argument("--out", default="runs/qat", help="checkpoint directory (last.pt, best.pt)")
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the data order (and of everything else random); same seed, same run. Default 0")
    distill = parser.add_argument_group("distillation (the FP32 model teaches its quantized copy)")
    distill.add_argument("--distill", choices=DISTILL_MODES, default=None,
                         help="feature: MSE of every top-level block; output: the head outputs; both")
    distill.add_argument("--distill-weight", type=non_negative_float, default=1.0,
                         help="weight of the distillation term next to the detection loss. Default 1")
    distill.add_argument("--distill-blocks", nargs="+", default=None, metavar="MODULE",
                         help="module names for the feature loss (default: every top-level block)")
    distill.add_argument("--teacher", default=None,
                         help="FP32 checkpoint of the teacher (default: the --checkpoint's own FP32 weights)")
    distill.add_argument("--images", default=None, metavar="DIR",
                         help="label-free QAT on these bare images (a folder or .txt list; no label is read); the "
                              "best epoch is the lowest distillation loss on held-out images. Needs --distill")
    args = parser.parse_args(argv)
    if args.images and not args.distill:
        raise TrtQatError("--images (label-free QAT) needs --distill feature|output|both; the images have no labels "
                          "to learn from otherwise")
    if not args.images and not args.data:
        raise TrtQatError("give --data data.yaml (QAT with labels) or --distill feature --images DIR (label-free)")

    from trt_qat import dist as dist_util
    from trt_qat.config import DistillConfig
    from trt_qat.data.dataset import build_dataloader
    from trt_qat.data.yolo import ImageFolder
    from trt_qat.fileio import check_not_input, output_lock
    from trt_qat.measure.evaluate import evaluate
    from trt_qat.models.adapter import adapter_for_model, load_fp32
    from trt_qat.prune.sparsity import sparsity_hook
    from trt_qat.quant.checkpoint import load_quantized
    from trt_qat.runners.torch_runner import TorchRunner
    from trt_qat.train.distill import held_out_distill_score, make_distill, split_held_out
    from trt_qat.train.loop import run_fingerprint

    # torchrun --nproc_per_node N -m trt_qat qat ...: one process per GPU (NCCL) or per CPU worker (gloo);
    # --batch-size is per process
    check_device(args.device)  # a bad --device is one line, before anything is written
    out = Path(args.out)
    for name in ("best.pt", "last.pt"):
        check_not_input(out / name, args.checkpoint, flag="--out")
    with output_lock(out), dist_util.torchrun_session(args.device) as (rank, world, device):
        model, _ = load_quantized(args.checkpoint)
        adapter = adapter_for_model(model)
        resolve_imgsz(args, model, adapter=adapter)
        # resume only a run of this very model, data and settings (--out is often reused between runs)
        fingerprint = run_fingerprint({k: v for k, v in vars(args).items()
                                       if k not in ("checkpoint", "out", "no_resume", "device")}, model)
        if device is not None:
            model.to(device)
        if args.images:  # label-free: bare images, part held out to score the epochs
            train, val = split_held_out(ImageFolder(args.images, imgsz=args.imgsz, max_images=args.max_images))
        else:
            train = make_dataset(args, split=args.split, augment=False, adapter=adapter)
            adapter.check_dataset(model, train, f"--data {args.data}")
            val = make_dataset(args, split="val", adapter=adapter) if rank == 0 else None
        sampler = None
        if world > 1:
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        else:  # its own generator: the order depends on the seed alone (saved in last.pt, so a resumed run
            # continues the same order)
            sampler = torch.utils.data.RandomSampler(train, generator=torch.Generator().manual_seed(args.seed))
        torch.manual_seed(args.seed)
        loader = build_dataloader(train, batch_size=args.batch_size, sampler=sampler)
        cfg = QATConfig(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                        max_steps_per_epoch=args.max_steps, freeze_amax=not args.no_freeze_amax,
                        device=str(device) if device is not None else None)
        loss_fn, teacher, score = adapter.loss_fn(model), None, "mAP50-95"
        eval_fn = lambda m: evaluate(TorchRunner(m), val, batch_size=args.batch_size,  # noqa: E731
                                     adapter=adapter)["map50_95"]
        if args.distill:
            teacher_model = load_fp32(args.teacher)[0] if args.teacher else None
            loss_fn, teacher = make_distill(model, adapter, DistillConfig(args.distill, args.distill_weight,
                                                                          args.distill_blocks),
                                            labels=not args.images, teacher_model=teacher_model)
            if args.images:
                held = build_dataloader(val, batch_size=args.batch_size)
                eval_fn = lambda m: held_out_distill_score(m, loss_fn, teacher, held)  # noqa: E731
                score = "held-out distillation loss"
        # a 2:4-sparse checkpoint (trt-qat sparsify) stays 2:4: every conv whose weights hold the pattern keeps it
        masks = sparsity_hook(model, min_channels=1)
        result = finetune(model, loader, loss_fn, config=cfg, checkpoint_dir=out, resume=not args.no_resume,
                          fingerprint=fingerprint, eval_fn=eval_fn, teacher=teacher,
                          higher_is_better=not args.images, extra_hooks=[masks] if masks else ())
        if rank == 0:
            print(f"QAT done: best {score} {result['best_score']:.4g} at epoch {result['best_epoch']} -> "
                  f"{out / 'best.pt'}" + (f" ({world} processes)" if world > 1 else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
