"""`trt-qat make-data`: the command line over :mod:`trt_qat.data.digits_det`."""
from __future__ import annotations

import time

from trt_qat.cli.args import ArgumentParser, cli_main, non_negative_int
from trt_qat.data.digits_det import count_boxes, generate_digits_det


@cli_main
def main(argv=None):
    """``trt-qat make-data``: generate the digits-det demo dataset and print one summary line."""
    parser = ArgumentParser(prog="trt-qat make-data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="datasets/digits-det", help="output directory (default: %(default)s)")
    parser.add_argument("--n-train", type=int, default=1500, help="training images (default: %(default)s)")
    parser.add_argument("--n-val", type=int, default=300, help="validation images (default: %(default)s)")
    parser.add_argument("--n-calib", type=int, default=128, help="calibration images (default: %(default)s)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--min-canvas", type=int, default=96, help="smallest image side (default: %(default)s)")
    parser.add_argument("--max-canvas", type=int, default=160, help="largest image side (default: %(default)s)")
    parser.add_argument("--max-digits", type=int, default=4, help="most digits per image (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="regenerate even if an identical set exists")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    data_yaml = generate_digits_det(args.out, n_train=args.n_train, n_val=args.n_val, n_calib=args.n_calib,
                                    seed=args.seed, min_canvas=args.min_canvas, max_canvas=args.max_canvas,
                                    max_digits=args.max_digits, force=args.force)
    root = data_yaml.parent
    parts = []
    for split in ("train", "val", "calib"):
        n_img = len(list((root / "images" / split).glob("*.png")))
        parts.append(f"{split} {n_img} images / {count_boxes(root / 'labels' / split)} boxes")
    print(f"digits-det: {', '.join(parts)} -> {data_yaml} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
