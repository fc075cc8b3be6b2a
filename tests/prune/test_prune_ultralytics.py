"""Pruning Ultralytics YOLOv8n (ultralytics pinned in requirements-dev.txt): the C2f groups Torch-Pruning cannot map
are kept whole by themselves, and the pruned checkpoint reloads with no extra flag."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("torch_pruning")
pytest.importorskip("ultralytics")


def test_yolov8n_prunes_saves_and_reloads(tmp_path):
    from trt_qat.models.adapter import get_adapter, load_fp32
    from trt_qat.prune import prune

    adapter = get_adapter("ultralytics")
    torch.manual_seed(0)
    model = adapter.tag(adapter.build("yolov8n.yaml", nc=10).eval())
    x = adapter.sample_input(32)
    report = prune(model, x, target_macs=0.6)
    assert report["macs_ratio"] <= 0.6
    # C2f's chunk feeds both its Concat and its last bottleneck's residual: those groups stay whole
    assert report["untraceable_kept"] and all(".m." in n and n.endswith(".cv2.conv")
                                              for n in report["untraceable_kept"])
    assert {f"model.22.cv2.{i}.2" for i in range(3)} <= set(report["kept"])  # the head's outputs
    path = adapter.save(model, tmp_path / "pruned_v8n.pt")
    loaded, again = load_fp32(path)
    assert again is adapter
    model.eval()
    loaded.eval()
    img = torch.rand(1, 3, 32, 32)
    first, ref = loaded(img), model(img)
    first = first[0] if isinstance(first, (list, tuple)) else first
    ref = ref[0] if isinstance(ref, (list, tuple)) else ref
    assert torch.allclose(first, ref)
