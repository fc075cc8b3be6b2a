"""`trt-qat calibrate`: the command line over :mod:`trt_qat.calibration.calibrate`."""
from __future__ import annotations

from pathlib import Path

import torch

from trt_qat.calibration.calibrate import calibrate, save_amax
from trt_qat.cli.args import ArgumentParser, cli_main
from trt_qat.config import CALIB_METHODS
from trt_qat.errors import TrtQatError
from trt_qat.quant.quantizer import iter_quantizers


@cli_main
def main(argv=None):
    from trt_qat.cli.args import add_data_args, add_model_args, load_fp32_model, make_dataset, regex, resolve_imgsz

    parser = ArgumentParser(prog="trt-qat calibrate", description="Quantize an FP32 checkpoint and calibrate "
                                     "it (PTQ). Writes a quantized checkpoint and calib/<run>/amax.pt.")
    add_model_args(parser)
    add_data_args(parser, default_split="calib")
    parser.add_argument("--method", default="percentile", choices=CALIB_METHODS)
    parser.add_argument("--percentile", type=float, default=99.99)
    parser.add_argument("--num-batches", type=int, default=None)
    parser.add_argument("--skip", nargs="*", type=regex, default=[], help="regexes of module names to keep in float")
    parser.add_argument("--no-rules", action="store_true", help="do not apply the TensorRT placement rules")
    parser.add_argument("--out", default="calib/run", help="output directory (quantized.pt and amax.pt)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    from trt_qat import dist as dist_util
    from trt_qat.config import QuantConfig, check_device
    from trt_qat.data.dataset import build_dataloader
    from trt_qat.fileio import check_not_input, output_lock, write_unit
    from trt_qat.quant.checkpoint import save_quantized
    from trt_qat.quant.instrument import quantize

    # torchrun --nproc_per_node N -m trt_qat calibrate ...: rank r calibrates images r, r+N, r+2N, ... (no padding,
    # no duplicates) and the statistics are reduced across ranks, so every rank ends with the amax of all the
    # images; --batch-size and --num-batches are per process, and only rank 0 writes
    check_device(args.device)  # a bad --device is one line, before anything is written
    out = Path(args.out)
    for name in ("quantized.pt", "amax.pt"):
        check_not_input(out / name, args.checkpoint, flag="--out")
    with output_lock(out), dist_util.torchrun_session(args.device) as (rank, world, device):
        model, adapter = load_fp32_model(args)
        model.trt_qat_imgsz = resolve_imgsz(args, model, adapter=adapter)  # (recorded in quantized.pt)
        dataset = make_dataset(args, split=args.split, adapter=adapter)
        adapter.check_dataset(model, dataset, f"--data {args.data}")
        if world > 1:
            if len(dataset) < world:  # an empty shard would skip the collectives the other ranks make
                raise TrtQatError(f"{len(dataset)} calibration images for {world} processes; give every process at "
                                  "least one image (fewer processes, or more images)")
            dataset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
        loader = build_dataloader(dataset, batch_size=args.batch_size)
        # the layers the model family keeps in float on purpose (Ultralytics' DFL conv) stay in float
        qcfg = QuantConfig(skip=[*args.skip, *adapter.float_skip_patterns(model)], rules=not args.no_rules)
        quantize(model, qcfg, sample_input=adapter.sample_input(args.imgsz))
        if device is not None:
            model.to(device)
        calibrate(model, loader, method=args.method, percentile=args.percentile, num_batches=args.num_batches,
                  device=device, progress=rank == 0)
        if rank == 0:
            model.cpu()
            # one unit: a run killed between the two files never leaves a new quantized.pt beside an old amax.pt
            write_unit(out, {"quantized.pt": lambda p: save_quantized(model, p, extra={"calib_method": args.method}),
                             "amax.pt": lambda p: save_amax(model, p)})
            n = sum(1 for _ in iter_quantizers(model))
            print(f"calibrated {n} quantizers with {args.method} -> {out / 'quantized.pt'}"
                  + (f" ({world} processes)" if world > 1 else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
