"""`trt-qat prune`: the command line over :func:`trt_qat.prune.prune` (and network slimming's BN-sparsity phase)."""
from __future__ import annotations

import argparse
from pathlib import Path

from trt_qat.cli.args import (
    ArgumentParser,
    add_data_args,
    add_model_args,
    cli_main,
    learning_rate,
    load_fp32_model,
    make_dataset,
    non_negative_int,
    positive_float,
    positive_int,
    regex,
    resolve_imgsz,
)
from trt_qat.errors import TrtQatError
from trt_qat.fileio import check_not_input, check_writable_file, output_lock


def _build_parser() -> argparse.ArgumentParser:
    from trt_qat.prune.core import IMPORTANCES

    p = ArgumentParser(prog="trt-qat prune", description="Structured channel pruning (Torch-Pruning): whole channels "
                       "removed with their dependencies, channel counts multiples of --round-to, the detection "
                       "head's outputs and --keep layers whole. The output checkpoint carries its own architecture.")
    add_model_args(p)
    data = add_data_args(p, default_split="train", required=False)
    data.description = "--data is needed only for --bn-sparsity-train; --imgsz sizes the tracing input"
    p.add_argument("--target-macs", type=float, default=None, metavar="FRACTION",
                   help="keep at most this fraction of the model's MACs, in (0, 1] (e.g. 0.6)")
    p.add_argument("--target-params", type=float, default=None, metavar="FRACTION",
                   help="keep at most this fraction of its parameters, in (0, 1]")
    p.add_argument("--importance", default="magnitude", choices=IMPORTANCES,
                   help="channel ranking: weight magnitude or BatchNorm scale (default: %(default)s)")
    p.add_argument("--bn-sparsity-train", action="store_true",
                   help="first train with L1 on BatchNorm gammas (network slimming; needs --data; implies "
                        "--importance bn_scale)")
    p.add_argument("--bn-epochs", type=positive_int, default=1, help="BN-sparsity epochs (default: %(default)s)")
    p.add_argument("--bn-strength", type=positive_float, default=1e-3, help="L1 weight (default: %(default)s)")
    p.add_argument("--bn-lr", type=learning_rate, default=0.01, help="BN-sparsity learning rate (default: %(default)s)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="cap on BN-sparsity steps per epoch")
    p.add_argument("--keep", nargs="+", type=regex, default=[], metavar="REGEX",
                   help="layer-name regexes left whole (each must match a conv or linear)")
    p.add_argument("--round-to", type=positive_int, default=8,
                   help="channel multiple: 8 suits INT8 kernels, 16 also runs faster in ONNX Runtime on CPU "
                        "(default: %(default)s)")
    p.add_argument("--max-layer-ratio", type=float, default=0.9,
                   help="at most this fraction of any layer's channels is removed (default: %(default)s)")
    p.add_argument("--workers", type=non_negative_int, default=0, help="data-loader workers (default: %(default)s)")
    p.add_argument("--out", required=True, help="the pruned FP32 checkpoint")
    return p


@cli_main
def main(argv=None):
    args = _build_parser().parse_args(argv)
    from trt_qat.prune.core import check_target, prune, require_torch_pruning

    require_torch_pruning()
    check_target(args.target_macs, "--target-macs")
    check_target(args.target_params, "--target-params")
    if args.target_macs is None and args.target_params is None:
        raise TrtQatError("no pruning target; give --target-macs and/or --target-params (fractions in (0, 1])")
    if not 0 < args.max_layer_ratio < 1:
        raise TrtQatError(f"--max-layer-ratio {args.max_layer_ratio:g} must be in (0, 1)")
    if args.bn_sparsity_train and not args.data:
        raise TrtQatError("--bn-sparsity-train trains on --data; pass the data.yaml the model was trained on")
    check_not_input(args.out, args.checkpoint, *([args.data] if args.data else []), flag="--out")
    check_writable_file(args.out)
    model, adapter = load_fp32_model(args)
    resolve_imgsz(args, model, adapter=adapter)  # --imgsz, else the size the checkpoint was trained at
    importance = "bn_scale" if args.bn_sparsity_train else args.importance
    with output_lock(args.out, is_dir=False):
        slim = None
        if args.bn_sparsity_train:
            from trt_qat.data.dataset import build_dataloader
            from trt_qat.prune.core import match_keep
            from trt_qat.prune.slimming import bn_sparsity_train

            match_keep(model, args.keep)  # a bad --keep is refused before the training, not after
            ds = make_dataset(args, "train", augment=True, adapter=adapter)
            adapter.check_dataset(model, ds, "--data")
            loader = build_dataloader(ds, batch_size=args.batch_size, shuffle=True, workers=args.workers)
            slim = bn_sparsity_train(model, adapter, loader, epochs=args.bn_epochs, lr=args.bn_lr,
                                     strength=args.bn_strength, max_steps=args.max_steps)["gammas"]
        report = prune(model, adapter.sample_input(args.imgsz), target_macs=args.target_macs,
                       target_params=args.target_params, importance=importance, keep=args.keep,
                       round_to=args.round_to, max_layer_ratio=args.max_layer_ratio)
        info = {k: v for k, v in report.items() if k != "pruned_layers"}
        info.update(bn_sparsity=slim, keep=list(args.keep), imgsz=args.imgsz)
        adapter.save(model, args.out, pruned_from=str(Path(args.checkpoint).resolve()), prune=info,
                     imgsz=args.imgsz)
    m0, m1 = report["macs"]
    p0, p1 = report["params"]
    print(f"pruned {len(report['pruned_layers'])} layers ({importance}, multiples of {args.round_to}): "
          f"{m1 / m0:.0%} of the MACs ({m0 / 1e9:.3f} -> {m1 / 1e9:.3f} GMACs at {args.imgsz}px), {p1 / p0:.0%} of the "
          f"parameters ({p0 / 1e6:.2f}M -> {p1 / 1e6:.2f}M), {len(report['kept'])} layers kept whole -> {args.out}; "
          f"fine-tune it with `trt-qat finetune-pruned --checkpoint {args.out} --data D`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
