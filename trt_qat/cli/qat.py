"""`trt-qat qat`: the command line over :mod:`trt_qat.train.qat`."""
from __future__ import annotations

from pathlib import Path

import torch

from trt_qat.cli.args import ArgumentParser, cli_main
from trt_qat.config import QATConfig, check_device
from trt_qat.train.qat import finetune


@cli_main
def main(argv=None):
    from trt_qat.cli.args import add_data_args, learning_rate, make_dataset, non_negative_int, positive_int

    parser = ArgumentParser(prog="trt-qat qat", description="Quantization-aware fine-tuning of a "
                                     "calibrated checkpoint (scales frozen by default). Resumes from --out/last.pt.")
    parser.add_argument("--checkpoint", required=True, help="calibrated checkpoint (trt-qat calibrate output)")
    add_data_args(parser, default_split="train")
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
    args = parser.parse_args(argv)

    from trt_qat import dist as dist_util
    from trt_qat.data.dataset import build_dataloader
    from trt_qat.fileio import check_not_input, output_lock
    from trt_qat.measure.evaluate import evaluate
    from trt_qat.models.adapter import adapter_for_model
    from trt_qat.quant.checkpoint import load_quantized
    from trt_qat.runners.torch_runner import TorchRunner
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
        # resume only a run of this very model, data and settings (--out is often reused between runs)
        fingerprint = run_fingerprint({k: v for k, v in vars(args).items()
                                       if k not in ("checkpoint", "out", "no_resume", "device")}, model)
        if device is not None:
            model.to(device)
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
        result = finetune(model, loader, adapter.loss_fn(model), config=cfg, checkpoint_dir=out,
                          resume=not args.no_resume, fingerprint=fingerprint,
                          eval_fn=lambda m: evaluate(TorchRunner(m), val, batch_size=args.batch_size,
                                                     adapter=adapter)["map50_95"])
        if rank == 0:
            print(f"QAT done: best mAP50-95 {result['best_score']:.4f} at epoch {result['best_epoch']} -> "
                  f"{out / 'best.pt'}" + (f" ({world} processes)" if world > 1 else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
