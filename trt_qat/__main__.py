"""`python -m trt_qat <stage>` / `trt-qat <stage>`: dispatch to each stage's ``main(argv)``."""
from __future__ import annotations

import importlib
import sys

#: subcommand -> (module, one-line help)
COMMANDS = {
    "run": ("trt_qat.cli.run", "run the whole pipeline from a YAML config (FP32 -> PTQ -> QAT -> ONNX -> report)"),
    "make-data": ("trt_qat.cli.make_data", "generate the digits-det demo dataset (YOLO format)"),
    "train": ("trt_qat.cli.train", "train a detector from scratch in FP32 (built-in, or an Ultralytics yaml)"),
    "quantize": ("trt_qat.cli.calibrate", "alias of calibrate: instrument + calibrate an FP32 checkpoint"),
    "calibrate": ("trt_qat.cli.calibrate", "instrument an FP32 checkpoint and calibrate it (PTQ)"),
    "qat": ("trt_qat.cli.qat", "quantization-aware fine-tuning of a calibrated checkpoint"),
    "prune": ("trt_qat.cli.prune", "structured channel pruning of an FP32 checkpoint (Torch-Pruning)"),
    "finetune-pruned": ("trt_qat.cli.finetune_pruned", "fine-tune a pruned or 2:4 checkpoint (distils from the "
                        "unpruned one)"),
    "sparsify": ("trt_qat.cli.sparsify", "2:4 sparsity on the large convs, optionally fine-tuned with the masks"),
    "export": ("trt_qat.cli.export", "export a checkpoint to ONNX (Q/DQ for quantized models)"),
    "eval": ("trt_qat.cli.eval", "COCO mAP of a checkpoint or ONNX (PyTorch or ONNX Runtime)"),
    "lint": ("trt_qat.cli.lint", "check Q/DQ placement of any ONNX for TensorRT"),
    "sensitivity": ("trt_qat.cli.sensitivity", "per-layer quantization sensitivity"),
    "build": ("trt_qat.cli.build", "build a TensorRT engine from ONNX"),
    "bench": ("trt_qat.cli.bench", "trtexec-style latency benchmark (TensorRT or ONNX Runtime)"),
    "compare": ("trt_qat.cli.compare", "compare outputs of PyTorch / ONNX Runtime / TensorRT"),
    "report": ("trt_qat.cli.report", "merge eval/bench JSON into md/json/html reports"),
}


def _usage() -> str:
    lines = ["usage: trt-qat <command> [options]   (python -m trt_qat <command> ...)", "", "commands:"]
    lines += [f"  {name:<16} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`trt-qat <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from trt_qat import __version__

        print(__version__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"trt_qat: error: unknown command '{cmd}'; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
