"""Training-step time and peak memory of the built-in detector: FP32 vs fake-quant (QAT).

Variants, all on ``yolo-n`` with the YOLO loss, SGD, synthetic images and targets, BatchNorm frozen as in
:func:`trt_qat.finetune`:

* ``fp32``: the float model;
* ``pq-default``: the same model quantized by trt_qat, but every quantizer runs pytorch-quantization's default
  fake-quant (``TrtQuantizer.native = False``: ``fake_tensor_quant``, narrow range, Python autograd Function);
* ``torch-fq``: trt_qat's quantizers computing with torch's own fake-quant ops
  (``trt_qat.quant.fake_quant.FAST_CPU_FAKE_QUANT = False``: ``fake_quantize_per_tensor/channel_affine``; same numbers);
* ``trt_qat``: trt_qat's path (ONNX/TensorRT semantics; on the CPU the same numbers from faster kernels);
* with ``--breakdown`` also ``trt_qat-weights`` (only the weight quantizers on) and ``trt_qat-acts`` (only the
  activation quantizers on), which split trt_qat's overhead between weights and activations.

Step times are medians of ``--steps`` steps after ``--warmup`` steps; the variants are interleaved step by step
in one process (each round runs them in a rotated order), so that drift of the machine hits them alike. The
table also shows the fastest step (least disturbed by other processes) and the median process CPU time of a step
(all threads; less sensitive to other processes on a shared machine than wall time).

Peak RSS: resident memory cannot be attributed per variant inside one process (the high-water mark only grows
and the allocator keeps freed pages), so each variant is also run alone in a fresh subprocess
(``--only VARIANT``). That child reports its RSS after building the model (``rss_base``), and its peak RSS
(``VmHWM`` on Linux, else ``getrusage().ru_maxrss``) after a few training steps. ``step_mem`` = peak - base is
the memory that training steps add (activations saved for backward, gradients, optimizer state). ``--no-rss``
skips this.

Usage::

    python benchmarks/bench_qat_step.py                      # CPU, 2 threads
    python benchmarks/bench_qat_step.py --device cuda --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("fp32", "pq-default", "torch-fq", "trt_qat")
#: ``--breakdown``: trt_qat's path with only the weight quantizers on, and with only the activation quantizers on
BREAKDOWN = ("trt_qat-weights", "trt_qat-acts")


def synthetic_batch(batch: int = 16, imgsz: int = 128, nc: int = 10, objects: int = 4, seed: int = 0):
    """A detection batch ``(imgs [B,3,S,S], targets [N,6], metas)`` with ``objects`` boxes per image."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(batch, 3, imgsz, imgsz, generator=g)
    n = batch * objects
    idx = torch.arange(batch).repeat_interleave(objects).float()
    cls = torch.randint(0, nc, (n,), generator=g).float()
    wh = 0.1 + 0.3 * torch.rand(n, 2, generator=g)
    cxy = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=g)
    targets = torch.cat([idx[:, None], cls[:, None], cxy, wh], 1)
    return imgs, targets, [{} for _ in range(batch)]


def build_variant(name: str, device: str, imgsz: int = 128, seed: int = 0, channels_last: bool = False):
    """The detector for ``name`` on ``device``; quantized variants are calibrated with percentile 99.99 (the
    default) on two random batches, so that some values clip during the timed steps, as in real QAT."""
    from trt_qat.calibration.calibrate import calibrate
    from trt_qat.config import QuantConfig
    from trt_qat.models.yolo import build_model
    from trt_qat.quant.instrument import quantize
    from trt_qat.quant.quantizer import iter_quantizers

    torch.manual_seed(seed)
    model = build_model("yolo-n")
    if name != "fp32":
        quantize(model, QuantConfig())
        calib = [synthetic_batch(4, imgsz, seed=s)[0] for s in (1, 2)]
        calibrate(model, calib, method="percentile", progress=False)
        for _, q in iter_quantizers(model):
            q.native = name != "pq-default"
            if (name == "trt_qat-weights" and q.role != "weight") or (name == "trt_qat-acts" and q.role == "weight"):
                q.disable()
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


class Trainer:
    """One variant's model, loss, optimizer and a ``step()`` that returns its wall time in seconds."""

    def __init__(self, name, device, batch, imgsz, channels_last=False):
        from trt_qat.models.adapter import get_adapter
        from trt_qat.train.loop import FreezeBatchNorm, LoopState

        self.name, self.device = name, torch.device(device)
        self.fast = name != "torch-fq"
        self.model = build_variant(name, device, imgsz, channels_last=channels_last)
        self.model.train()
        self.loss_fn = get_adapter("builtin").loss_fn(self.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        FreezeBatchNorm().on_epoch_start(LoopState(self.model, self.opt, epochs=1, steps_per_epoch=1))
        imgs, targets, metas = synthetic_batch(batch, imgsz)
        imgs = imgs.to(self.device)
        if channels_last:
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        self.batch = (imgs, targets.to(self.device), metas)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> tuple:
        """One training step; returns ``(wall seconds, process CPU seconds)``."""
        from trt_qat.quant import fake_quant as amax

        amax.FAST_CPU_FAKE_QUANT = self.fast
        self._sync()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = self.loss_fn(self.model, self.batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self._sync()
        return time.perf_counter() - t0, time.process_time() - c0


def current_rss_mib() -> float:
    """Current resident set size of this process in MiB (psutil when installed, else /proc/self/statm)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB.

    Linux: ``VmHWM`` from /proc/self/status. ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used there because Linux
    carries the parent's high-water mark across fork+exec, so a small child would report its parent's peak.
    Elsewhere: ``ru_maxrss`` (bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def measure_rss(name, args) -> dict:
    """Run ``name`` alone in a fresh interpreter and return its ``{"rss_base", "rss_peak"}`` in MiB."""
    cmd = [sys.executable, os.path.abspath(__file__), "--only", name, "--device", args.device,
           "--threads", str(args.threads), "--batch", str(args.batch), "--imgsz", str(args.imgsz),
           "--steps", str(args.rss_steps)]
    if args.channels_last:
        cmd.append("--channels-last")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _only(args):
    """Child mode: build one variant, record RSS, run a few steps, print one JSON line."""
    trainer = Trainer(args.only, args.device, args.batch, args.imgsz, args.channels_last)
    base = current_rss_mib()
    for _ in range(args.steps):
        trainer.step()
    result = {"rss_base": base, "rss_peak": peak_rss_mib()}
    if args.device.startswith("cuda"):
        result["cuda_peak"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


def run(args) -> list:
    """Time every variant interleaved; returns one dict per variant."""
    trainers = [Trainer(v, args.device, args.batch, args.imgsz, args.channels_last) for v in args.variants]
    wall = {t.name: [] for t in trainers}
    cpu = {t.name: [] for t in trainers}
    for _ in range(args.warmup):
        for t in trainers:
            t.step()
    for i in range(args.steps):
        k = i % len(trainers)
        for t in trainers[k:] + trainers[:k]:
            w, c = t.step()
            wall[t.name].append(w)
            cpu[t.name].append(c)
    rows = []
    base = statistics.median(wall["fp32"]) if "fp32" in wall else None
    cbase = statistics.median(cpu["fp32"]) if "fp32" in cpu else None
    for t in trainers:
        med, cmed = statistics.median(wall[t.name]), statistics.median(cpu[t.name])
        row = {"variant": t.name, "median_ms": med * 1e3, "min_ms": min(wall[t.name]) * 1e3,
               "ratio_to_fp32": med / base if base else None,
               "min_ratio_to_fp32": min(wall[t.name]) / min(wall["fp32"]) if base else None,
               "cpu_median_ms": cmed * 1e3, "cpu_ratio_to_fp32": cmed / cbase if cbase else None,
               "steps": len(wall[t.name])}
        rows.append(row)
    if args.rss:
        del trainers
        for row in rows:
            row.update(measure_rss(row["variant"], args))
            row["step_mem"] = row["rss_peak"] - row["rss_base"]
        fp = next((r for r in rows if r["variant"] == "fp32"), None)
        for row in rows:
            if fp:
                row["rss_peak_ratio"] = row["rss_peak"] / fp["rss_peak"]
                row["step_mem_ratio"] = row["step_mem"] / fp["step_mem"] if fp["step_mem"] > 0 else None
    return rows


def table(rows, args) -> str:
    head = (f"QAT training step, yolo-n, batch {args.batch}, {args.imgsz}x{args.imgsz}, device {args.device}"
            + (f", {args.threads} threads" if args.device == "cpu" else "")
            + (", channels_last" if args.channels_last else "") + f", median of {args.steps} steps")
    lines = [head, f"{'variant':<16} {'median ms':>10} {'x FP32':>7} {'min ms':>9} {'x FP32':>7} {'CPU ms':>9} "
             f"{'x FP32':>7}"
             + (f" {'peak RSS MiB':>13} {'x FP32':>7} {'step mem MiB':>13} {'x FP32':>7}" if args.rss else "")]

    def fmt(v):
        return f"{v:.2f}" if v else "-"

    for r in rows:
        line = (f"{r['variant']:<16} {r['median_ms']:>10.1f} {fmt(r['ratio_to_fp32']):>7} {r['min_ms']:>9.1f} "
                f"{fmt(r['min_ratio_to_fp32']):>7} {r['cpu_median_ms']:>9.1f} {fmt(r['cpu_ratio_to_fp32']):>7}")
        if args.rss:
            smr = f"{r['step_mem_ratio']:.2f}" if r.get("step_mem_ratio") else "-"
            line += (f" {r['rss_peak']:>13.0f} {r.get('rss_peak_ratio', 0):>7.2f} {r['step_mem']:>13.0f} "
                     f"{smr:>7}")
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]. Default cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads. Default 2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant. Default 20")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + BREAKDOWN)
    parser.add_argument("--breakdown", action="store_true",
                        help=f"also time {' and '.join(BREAKDOWN)}: where trt_qat's overhead goes")
    parser.add_argument("--channels-last", action="store_true", help="run every variant in channels_last")
    parser.add_argument("--no-rss", dest="rss", action="store_false", help="skip the per-variant RSS subprocesses")
    parser.add_argument("--rss-steps", type=int, default=3, help="training steps in each RSS subprocess")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--only", default=None, choices=VARIANTS + BREAKDOWN, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.breakdown:
        args.variants += [v for v in BREAKDOWN if v not in args.variants]
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda given but no CUDA GPU is available")
    from trt_qat.quant.quantizer import quiet_absl

    quiet_absl()
    if args.only:
        _only(args)
        return 0
    rows = run(args)
    meta = {"torch": torch.__version__, "device": args.device, "threads": args.threads, "batch": args.batch,
            "imgsz": args.imgsz, "steps": args.steps, "channels_last": args.channels_last,
            "machine": platform.processor() or platform.machine()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
