"""YOLO-format datasets: ``data.yaml`` loading, image lists, label files, and :class:`YoloDataset` (the letterboxing,
augmentation, COCO ground truth and batching they share are in :mod:`trt_qat.data.dataset`).

Layout (the standard one): a split is a directory of images (``.../images/<split>/x.png``) whose labels live at
the same path with the last ``/images/`` replaced by ``/labels/`` and a ``.txt`` extension, one object per line
``cls cx cy w h`` (normalized 0-1). A split may also be a ``.txt`` file listing image paths, one per line —
that is how calibration image lists under ``calib/`` are stored (see :func:`write_image_list`).
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from trt_qat.data.dataset import IMAGE_EXTENSIONS, DetectionDataset, check_image_mode, oriented_shape
from trt_qat.errors import LOG, TrtQatError
from trt_qat.fileio import atomic_write_text

__all__ = [
    "YoloDataset",
    "ImageFolder",
    "scan_split",
    "label_path_for",
    "load_data_yaml",
    "read_image_list",
    "write_image_list",
]

SPLIT_KEYS = ("train", "val", "test", "calib")
_BOX_TOLERANCE = 0.01  # normalized coordinates may exceed [0, 1] by this much (then they are clipped)
_MAKE_DATA_HINT = "run `trt-qat make-data` or pass --data path/to/data.yaml"
# keywords of the PNG text chunks PIL reads an orientation from (besides the eXIf chunk)
_PNG_ORIENTATION_KEYWORDS = (b"exif", b"Raw profile type exif", b"XML:com.adobe.xmp")


# --------------------------------------------------------------------------------------------------------- config
def load_data_yaml(path, splits=None) -> dict:
    """Load and validate a YOLO ``data.yaml``.

    Args:
        path (str | Path | dict): The yaml file, or an already-loaded mapping (then relative split paths are
            resolved against its ``path`` key or the working directory).
        splits (Iterable[str] | None): Split keys that must be present. Defaults to None (at least one of
            ``train``/``val`` must be).

    Returns:
        dict: The mapping with ``path`` (absolute dataset root, str), every split key resolved to an absolute path
        string (or a list of them), ``nc`` (int), ``names`` (list[str]) and ``yaml_file`` (str or None).
    """
    import yaml

    if isinstance(path, dict):
        doc, yaml_file, base = dict(path), None, Path.cwd()
        where = "dataset config"
    else:
        yaml_file = Path(path).expanduser()
        if not yaml_file.is_file():
            raise TrtQatError(f"dataset config '{yaml_file}' does not exist; {_MAKE_DATA_HINT}")
        try:
            doc = yaml.safe_load(yaml_file.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrtQatError(f"dataset config '{yaml_file}' is not valid YAML ({first}); fix the file or "
                              f"{_MAKE_DATA_HINT}") from None
        if not isinstance(doc, dict):
            raise TrtQatError(f"dataset config '{yaml_file}' is not a YAML mapping; it needs keys like "
                              "`path`, `train`, `val`, `nc`, `names`")
        base = yaml_file.absolute().parent
        where = f"dataset config '{yaml_file}'"

    names = doc.get("names")
    if isinstance(names, dict):
        try:
            names = [str(names[k]) for k in sorted(names, key=int)]
        except (TypeError, ValueError):
            raise TrtQatError(f"{where}: `names` must be a list or a mapping of class index -> name") from None
    elif names is not None and not isinstance(names, (list, tuple)):
        raise TrtQatError(f"{where}: `names` must be a list or a mapping of class index -> name")
    nc = doc.get("nc")
    if nc is None:
        if names is None:
            raise TrtQatError(f"{where} has no `nc` key; add `nc: <number of classes>` (and `names: [...]`)")
        nc = len(names)
    try:
        nc = int(nc)
    except (TypeError, ValueError):
        raise TrtQatError(f"{where}: `nc` must be an integer (got {nc!r})") from None
    if nc < 1:
        raise TrtQatError(f"{where}: `nc` must be >= 1 (got {nc})")
    if names is None:
        names = [str(i) for i in range(nc)]
    names = [str(n) for n in names]
    if len(names) != nc:
        raise TrtQatError(f"{where}: `nc` is {nc} but `names` has {len(names)} entries; make them agree")

    root = doc.get("path")
    root = base if root in (None, "") else Path(str(root)).expanduser()
    if not root.is_absolute():
        root = base / root
    if not root.is_dir() and yaml_file is not None:
        LOG.warning("%s: dataset root '%s' does not exist; resolving splits against '%s' instead", where, root, base)
        root = base

    required = list(splits) if splits is not None else []
    for key in required:
        if doc.get(key) in (None, "", []):
            raise TrtQatError(f"{where} has no `{key}` split; add `{key}: images/{key}` (a directory or a .txt "
                              f"image list, relative to `path`)")
    if splits is None and not any(doc.get(k) for k in ("train", "val")):
        raise TrtQatError(f"{where} has neither a `train` nor a `val` split; add e.g. `val: images/val`")

    out = dict(doc)
    for key in SPLIT_KEYS:
        value = doc.get(key)
        if value in (None, ""):
            out.pop(key, None)
            continue
        if isinstance(value, (list, tuple)):
            out[key] = [str(_resolve(root, v)) for v in value]
        else:
            out[key] = str(_resolve(root, value))
    out.update(path=str(root), nc=nc, names=names, yaml_file=str(yaml_file) if yaml_file is not None else None)
    return out


def _resolve(root: Path, value) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else (root / p)


# ---------------------------------------------------------------------------------------------------- image lists
def write_image_list(paths, out_txt) -> Path:
    """Atomically write an image list (absolute paths, one per line) usable as a split in data.yaml.

    Args:
        paths (Iterable[str | Path]): Image paths.
        out_txt (str | Path): Destination ``.txt`` file (e.g. ``calib/<run>/images.txt``).

    Returns:
        Path: ``out_txt``.
    """
    lines = [str(Path(p).expanduser().absolute()) for p in paths]
    return atomic_write_text(out_txt, "".join(line + "\n" for line in lines))


def read_image_list(txt) -> list[Path]:
    """Read an image list; relative lines are resolved against the list's directory (or its parent)."""
    txt = Path(txt)
    try:
        lines = txt.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TrtQatError(f"image list '{txt}' cannot be read ({exc}); check the file") from None
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line).expanduser()
        if not p.is_absolute():
            cands = [txt.parent / p, txt.parent.parent / p]
            p = next((c for c in cands if c.exists()), cands[0])
        out.append(p)
    return out


def _collect_images(source) -> tuple[list[Path], list[str]]:
    """Image paths of a split (directory, .txt list, single image, or a list of them); plus missing entries."""
    if isinstance(source, (list, tuple)):
        paths, missing = [], []
        for s in source:
            p, m = _collect_images(s)
            paths += p
            missing += m
        return paths, missing
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        return files, []
    if source.is_file() and source.suffix.lower() == ".txt":
        listed = read_image_list(source)
        return [p for p in listed if p.is_file()], [str(p) for p in listed if not p.is_file()]
    if source.is_file() and source.suffix.lower() in IMAGE_EXTENSIONS:
        return [source], []
    if source.exists():
        raise TrtQatError(f"split '{source}' is neither a directory, an image nor a .txt image list; "
                          "point the split at a directory of images")
    raise TrtQatError(f"split '{source}' does not exist; fix the split path in data.yaml or {_MAKE_DATA_HINT}")


def label_path_for(image_path) -> Path:
    """The YOLO label file of an image: last ``/images/`` -> ``/labels/``, extension -> ``.txt``."""
    s = str(image_path)
    key = f"{os.sep}images{os.sep}"
    i = s.rfind(key)
    if i >= 0:
        s = s[:i] + f"{os.sep}labels{os.sep}" + s[i + len(key):]
    return Path(os.path.splitext(s)[0] + ".txt")


def _probe_image(path: Path):
    """(h, w) of a decodable image as :func:`~trt_qat.data.dataset.decode_rgb` returns it (EXIF orientations 5-8
    swap them), or raise with a reason.

    Cheap: header, PIL verify and orientation metadata. PIL decodes a PNG to look for metadata after its pixel
    data; that is done only when :func:`_png_may_be_oriented` finds a chunk that can hold an orientation.

    Raises:
        TrtQatError: For a pixel mode that decoding refuses (see :func:`~trt_qat.data.dataset.check_image_mode`).
        Exception: Any decoder error (the scan skips the image).
    """
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        mode, fmt = im.mode, im.format
        im.verify()
    if w < 1 or h < 1:
        raise ValueError("empty image")
    check_image_mode(mode, path)
    if fmt == "PNG" and not _png_may_be_oriented(path):
        return int(h), int(w)
    with Image.open(path) as im:
        return oriented_shape(im)


def _png_may_be_oriented(path) -> bool:
    """Whether a PNG has a chunk PIL may read an orientation from: ``eXIf``, or a text chunk (``tEXt``, ``zTXt``,
    ``iTXt``) keyed ``exif``, ``Raw profile type exif`` or ``XML:com.adobe.xmp``, before or after the pixel data.
    Reads the chunk headers and text keywords only; True when unsure (then the caller asks PIL)."""
    with open(path, "rb") as fp:
        fp.seek(8)  # the PNG signature
        while len(header := fp.read(8)) == 8:
            length, kind = struct.unpack(">I4s", header)
            start = fp.tell()
            if kind == b"eXIf":
                return True
            if kind in (b"tEXt", b"zTXt", b"iTXt"):
                if fp.read(min(length, 80)).split(b"\0", 1)[0] in _PNG_ORIENTATION_KEYWORDS:
                    return True
            elif kind == b"IEND":
                return False
            fp.seek(start + length + 4)  # past the data and its CRC
    return True


def _parse_label_file(path: Path, nc: int):
    """Return (labels float32 [n,5] normalized cls,cx,cy,w,h; list of (line_no, reason) for skipped lines).

    A missing file means "no objects". A path that exists but is not a readable text file (a directory, a broken
    link, a pipe, no read permission, not text) raises: reading it as "no objects" would be silently wrong.
    """
    if not os.path.lexists(path):
        return np.zeros((0, 5), np.float32), []
    if not path.is_file():
        what = "a directory" if path.is_dir() else "not a regular file (a broken link, pipe or device)"
        raise TrtQatError(f"label path '{path}' is {what}; replace it with the image's label file (one "
                          "`cls cx cy w h` line per object) or remove it if the image has no objects")
    rows, bad = [], []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        raise TrtQatError(f"label file '{path}' cannot be read ({reason}); make it a readable text file "
                          "(check its permissions) or remove it if the image has no objects") from None
    for no, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5:
            bad.append((no, f"expected 5 columns, got {len(parts)}"))
            continue
        try:
            vals = [float(v) for v in parts]
        except ValueError:
            bad.append((no, "non-numeric value"))
            continue
        cls, cx, cy, bw, bh = vals
        if not all(np.isfinite(vals)):
            bad.append((no, "non-finite value"))
        elif cls != int(cls) or not 0 <= cls < nc:
            bad.append((no, f"class {parts[0]} not in 0..{nc - 1}"))
        elif bw <= 0 or bh <= 0:
            bad.append((no, "non-positive width/height"))
        elif (min(cx - bw / 2, cy - bh / 2) < -_BOX_TOLERANCE or max(cx + bw / 2, cy + bh / 2) > 1 + _BOX_TOLERANCE):
            bad.append((no, "box outside the image"))
        else:
            x0, y0 = max(cx - bw / 2, 0.0), max(cy - bh / 2, 0.0)
            x1, y1 = min(cx + bw / 2, 1.0), min(cy + bh / 2, 1.0)
            rows.append([cls, (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
    labels = np.asarray(rows, dtype=np.float32).reshape(-1, 5)
    return labels, bad


# ------------------------------------------------------------------------------------------------------- datasets


def scan_split(paths: list, label_of, where: str):
    """Probe images and parse labels; return kept (path, (h, w), labels) and log one warning per problem kind.

    Undecodable images and malformed label lines are skipped (one warning each kind); a refused pixel mode or a
    label path that is not a readable file raises :class:`~trt_qat.errors.TrtQatError`.
    """
    kept, bad_images = [], []
    bad_lines, bad_files = 0, 0
    first_bad_line = None
    for p in paths:
        try:
            shape = _probe_image(p)
        except TrtQatError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "skip this image"
            bad_images.append(f"{p}: {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        labels, bad = label_of(p)
        if bad:
            bad_files += 1
            bad_lines += len(bad)
            if first_bad_line is None:
                first_bad_line = f"{label_path_for(p)}:{bad[0][0]} ({bad[0][1]})"
        kept.append((p, shape, labels))
    if bad_images:
        LOG.warning("skipped %d unreadable image%s in '%s' (first: %s)", len(bad_images),
                    "s" if len(bad_images) != 1 else "", where, bad_images[0])
    if bad_lines:
        LOG.warning("skipped %d malformed label line%s in %d file%s of '%s' (first: %s)", bad_lines,
                    "s" if bad_lines != 1 else "", bad_files, "s" if bad_files != 1 else "", where, first_bad_line)
    return kept


class YoloDataset(DetectionDataset):
    """A YOLO-format split, letterboxed to ``imgsz``.

    ``ds[i]`` is ``(img, labels, meta)``: ``img`` float32 [3,H,W] in 0..1, ``labels`` float32 [n,5]
    (cls, cx, cy, w, h) normalized to the letterboxed image, ``meta`` = dict(image_id, path, orig_shape (h, w),
    ratio (ratio_w, ratio_h), pad (pad_w, pad_h)).

    Args:
        data (str | Path | dict): ``data.yaml`` path or a mapping as returned by :func:`load_data_yaml`.
        split (str): Split key (``train``, ``val``, ``calib``, ``test``). Defaults to "val".
        imgsz (int | tuple[int, int]): Letterbox size. Defaults to 128.
        augment (bool): Digit-safe augmentation (colour jitter, scale/translate; never flips). Defaults to False.
        max_images (int | None): Keep only the first N images (sorted by path). Defaults to None (all).
        cache (bool): Keep decoded images in memory. Defaults to False.
    """

    def __init__(self, data, split: str = "val", imgsz=128, augment: bool = False, max_images=None,
                 cache: bool = False):
        super().__init__(imgsz=imgsz, augment=augment, cache=cache)
        cfg = data if isinstance(data, dict) and "yaml_file" in data else load_data_yaml(data, splits=[split])
        if split not in cfg:
            raise TrtQatError(f"dataset config has no `{split}` split; add `{split}: images/{split}` to data.yaml")
        self.data = cfg
        self.split = split
        self.nc = int(cfg["nc"])
        self.names = list(cfg["names"])
        source = cfg[split]
        where = source if isinstance(source, str) else ", ".join(source)
        paths, missing = _collect_images(source)
        if missing:
            LOG.warning("skipped %d missing image%s listed in '%s' (first: %s)", len(missing),
                        "s" if len(missing) != 1 else "", where, missing[0])
        if max_images is not None:
            paths = paths[:max(int(max_images), 0)]
        self._set_items(scan_split(paths, self._read_labels, where), where)

    def _read_labels(self, image_path):
        return _parse_label_file(label_path_for(image_path), self.nc)


class ImageFolder(DetectionDataset):
    """Bare images, no labels: every image under ``source`` (a directory, searched recursively, or a ``.txt`` image
    list), letterboxed to ``imgsz``. Nothing reads a label file; ``ds[i]`` has an empty ``labels`` tensor. For
    label-free distillation QAT and calibration on deployment footage.

    Args:
        source (str | Path): a directory of images or a ``.txt`` list of image paths.
        imgsz (int): Letterbox size. Defaults to 128.
        max_images (int | None): Keep only the first N images (sorted by path). Defaults to None (all).

    Raises:
        TrtQatError: when ``source`` holds no readable image.
    """

    def __init__(self, source, imgsz=128, max_images=None):
        super().__init__(imgsz=imgsz, augment=False)
        self.nc, self.names = 0, []
        where = str(source)
        paths, _ = _collect_images(source)
        if max_images is not None:
            paths = paths[:max(int(max_images), 0)]
        self._set_items(scan_split(paths, lambda _path: (np.zeros((0, 5), np.float32), []), where), where)
