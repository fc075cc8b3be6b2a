"""The Dockerfiles parse, copy only what exists, install pytorch-quantization 2.1.3, and enter `python -m trt_qat`."""
from __future__ import annotations

import glob
import importlib
import io
import json
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"jetson": ROOT / "docker" / "Dockerfile.jetson", "x86": ROOT / "docker" / "Dockerfile.x86"}


def parse(path: Path) -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))


def instructions(parser, name):
    return [s["value"] for s in parser.structure if s["instruction"] == name]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_parses_and_installs_the_stack(kind):
    parser = parse(DOCKERFILES[kind])
    structure = parser.structure
    assert structure and structure[0]["instruction"] in ("COMMENT", "ARG", "FROM")
    # ARG BASE is declared before FROM ${BASE}, so --build-arg BASE=... picks the base image
    first_from = next(i for i, s in enumerate(structure) if s["instruction"] == "FROM")
    assert any(s["instruction"] == "ARG" and s["value"].startswith("BASE=") for s in structure[:first_from])
    assert structure[first_from]["value"] == "${BASE}"
    base = parser.baseimage
    if kind == "jetson":
        assert base.startswith("nvcr.io/nvidia/l4t-jetpack:r36.")
    else:
        assert base.startswith("nvcr.io/nvidia/pytorch:") and base.endswith("-py3")
    runs = " ".join(instructions(parser, "RUN"))
    assert "pytorch-quantization==2.1.3" in runs and "pycuda" in runs and "import tensorrt" in runs
    assert "pip install ." in runs


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_every_copy_source_exists(kind):
    parser = parse(DOCKERFILES[kind])
    copies = instructions(parser, "COPY") + instructions(parser, "ADD")
    assert copies
    copied = set()
    for value in copies:
        parts = [p for p in value.split() if not p.startswith("--")]
        assert len(parts) >= 2, value
        for src in parts[:-1]:
            matches = glob.glob(str(ROOT / src))
            assert matches, f"{DOCKERFILES[kind].name}: COPY source '{src}' does not exist in the repository"
            copied.add(src.rstrip("/"))
    assert {"trt_qat", "setup.cfg"} <= copied


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_entrypoint_is_python_m_trt_qat(kind):
    parser = parse(DOCKERFILES[kind])
    (entry,) = instructions(parser, "ENTRYPOINT")
    argv = json.loads(entry)
    assert argv[0] in ("python", "python3") and argv[1:] == ["-m", "trt_qat"]


def test_entrypoint_module_imports():
    module = importlib.import_module("trt_qat.__main__")
    assert callable(getattr(module, "main", None))


def test_docker_readme_documents_the_flow():
    text = (ROOT / "docker" / "README.md").read_text()
    for needle in ("docker build -f docker/Dockerfile.jetson", "docker build -f docker/Dockerfile.x86",
                   "--runtime nvidia", "/workspace/calib", "/workspace/engines", "/workspace/reports",
                   "-m trt_qat.build_engine", "--precision int8", "bench --engine"):
        assert needle in text, needle
