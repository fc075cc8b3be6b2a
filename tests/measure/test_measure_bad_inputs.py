"""Hostile inputs to `trt-qat bench`, `compare` and `eval`: each is one line on stderr, exit code 2, no traceback,
no output file written and no input changed; and the JSON they write is strict (no NaN / Infinity)."""
from __future__ import annotations

import contextlib
import io
import json
import signal
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import pytest
from fixtures_cli import one_line_error
from fixtures_onnx import make_qdq_convnet
from onnx import TensorProto, helper

from trt_qat.__main__ import main
from trt_qat.cli import bench as bench_cli
from trt_qat.cli import compare as compare_cli
from trt_qat.errors import TrtQatError
from trt_qat.fileio import json_safe
from trt_qat.measure import benchmark as bm
from trt_qat.measure.compare import compare_runners, load_npz_feed
from trt_qat.runners.base import BaseRunner, check_inputs
from trt_qat.runners.onnxrt import OnnxrtRunner

FAST = ["--warmUp", "1", "--duration", "0.01", "--iterations", "2"]


# --- helpers ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def deadline(seconds: float = 60):
    """Fail (instead of hanging the suite) when the body runs longer than ``seconds``."""
    def expired(signum, frame):
        raise AssertionError(f"still running after {seconds} s: the check did not fire before the benchmark")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def strict_json(path):
    """Parse ``path`` refusing NaN / Infinity, as strict JSON readers do."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


def identity_onnx(path, elem_type, shape, n_inputs=1):
    """A model that is not a detector: Identity (or Add of two inputs) on ``shape`` tensors of ``elem_type``."""
    names = ["x", "z"][:n_inputs]
    node = helper.make_node("Identity" if n_inputs == 1 else "Add", names, ["y"])
    graph = helper.make_graph([node], "not_a_detector", [helper.make_tensor_value_info(n, elem_type, shape)
                                                         for n in names],
                              [helper.make_tensor_value_info("y", elem_type, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


class NeverRun(BaseRunner):
    """A runner that fails the test if it is activated or run."""

    backend = "never"

    def input_names_impl(self):
        return ["x"]

    def activate_impl(self):
        raise AssertionError("the runner was activated: the check came too late")

    def infer_impl(self, feed):
        raise AssertionError("the runner was run: the check came too late")


@pytest.fixture
def no_benchmark(monkeypatch):
    """The CLI's benchmark() fails the test: a check that must fire before benchmarking did not."""
    def fail(*args, **kwargs):
        raise AssertionError("benchmark() ran: the check came too late")

    monkeypatch.setattr(bench_cli, "benchmark", fail)


# --- bench: timings that never end ------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, msg", [
    ("--duration", "inf", "not a finite number"),
    ("--duration", "nan", "not a finite number"),
    ("--duration", "-1", "must be >= 0"),
    ("--duration", "1e9", "one day"),
    ("--duration", "1e308", "one day"),
    ("--warmUp", "inf", "not a finite number"),
    ("--warmUp", "-inf", "not a finite number"),
    ("--warmUp", "NaN", "not a finite number"),
    ("--warmUp", "-5", "must be >= 0"),
    ("--warmUp", "1e300", "one day"),
    ("--iterations", "0", "must be >= 1"),
    ("--iterations", "1.5", "not an integer"),
])
def test_bench_timings_that_never_end_are_one_line(qdq_onnx, tmp_path, capsys, flag, value, msg):
    out = tmp_path / "out" / "bench.json"
    with deadline(60):
        line = one_line_error(capsys, ["bench", "--onnx", str(qdq_onnx), *FAST, f"{flag}={value}",
                                       "--exportJson", str(out)], tmp_path)
    assert flag in line and msg in line, line
    assert not out.exists() and not out.parent.exists()


@pytest.mark.parametrize("kwargs, msg", [
    ({"duration_s": float("inf")}, "--duration"),
    ({"duration_s": float("nan")}, "--duration"),
    ({"duration_s": -1.0}, "--duration"),
    ({"duration_s": 2 * bm.MAX_TIMING_S}, "--duration"),
    ({"warmup_ms": float("inf")}, "--warmUp"),
    ({"warmup_ms": float("nan")}, "--warmUp"),
    ({"warmup_ms": -1}, "--warmUp"),
    ({"iterations": 0}, "--iterations"),
    ({"iterations": 2.5}, "--iterations"),
    ({"duration_s": "3"}, "--duration"),
])
def test_benchmark_refuses_timings_before_activating_the_runner(kwargs, msg):
    with deadline(60), pytest.raises(TrtQatError, match=msg):
        bm.benchmark(NeverRun(), {"x": np.zeros(1, np.float32)}, **kwargs)
    bm.check_timing(0, 0, 10 ** 30)  # a huge --iterations is a minimum, not an error


# --- bench / compare: feeds too large for memory, shapes the model does not take --------------------------------
@pytest.fixture
def big_onnx(tmp_path):
    """The small net with a 640x640 input and a dynamic batch."""
    return make_qdq_convnet(tmp_path / "big.onnx", size=640)


@pytest.mark.parametrize("extra", [["--shapes", "images:100000x3x640x640"], ["--batch", "100000"],
                                   ["--shapes", "images:2048x3x640x640"]])
def test_bench_feed_over_the_memory_budget_is_one_line(big_onnx, tmp_path, capsys, no_benchmark, extra):
    line = one_line_error(capsys, ["bench", "--onnx", str(big_onnx), *FAST, *extra], tmp_path)
    assert "GiB" in line and "smaller batch or shape" in line, line


@pytest.mark.parametrize("shape", ["images:3x8", "images:2x3x9x9", "images:1x4x8x8"])
def test_bench_shapes_the_model_does_not_take_are_one_line(qdq_onnx, tmp_path, capsys, no_benchmark, shape):
    line = one_line_error(capsys, ["bench", "--onnx", str(qdq_onnx), *FAST, "--shapes", shape], tmp_path)
    assert "takes [batch, 3, 8, 8]" in line and "--shapes" in line, line


def test_compare_random_feeds_share_the_memory_budget(big_onnx, tmp_path, capsys):
    fp32 = make_qdq_convnet(tmp_path / "big_fp32.onnx", size=640, qdq=False)
    line = one_line_error(capsys, ["compare", "--onnx", str(big_onnx), "--onnx", str(fp32), "--batch", "600",
                                   "--num-inputs", "4"], tmp_path)
    assert "4 random feeds" in line and "--num-inputs" in line, line


def test_make_feed_is_float32_drawn_reproducible_and_within_budget(qdq_onnx, monkeypatch):
    import tracemalloc

    with OnnxrtRunner(qdq_onnx) as runner:
        a = bm.make_feed(runner, shapes={"images": (64, 3, 8, 8)}, seed=3)["images"]
        b = bm.make_feed(runner, shapes={"images": (64, 3, 8, 8)}, seed=3)["images"]
        c = bm.make_feed(runner, shapes={"images": (64, 3, 8, 8)}, seed=4)["images"]
        assert a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, c)
        assert 0.9 < float(a.std()) < 1.1  # standard normal
        tracemalloc.start()
        try:
            feed = bm.make_feed(runner, shapes={"images": (512, 3, 8, 8)})
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1.5 * feed["images"].nbytes  # no float64 copy (twice the size) on the way
        monkeypatch.setattr(bm, "FEED_BYTES_CAP", 1000)
        with pytest.raises(TrtQatError, match="smaller batch or shape"):
            bm.make_feed(runner, batch=4)
    assert bm.feed_memory_budget() <= 1000


# --- compare: broken .npz inputs ---------------------------------------------------------------------------------
def _bomb_npz(path):
    """An .npz whose header declares a 458 GiB array (with 64 bytes of data)."""
    from numpy.lib import format as npy_format

    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (100000, 3, 640, 640)})
    buf.write(b"\0" * 64)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images.npy", buf.getvalue())


def _short_npz(path):
    """An .npz whose array has fewer bytes than its header declares."""
    from numpy.lib import format as npy_format

    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (1, 3, 8, 8)})
    buf.write(b"\0" * 16)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images.npy", buf.getvalue())


def _corrupt_compressed_npz(path):
    np.savez_compressed(path, images=np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float32))
    data = bytearray(Path(path).read_bytes())
    data[300:340] = b"\xff" * 40
    Path(path).write_bytes(bytes(data))


def _member_not_npy(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images.npy", b"garbage" * 10)


def _pickle(path):
    import pickle

    Path(path).write_bytes(pickle.dumps({"images": [1, 2, 3]}))


def _npy(path):
    with open(path, "wb") as f:
        np.save(f, np.zeros((1, 3, 8, 8), np.float32))


def _truncated_npz(path):
    np.savez(path, images=np.zeros((2, 3, 8, 8), np.float32))
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


NPZ_CASES = {
    "garbage": (lambda p: Path(p).write_bytes(b"PK\x03\x04garbage" * 10), "cannot read inputs"),
    "empty": (lambda p: Path(p).write_bytes(b""), "cannot read inputs"),
    "truncated": (_truncated_npz, "cannot read inputs"),
    "corrupt member": (_corrupt_compressed_npz, "corrupt"),
    "short member": (_short_npz, "corrupt"),
    "member not .npy": (_member_not_npy, "corrupt"),
    "pickle": (_pickle, "cannot read inputs"),
    "npy not npz": (_npy, "not an .npz"),
    "missing input": (lambda p: np.savez(p, other=np.zeros((1, 3, 8, 8), np.float32)), "lacks inputs ['images']"),
    "strings": (lambda p: np.savez(p, images=np.array(["a", "b"])), "non-numeric"),
    "objects": (lambda p: np.savez(p, images=np.array([{}], dtype=object)), "non-numeric"),
    "complex": (lambda p: np.savez(p, images=np.zeros((1, 3, 8, 8), np.complex64)), "non-numeric"),
    "over budget": (_bomb_npz, "GiB"),
    "wrong rank": (lambda p: np.savez(p, images=np.zeros((3, 8), np.float32)), "takes [batch, 3, 8, 8] float32"),
    "wrong size": (lambda p: np.savez(p, images=np.zeros((1, 3, 9, 9), np.float32)), "got [1, 3, 9, 9]"),
    "wrong dtype": (lambda p: np.savez(p, images=np.zeros((1, 3, 8, 8))), "float64"),
}


@pytest.mark.parametrize("case", sorted(NPZ_CASES))
def test_compare_broken_npz_inputs_are_one_line(qdq_onnx, fp32_onnx, tmp_path, capsys, case):
    make, msg = NPZ_CASES[case]
    npz = tmp_path / "inputs.npz"
    make(npz)
    out = tmp_path / "out" / "compare.json"
    line = one_line_error(capsys, ["compare", "--onnx", str(qdq_onnx), "--onnx", str(fp32_onnx),
                                   "--inputs", str(npz), "--exportJson", str(out)], tmp_path)
    assert msg in line, line
    assert not out.exists()


def test_load_npz_feed_reads_a_good_file(tmp_path):
    x = np.arange(2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)
    np.savez(tmp_path / "a.npz", images=x)
    np.savez_compressed(tmp_path / "b.npz", x)
    assert np.array_equal(load_npz_feed(tmp_path / "a.npz", ["images"])["images"], x)
    assert np.array_equal(load_npz_feed(tmp_path / "b.npz", ["images"])["images"], x)


def test_compare_checks_every_runners_inputs_before_running_any(qdq_onnx):
    class Reference(BaseRunner):
        backend = "torch"

        def input_names_impl(self):
            return ["images"]

        def infer_impl(self, feed):
            raise AssertionError("the reference ran on a feed another runner cannot take")

    feed = {"images": np.zeros((1, 3, 16, 16), np.float32)}
    with pytest.raises(TrtQatError, match=r"takes \[batch, 3, 8, 8\] float32, got \[1, 3, 16, 16\] float32"):
        compare_runners([Reference(), OnnxrtRunner(qdq_onnx)], [feed])


def test_torch_runner_errors_are_one_trtqaterror():
    import torch

    from trt_qat.runners.torch_runner import TorchRunner

    with TorchRunner(torch.nn.Conv2d(3, 2, 3)) as runner:
        with pytest.raises(TrtQatError, match="PyTorch inference .* failed"):
            runner.infer(np.zeros((3, 8), np.float32))
        with pytest.raises(TrtQatError, match="PyTorch inference .* failed"):
            runner.infer(np.zeros((1, 3, 8, 8), np.float64))
        assert runner.infer(np.zeros((1, 3, 8, 8), np.float32))["output"].shape == (1, 2, 6, 6)


def test_check_inputs_passes_what_the_model_takes(qdq_onnx):
    with OnnxrtRunner(qdq_onnx) as runner:
        check_inputs(runner, {"images": (5, 3, 8, 8)}, {"images": np.float32})
        with pytest.raises(TrtQatError, match="got none for"):
            check_inputs(runner, {"other": (5, 3, 8, 8)})


# --- outputs checked before anything runs: unwritable, or an input ----------------------------------------------
def test_bench_export_json_checked_before_the_benchmark(qdq_onnx, tmp_path, capsys, no_benchmark):
    (tmp_path / "afile").write_text("x")
    line = one_line_error(capsys, ["bench", "--onnx", str(qdq_onnx), *FAST, "--exportJson",
                                   str(tmp_path / "afile" / "x.json")], tmp_path)
    assert "cannot be written" in line, line
    line = one_line_error(capsys, ["bench", "--onnx", str(qdq_onnx), *FAST, "--exportJson", str(tmp_path)],
                          tmp_path)
    assert "is a directory" in line, line
    twin = tmp_path / "sub" / ".." / qdq_onnx.name
    (tmp_path / "sub").mkdir()
    for target in (qdq_onnx, twin):
        line = one_line_error(capsys, ["bench", "--onnx", str(qdq_onnx), *FAST, "--exportJson", str(target)],
                              tmp_path)
        assert "would destroy the input" in line, line


def test_compare_export_json_checked_before_anything_runs(qdq_onnx, fp32_onnx, tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("compare ran: the check came too late")

    monkeypatch.setattr(compare_cli, "compare_runners", fail)
    np.savez(tmp_path / "in.npz", images=np.zeros((1, 3, 8, 8), np.float32))
    base = ["compare", "--onnx", str(qdq_onnx), "--onnx", str(fp32_onnx)]
    (tmp_path / "afile").write_text("x")
    line = one_line_error(capsys, [*base, "--exportJson", str(tmp_path / "afile" / "c.json")], tmp_path)
    assert "cannot be written" in line, line
    for target in (qdq_onnx, fp32_onnx):
        assert "would destroy the input" in one_line_error(capsys, [*base, "--exportJson", str(target)], tmp_path)
    line = one_line_error(capsys, [*base, "--inputs", str(tmp_path / "in.npz"), "--exportJson",
                                   str(tmp_path / "in.npz")], tmp_path)
    assert "would destroy the input" in line, line


# --- eval: a model that does not take [B, 3, H, W] float images -------------------------------------------------
@pytest.fixture
def not_detectors(tmp_path):
    return {
        "int64 input": identity_onnx(tmp_path / "int.onnx", TensorProto.INT64, ["b", 3, 128, 128]),
        "rank-2 input": identity_onnx(tmp_path / "rank2.onnx", TensorProto.FLOAT, ["n", 10]),
        "two inputs": identity_onnx(tmp_path / "two.onnx", TensorProto.FLOAT, ["n", 3, 128, 128], n_inputs=2),
        "other size": make_qdq_convnet(tmp_path / "size8.onnx"),
        "fixed batch 1": make_qdq_convnet(tmp_path / "fixed1.onnx", size=128, batch=1),
        "float16 input": identity_onnx(tmp_path / "half.onnx", TensorProto.FLOAT16, ["b", 3, 128, 128]),
    }


@pytest.mark.parametrize("case, msg", [
    ("int64 input", "int64, got [4, 3, 128, 128] float32"),
    ("rank-2 input", "takes [n, 10] float32"),
    ("two inputs", "got none for ['z']"),
    ("other size", "takes [batch, 3, 8, 8] float32"),
    ("fixed batch 1", "takes [1, 3, 128, 128] float32"),
    ("float16 input", "float16"),
])
def test_eval_refuses_a_model_that_does_not_take_images_up_front(not_detectors, tiny_digits_yaml, tmp_path, capsys,
                                                                  monkeypatch, case, msg):
    from trt_qat.runners.onnxrt import OnnxrtRunner as Runner

    monkeypatch.setattr(Runner, "infer_impl", lambda *a: pytest.fail("inference ran before the input check"))
    out = tmp_path / "out" / "eval.json"
    line = one_line_error(capsys, ["eval", "--onnx", str(not_detectors[case]), "--data", str(tiny_digits_yaml),
                                   "--imgsz", "128", "--batch-size", "4", "--json", str(out)],
                          tmp_path, Path(tiny_digits_yaml).parent)
    assert msg in line and "--batch-size and --imgsz" in line, line
    assert not out.exists()


def test_eval_json_checked_before_the_evaluation(qdq_onnx, tiny_digits_yaml, tmp_path, capsys):
    base = ["eval", "--onnx", str(qdq_onnx), "--data", str(tiny_digits_yaml)]
    watched = (tmp_path, Path(tiny_digits_yaml).parent)
    for target in (qdq_onnx, tiny_digits_yaml):
        assert "would destroy the input" in one_line_error(capsys, [*base, "--json", str(target)], *watched)
    (tmp_path / "afile").write_text("x")
    line = one_line_error(capsys, [*base, "--json", str(tmp_path / "afile" / "e.json")], *watched)
    assert "cannot be written" in line, line


def test_eval_json_refuses_its_checkpoint(tmp_path, tiny_digits_yaml, capsys):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"not read: the output check comes first")
    line = one_line_error(capsys, ["eval", "--checkpoint", str(ckpt), "--data", str(tiny_digits_yaml), "--json",
                                   str(ckpt)], tmp_path)
    assert "would destroy the input" in line, line


def test_eval_pads_the_last_batch_for_a_fixed_batch_model(tmp_path):
    from trt_qat.measure.evaluate import predict_dataset

    class FixedBatch(BaseRunner):
        backend = "fixed"
        input_shapes = {"images": (4, 3, 32, 32)}
        input_dtypes = {"images": np.dtype(np.float32)}

        def input_names_impl(self):
            return ["images"]

        def infer_impl(self, feed):
            assert feed["images"].shape == (4, 3, 32, 32)
            return OrderedDict(output=np.zeros((4, 1, 6), np.float32))

    class Images:
        def __len__(self):
            return 6

        def __getitem__(self, i):
            import torch

            meta = {"image_id": i, "ratio": 1.0, "pad": (0, 0), "orig_shape": (32, 32)}
            return torch.zeros(3, 32, 32), torch.zeros(0, 5), meta

    class NoBoxes:
        def decode(self, outputs, conf, iou, max_det):
            import torch

            return [torch.zeros(0, 6) for _ in range(outputs["output"].shape[0])]

    _, ids, _ = predict_dataset(FixedBatch(), Images(), batch_size=4, adapter=NoBoxes())
    assert ids == list(range(6))


# --- strict JSON from every writer ---------------------------------------------------------------------------------
def test_json_safe_turns_non_finite_numbers_into_null():
    doc = json_safe({"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": np.float32(2.0),
                        "d": np.array([1, 2]), "e": (np.int64(3), None, "x"), "f": {"g": np.float64("nan")}})
    assert doc == {"a": None, "b": [None, None, 1.5], "c": 2.0, "d": [1, 2], "e": [3, None, "x"], "f": {"g": None}}
    json.dumps(doc, allow_nan=False)


def test_write_results_is_strict_json(tmp_path):
    out = bm.write_results(tmp_path / "b.json", {"Throughput (qps)": float("inf"), "Latency": {"cv": float("nan")}},
                           extra={"model": "m.onnx"})
    doc = strict_json(out)
    assert doc["Throughput (qps)"] is None and doc["Latency"]["cv"] is None and doc["model"] == "m.onnx"


def test_compare_export_json_is_strict_json(qdq_onnx, fp32_onnx, tmp_path, monkeypatch):
    def nan_report(runners, feeds, thresholds):
        return {"reference": "ort:0", "runners": ["ort:0", "ort:1"], "thresholds": thresholds, "n_feeds": 1,
                "ok": True, "pairs": [{"reference": "ort:0", "test": "ort:1", "ok": True, "outputs": [
                    {"output": "out", "shape": [1], "max_abs": float("inf"), "mean_abs": float("nan"),
                     "cosine": np.float32(1.0), "ok": True}]}]}

    monkeypatch.setattr(compare_cli, "compare_runners", nan_report)
    out = tmp_path / "c.json"
    assert main(["compare", "--onnx", str(qdq_onnx), "--onnx", str(fp32_onnx), "--num-inputs", "1",
                 "--exportJson", str(out)]) == 0
    row = strict_json(out)["pairs"][0]["outputs"][0]
    assert row["max_abs"] is None and row["mean_abs"] is None and row["cosine"] == 1.0


def test_eval_json_is_strict_json(qdq_onnx, tiny_digits_yaml, tmp_path, monkeypatch):
    from trt_qat.cli import eval as eval_cli

    monkeypatch.setattr(eval_cli, "evaluate", lambda *a, **k: {"map50": float("nan"), "map50_95": float("inf"),
                                                              "images": 6, "detections": 0, "seconds": 0.1})
    out = tmp_path / "e.json"
    assert main(["eval", "--onnx", str(qdq_onnx), "--data", str(tiny_digits_yaml), "--json", str(out)]) == 0
    row = strict_json(out)
    assert row["map50"] is None and row["map50_95"] is None and row["images"] == 6


def test_cosine_of_huge_values_is_not_nan():
    from trt_qat.measure.compare import compare_outputs

    big = np.array([1e300, -1e300, 3e299])
    row = compare_outputs({"y": big}, {"y": big.copy()})[0]
    assert row["cosine"] == pytest.approx(1.0) and row["ok"]
    row = compare_outputs({"y": big}, {"y": -big})[0]
    assert row["cosine"] == pytest.approx(-1.0) and not row["ok"]
