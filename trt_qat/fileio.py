"""Atomic writes: every artefact (checkpoint, ONNX, engine, report) is written to a temporary file in the
destination directory and then renamed, so a killed process never leaves a half-written file behind."""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import tempfile
from pathlib import Path

from trt_qat.errors import TrtQatError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
           "json_safe", "ensure_dir", "require_file", "read_checkpoint", "check_writable_file", "check_not_input",
           "output_lock", "remove_stale_tmp", "write_unit", "pickle_globals", "restricted_pickle"]


def ensure_dir(path) -> Path:
    """Create ``path`` (a directory) or raise a TrtQatError that says why it cannot be written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe", delete=True)
        probe.close()
    except OSError as exc:
        raise TrtQatError(f"output directory '{path}' cannot be written ({exc.strerror or exc}); "
                          "choose a writable directory") from None
    return path


def require_file(path, what: str = "file", hint: str = "check the path") -> Path:
    path = Path(path)
    if not path.is_file():
        raise TrtQatError(f"{what} '{path}' does not exist; {hint}")
    return path


def check_writable_file(path) -> Path:
    """Raise now, before a long run, if ``path`` cannot be written later (a directory, or an unwritable folder)."""
    path = Path(path)
    if path.is_dir():
        raise TrtQatError(f"'{path}' is a directory; give a file path (e.g. '{path / 'out'}{path.suffix}')")
    ensure_dir(path.parent if str(path.parent) else ".")
    return path


def _read_umask() -> int:
    mask = os.umask(0o022)  # (read once, at import: setting and restoring it is not thread-safe)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed."""
    path = check_writable_file(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the file gets what open() would have given it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def json_safe(obj):
    """``obj`` ready for strict JSON: every non-finite float (NaN, +-Infinity, which JSON does not have) becomes
    None (``null``), numpy scalars and arrays become Python numbers and lists; dicts, lists and tuples are copied
    recursively. ``json.dumps(json_safe(obj), allow_nan=False)`` succeeds on results and reports."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy arrays and scalars
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_json(path, obj) -> Path:
    """Write ``obj`` as strict JSON (non-finite numbers as ``null``, see :func:`json_safe`), atomically."""
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False, default=str,
                                              allow_nan=False) + "\n")


def atomic_torch_save(obj, path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically, with the same bytes for the same ``obj``.

    ``torch.save`` names the zip archive's records after the file it writes to; saving to the temporary file would
    put its random name into the bytes. Saving to memory first keeps one fixed record name."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def check_not_input(output, *inputs, flag: str = "the output") -> Path:
    """Raise when ``output`` is the same file as one of ``inputs`` (writing it would destroy that input)."""
    out = Path(output)
    for item in inputs:
        if item is None:
            continue
        src = Path(item)
        same = out.resolve() == src.resolve()
        if not same and out.exists() and src.exists():
            same = os.path.samefile(out, src)
        if same:
            raise TrtQatError(f"{flag} '{output}' is the input file '{item}'; writing it would destroy the input: "
                              "choose another output path")
    return out


def read_checkpoint(path, hint: str = "check the path or run the previous stage first"):
    """``torch.load`` a checkpoint on the CPU; a missing or unreadable file is one TrtQatError (``hint`` is the fix
    for a missing file)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise TrtQatError(f"checkpoint '{path}' does not exist; {hint}")
    try:
        # data only: trt_qat's own checkpoints hold tensors, numbers, strings and containers, never code; a pickle
        # that would construct anything else (and run code doing it) is refused, not executed
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:  # not a pickle at all: corrupt
            raise TrtQatError(f"checkpoint '{path}' cannot be read (UnpicklingError); it is corrupt or not a PyTorch "
                              "checkpoint: re-run the stage that wrote it") from None
        raise TrtQatError(f"checkpoint '{path}' holds code ({found.group(1)}), not only tensors and plain data; "
                          "trt_qat reads checkpoints as data and never runs what a pickle carries: pass a checkpoint "
                          "written by trt-qat train, calibrate or qat (other formats load through their model "
                          "family)") from None
    except Exception as exc:  # corrupt or not a torch file
        raise TrtQatError(f"checkpoint '{path}' cannot be read ({exc.__class__.__name__}); it is corrupt or not a "
                          "PyTorch checkpoint: re-run the stage that wrote it") from None
    if not isinstance(data, dict):
        raise TrtQatError(f"checkpoint '{path}' holds a {type(data).__name__}, not a trt_qat checkpoint (a dict); "
                          "pass a file written by trt-qat train, calibrate or qat")
    return data


LOCK_NAME = ".trt_qat.lock"


#: the name :func:`atomic_path`'s temporary files have: ``.<file name>.<8 random characters>.tmp``
_TMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def remove_stale_tmp(directory, prefix: str = ".") -> int:
    """Remove the temporary files (:func:`atomic_path`'s, named ``prefix...``) a killed run left in ``directory``
    and its subdirectories; call it holding the lock of ``directory``. Hidden directories and subdirectories with
    a lock of their own (another run's output) are not entered. Returns how many were removed."""
    removed = 0
    for entry in Path(directory).iterdir():
        if entry.is_dir() and not entry.is_symlink():
            if not entry.name.startswith(".") and not (entry / LOCK_NAME).exists() and prefix == ".":
                removed += remove_stale_tmp(entry)
        elif entry.name.startswith(prefix) and _TMP_NAME.match(entry.name) and entry.is_file():
            with contextlib.suppress(OSError):
                entry.unlink()
                removed += 1
    return removed


def _try_lock(lock: Path):
    """An open descriptor holding an exclusive ``flock`` on ``lock``, or None when a live process holds it. The
    kernel releases the lock when its process dies, however it dies: a stale lock file is simply taken."""
    import fcntl

    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        try:  # the holder we waited on may have removed the file: lock the file that is there now
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def output_lock(target, is_dir: bool = True):
    """Hold ``target`` (an output directory, or with ``is_dir=False`` an output file, locked beside it) for this
    process.

    A second trt_qat run on the same target is refused with one line naming the holder's PID. The lock is an
    ``flock``, which the kernel releases when its process dies: the next run takes it and removes the temporary
    files the dead run left. A directory this call created is removed again when the run leaves it empty (it was
    refused before writing). Under torchrun only rank 0 writes, so only rank 0 locks.

    Raises:
        TrtQatError: when another live process holds the target.
    """
    if int(os.environ.get("RANK", "0") or 0) != 0:
        yield Path(target)
        return
    target = Path(target)
    directory = target if is_dir else target.parent
    created = not directory.exists()
    ensure_dir(directory)
    lock = directory / (LOCK_NAME if is_dir else f".{target.name}.lock")
    fd = _try_lock(lock)
    if fd is None:
        try:
            holder = lock.read_text().strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise TrtQatError(f"'{target}' is in use by another trt_qat run (PID {holder}); wait for it to finish, or "
                          "choose another output")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        remove_stale_tmp(directory, "." if is_dir else f".{target.stem}.")
        yield target
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        if created:  # a run refused before it wrote anything leaves no empty directory behind
            with contextlib.suppress(OSError):
                directory.rmdir()


def write_unit(directory, writers: dict, manifest: str = "MANIFEST.json") -> Path:
    """Write several files of one stage as one unit: the old files and manifest go first, then each file (each
    atomically), then the manifest, last. A run interrupted midway leaves no manifest and never a new file beside
    a stale one from an earlier run.

    Args:
        directory (str | Path): where the files go.
        writers (dict[str, Callable[[Path], object]]): file name -> a function that writes that path.
        manifest (str): the manifest's name. Defaults to "MANIFEST.json".

    Returns:
        Path: the manifest (``{"files": {name: sha256}}``).
    """
    import hashlib

    directory = ensure_dir(directory)
    for name in (manifest, *writers):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
    digests = {}
    for name, write in writers.items():
        write(directory / name)
        digests[name] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    return atomic_write_json(directory / manifest, {"files": digests})


def pickle_globals(path) -> list:
    """The ``"module name"`` globals the pickle in a ``torch.save`` file would import, read with :mod:`pickletools`:
    nothing is unpickled, so nothing runs. Empty when the file is not a torch zip archive."""
    import pickletools
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            data = zf.read(name) if name else b""
    except (OSError, zipfile.BadZipFile):
        return []
    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg))
            elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(arg))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]} {strings[-1]}")
    except Exception:  # noqa: BLE001 - a malformed pickle: report what was read
        pass
    return sorted(set(found))


#: builtins a model pickle may name (containers and plain values); eval, exec, getattr and the like are not here
SAFE_BUILTINS = frozenset({"set", "frozenset", "slice", "complex", "bytearray", "range"})


def _global_allowed(module: str, name: str, packages) -> bool:
    """Whether a pickle may resolve ``module.name`` (checked before the module is imported)."""
    top = module.split(".")[0]
    if top in ("builtins", "__builtin__"):
        return name in SAFE_BUILTINS
    if top == "_codecs":
        return name == "encode"  # how protocol-2 pickles spell bytes
    return top in packages or top in ("collections", "numpy", "pathlib", "datetime")


def _resolved_allowed(module: str, name: str, obj) -> bool:
    """The second check, on the resolved object: classes (constructing one runs no code of the pickle's choosing
    beyond the class's own), and the tensor and array rebuild functions; no other callable."""
    if isinstance(obj, type):
        return True
    return (module.startswith("torch._utils") and name.startswith("_rebuild")) or \
        (module.startswith("numpy") and name in ("_reconstruct", "scalar")) or module.split(".")[0] in (
            "_codecs", "builtins", "__builtin__")


def restricted_pickle(packages):
    """A pickle module for ``torch.load(pickle_module=...)`` whose unpickler resolves only classes of ``packages``
    (and torch, collections, numpy arrays, paths and dates) and the tensor rebuild functions: a pickle that names
    ``os.system``, ``builtins.eval`` or any other function is refused when it is read, whatever opcode names it.

    This narrows, and does not remove, the risk of unpickling: load foreign checkpoints only from a source you trust.
    """
    import types

    packages = frozenset(packages) | {"torch"}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if not _global_allowed(module, name, packages):
                raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a model checkpoint")
            obj = super().find_class(module, name)
            if not _resolved_allowed(module, name, obj):
                raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a model checkpoint")
            return obj

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    return types.SimpleNamespace(Unpickler=Unpickler, load=load, __name__="trt_qat_restricted_pickle")
