"""The package's shape: no import cycles (function-local imports included), the built-in detector reached only
through the model adapter, no argparse outside cli/, no private names imported across modules, no oversized
modules."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "trt_qat"
#: the built-in detector's own modules: only trt_qat/models/ may import them
BUILTIN_MODULES = {"trt_qat.models.yolo", "trt_qat.models.loss", "trt_qat.models.postprocess",
                   "trt_qat.models.builtin"}
MAX_LINES = 450
#: bottom to top, as README's layout section lists them: a module imports only from its own layer and lower ones
LAYERS = [("trt_qat.errors", "trt_qat.config", "trt_qat.config_variants", "trt_qat.fileio", "trt_qat.dist"),
          ("trt_qat.data",), ("trt_qat.models",), ("trt_qat.quant",), ("trt_qat.calibration",), ("trt_qat.onnx",),
          ("trt_qat.trt",), ("trt_qat.runners",), ("trt_qat.measure",), ("trt_qat.analysis",), ("trt_qat.train",),
          ("trt_qat.prune",),
          ("trt_qat.report",), ("trt_qat.pipeline",), ("trt_qat.cli", "trt_qat.__main__", "trt_qat.build_engine",
                                                        "trt_qat.benchmark")]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path):
    """``(line, imported module, imported names)`` for every import statement in the file, at any depth."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module, [a.name for a in node.names]


def _edges(name: str, path: Path) -> set:
    """The trt_qat modules ``name`` imports (a submodule imported with ``from pkg import sub`` counts as ``sub``)."""
    out = set()
    for _, module, names in _imports(name, path):
        subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
        if subs:
            out.update(subs)
            if len(subs) < len(names):
                out.add(module)
        elif module in MODULES:
            out.add(module)
    out.discard(name)
    return out


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    # the package __init__ re-exports the public API, so every module is reachable from it; an edge *to* the
    # package (``from trt_qat import __version__``) is an edge to that file and counts like any other
    graph = {name: _edges(name, path) for name, path in MODULES.items()}
    assert _cycles(graph) == []


def _layer(module: str):
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None  # the package itself (trt_qat/__init__.py: the public API, above everything)


def test_every_module_has_a_layer():
    assert [name for name in MODULES if name != "trt_qat" and _layer(name) is None] == []


def test_imports_never_run_up_the_layers():
    offenders = [f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})"
                 for name, path in MODULES.items() if name != "trt_qat"
                 for dep in _edges(name, path) if dep != "trt_qat" and _layer(dep) > _layer(name)]
    assert offenders == []


def test_only_models_imports_the_builtin_detector():
    offenders = [f"{path.relative_to(PKG.parent)}:{line} imports {module}"
                 for name, path in MODULES.items() if not name.startswith("trt_qat.models")
                 for line, module, names in _imports(name, path)
                 if module in BUILTIN_MODULES or any(f"{module}.{n}" in BUILTIN_MODULES for n in names)]
    assert offenders == []


def test_argparse_only_in_cli():
    offenders = [str(path.relative_to(PKG.parent)) for name, path in MODULES.items()
                 if not name.startswith("trt_qat.cli")
                 and any(module == "argparse" for _, module, _ in _imports(name, path))]
    assert offenders == []


def test_no_private_names_imported_across_modules():
    offenders = [f"{path.relative_to(PKG.parent)}:{line} imports {module}.{n}"
                 for name, path in MODULES.items() for line, module, names in _imports(name, path)
                 if module.startswith("trt_qat") for n in names if n.startswith("_") and not n.startswith("__")]
    assert offenders == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by role (at most {MAX_LINES})"
