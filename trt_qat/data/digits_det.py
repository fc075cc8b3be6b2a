"""digits-det: a small, real-data detection set generated from scikit-learn's 1,797 handwritten digit scans.

Each image is a noisy grey-ish canvas with 1..``max_digits`` upscaled digit scans pasted on it; the label of a
box is the digit. The result is written in the standard YOLO layout::

    out_dir/images/{train,val,calib}/00000.png
    out_dir/labels/{train,val,calib}/00000.txt     # "cls cx cy w h", normalized 0-1
    out_dir/data.yaml                              # path, train, val, calib, nc, names, generator

Generation is deterministic: the same parameters give byte-identical labels and pixel-identical images.
Validation images use different scans than train and calib (a fixed 80/20 split by scan index).
The whole set is written into a temporary directory that is renamed at the end, so a killed generation never
leaves a half dataset; calling again with the same parameters returns the existing set at once.

Run ``trt-qat make-data --out datasets/digits-det`` (or ``python -m trt_qat.data.digits_det``).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from trt_qat.errors import LOG, TrtQatError
from trt_qat.fileio import atomic_write_text, ensure_dir

__all__ = ["DIGIT_NAMES", "GENERATOR_NAME", "GENERATOR_VERSION", "generate_digits_det", "count_boxes"]

GENERATOR_NAME = "digits-det"
GENERATOR_VERSION = 1
DIGIT_NAMES = [str(i) for i in range(10)]
_SPLIT_SEED = {"train": 1, "val": 2, "calib": 3}
_ALPHA_CUTOFF = 0.12  # upscaled-scan intensity (0..1) below which a pixel counts as background
_MIN_DIGIT, _MAX_DIGIT = 14, 48
_MAX_IOU = 0.1
_PLACEMENT_TRIES = 8


def _digit_scans():
    """Return (images float32 [N,8,8] in 0..1, labels int64 [N], train_idx, val_idx) — val is every 5th scan."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise TrtQatError("scikit-learn is needed to generate digits-det; install it with "
                          "`pip install scikit-learn`") from None
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0).clip(0.0, 1.0)
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    return images, labels, index[index % 5 != 4], index[index % 5 == 4]


def _box_iou(box, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box against an [N,4] array of xyxy boxes."""
    if len(others) == 0:
        return np.zeros(0)
    ix = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / (area + areas - inter)


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, float]:
    """A grey-ish canvas: base level + slight colour tint + faint linear gradient + gaussian noise."""
    base = rng.uniform(50.0, 205.0)
    tint = rng.uniform(-12.0, 12.0, size=3)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    amplitude = rng.uniform(0.0, 30.0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (np.cos(angle) * (xx / max(w - 1, 1) - 0.5) + np.sin(angle) * (yy / max(h - 1, 1) - 0.5)) * amplitude
    canvas = base + ramp[..., None] + tint[None, None, :]
    canvas = canvas + rng.normal(0.0, rng.uniform(2.0, 10.0), size=(h, w, 3))
    return canvas.astype(np.float32), float(base)


def _stroke_color(rng: np.random.Generator, base: float) -> np.ndarray:
    """A stroke colour that contrasts with a background of mean level ``base``: dark on light, bright on dark."""
    dark = base > 127.5 if abs(base - 127.5) > 25.0 else bool(rng.random() < 0.5)
    if dark:
        level = rng.uniform(0.0, max(base - 90.0, 10.0))
    else:
        level = rng.uniform(min(base + 90.0, 245.0), 255.0)
    color = level + rng.uniform(-25.0, 25.0, size=3)  # faint colour
    return np.clip(color, 0.0, 255.0).astype(np.float32)


def _upscale(scan: np.ndarray, w: int, h: int) -> np.ndarray:
    """Bilinear upscale of an 8x8 scan (0..1) to h x w; faint bleed below the cutoff is zeroed."""
    from PIL import Image

    img = Image.fromarray(np.round(scan * 255.0).astype(np.uint8), mode="L")
    alpha = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
    alpha[alpha < _ALPHA_CUTOFF] = 0.0
    return alpha


def _render(rng: np.random.Generator, scans: np.ndarray, labels: np.ndarray, pool: np.ndarray,
            min_canvas: int, max_canvas: int, max_digits: int):
    """Render one image; return (uint8 HxWx3, [(cls, x0, y0, x1, y1), ...] in pixels)."""
    h = int(rng.integers(min_canvas, max_canvas + 1))
    w = int(rng.integers(min_canvas, max_canvas + 1))
    canvas, base = _background(rng, h, w)
    n_digits = int(rng.integers(1, max_digits + 1))
    boxes: list[tuple[int, float, float, float, float]] = []
    taken = np.zeros((0, 4), dtype=np.float64)
    for _ in range(n_digits):
        for _attempt in range(_PLACEMENT_TRIES):
            scan_idx = int(pool[rng.integers(len(pool))])
            size = rng.uniform(_MIN_DIGIT, min(_MAX_DIGIT, h, w))
            aspect = rng.uniform(0.85, 1.15)
            dw = int(np.clip(round(size * aspect), 8, w))
            dh = int(np.clip(round(size / aspect), 8, h))
            alpha = _upscale(scans[scan_idx], dw, dh)
            ys, xs = np.nonzero(alpha)
            if len(xs) == 0:
                continue
            ox = int(rng.integers(0, w - dw + 1))
            oy = int(rng.integers(0, h - dh + 1))
            box = np.array([ox + xs.min(), oy + ys.min(), ox + xs.max() + 1, oy + ys.max() + 1], dtype=np.float64)
            if len(taken) and _box_iou(box, taken).max() >= _MAX_IOU:
                continue
            color = _stroke_color(rng, base)
            a = alpha[..., None]
            region = canvas[oy:oy + dh, ox:ox + dw]
            canvas[oy:oy + dh, ox:ox + dw] = region * (1.0 - a) + color[None, None, :] * a
            taken = np.concatenate([taken, box[None]], axis=0)
            boxes.append((int(labels[scan_idx]), *box.tolist()))
            break
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8), boxes


def _label_text(boxes, h: int, w: int) -> str:
    lines = []
    for cls, x0, y0, x1, y1 in boxes:
        cx, cy = (x0 + x1) / 2.0 / w, (y0 + y1) / 2.0 / h
        bw, bh = (x1 - x0) / w, (y1 - y0) / h
        lines.append(f"{cls} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
    return "\n".join(lines) + ("\n" if lines else "")


def _data_yaml_text(root: Path, params: dict) -> str:
    import yaml

    doc = {
        "path": str(root),
        "train": "images/train",
        "val": "images/val",
        "calib": "images/calib",
        "nc": 10,
        "names": list(DIGIT_NAMES),
        "generator": params,
    }
    header = "# digits-det: generated by `trt-qat make-data` from sklearn's handwritten digit scans\n"
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)


def _existing_params(data_yaml: Path):
    """The ``generator`` mapping recorded in an existing data.yaml, or None if unreadable/absent."""
    import yaml

    try:
        doc = yaml.safe_load(data_yaml.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return doc.get("generator") if isinstance(doc, dict) else None


def _write_split(out_root: Path, split: str, n: int, seed: int, scans, labels, pool, min_canvas, max_canvas,
                 max_digits) -> int:
    from PIL import Image

    img_dir = out_root / "images" / split
    lbl_dir = out_root / "labels" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    n_boxes = 0
    for i in range(n):
        rng = np.random.default_rng([seed, _SPLIT_SEED[split], i])
        img, boxes = _render(rng, scans, labels, pool, min_canvas, max_canvas, max_digits)
        Image.fromarray(img, mode="RGB").save(img_dir / f"{i:05d}.png", compress_level=1)
        (lbl_dir / f"{i:05d}.txt").write_text(_label_text(boxes, *img.shape[:2]))
        n_boxes += len(boxes)
    return n_boxes


def generate_digits_det(out_dir, n_train: int = 1500, n_val: int = 300, n_calib: int = 128, seed: int = 0,
                        min_canvas: int = 96, max_canvas: int = 160, max_digits: int = 4,
                        force: bool = False) -> Path:
    """Generate the digits-det dataset in YOLO layout and return the path of its ``data.yaml``.

    Args:
        out_dir (str | Path): Directory of the dataset. It is created (atomically, via a temporary sibling
            directory renamed at the end). An existing digits-det set there with other parameters is replaced;
            a non-empty directory that is not a digits-det set is left alone and raises TrtQatError.
        n_train (int): Training images. Defaults to 1500.
        n_val (int): Validation images (drawn from scans never used by train/calib). Defaults to 300.
        n_calib (int): Calibration images (drawn from the train scans). Defaults to 128.
        seed (int): Random seed; the same seed gives identical files. Defaults to 0.
        min_canvas (int): Smallest canvas side in pixels. Defaults to 96.
        max_canvas (int): Largest canvas side in pixels. Defaults to 160.
        max_digits (int): Most digits per image (at least one is always placed). Defaults to 4.
        force (bool): Regenerate even when a set with the same parameters exists. Defaults to False.

    Returns:
        Path: ``out_dir/data.yaml``.
    """
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_calib", n_calib)):
        if int(value) < 0:
            raise TrtQatError(f"{name} must be >= 0 (got {value}); pass a non-negative image count")
    if n_train + n_val + n_calib == 0:
        raise TrtQatError("nothing to generate: n_train, n_val and n_calib are all 0; pass at least one count > 0")
    if not 16 <= int(min_canvas) <= int(max_canvas):
        raise TrtQatError(f"canvas sizes must satisfy 16 <= min_canvas <= max_canvas (got {min_canvas}, "
                          f"{max_canvas}); pass e.g. --min-canvas 96 --max-canvas 160")
    if int(max_digits) < 1:
        raise TrtQatError(f"max_digits must be >= 1 (got {max_digits}); pass e.g. --max-digits 4")

    out_dir = Path(out_dir).expanduser().absolute()
    data_yaml = out_dir / "data.yaml"
    params = {"name": GENERATOR_NAME, "version": GENERATOR_VERSION, "n_train": int(n_train), "n_val": int(n_val),
              "n_calib": int(n_calib), "seed": int(seed), "min_canvas": int(min_canvas),
              "max_canvas": int(max_canvas), "max_digits": int(max_digits)}

    existing = _existing_params(data_yaml) if data_yaml.is_file() else None
    if existing == params and not force and all((out_dir / "images" / s).is_dir() for s in _SPLIT_SEED):
        if _existing_path(data_yaml) != str(out_dir):  # the set was moved: re-point `path`
            atomic_write_text(data_yaml, _data_yaml_text(out_dir, params))
        LOG.info("digits-det already exists at %s with the same parameters; reusing it", out_dir)
        return data_yaml
    if out_dir.exists():
        if not out_dir.is_dir():
            raise TrtQatError(f"'{out_dir}' exists and is not a directory; pass another --out")
        if any(out_dir.iterdir()) and not (existing and existing.get("name") == GENERATOR_NAME):
            raise TrtQatError(f"'{out_dir}' is not empty and holds no digits-det dataset; refusing to overwrite it, "
                              "pass an empty or new --out directory")

    ensure_dir(out_dir.parent)
    scans, labels, train_idx, val_idx = _digit_scans()
    tmp_root = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        counts = {}
        for split, n, pool in (("train", n_train, train_idx), ("val", n_val, val_idx), ("calib", n_calib, train_idx)):
            counts[split] = _write_split(tmp_root, split, int(n), int(seed), scans, labels, pool,
                                         int(min_canvas), int(max_canvas), int(max_digits))
        (tmp_root / "data.yaml").write_text(_data_yaml_text(out_dir, params))
        _replace_dir(tmp_root, out_dir)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    LOG.debug("digits-det boxes per split: %s", counts)
    return data_yaml


def _existing_path(data_yaml: Path):
    import yaml

    with contextlib.suppress(OSError, yaml.YAMLError, AttributeError):
        return yaml.safe_load(data_yaml.read_text()).get("path")
    return None


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished ``src`` onto ``dst``; an old ``dst`` is moved aside first, then deleted."""
    trash = None
    if dst.exists():
        trash = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".old"))
        os.replace(dst, trash / dst.name)
    os.replace(src, dst)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def count_boxes(label_dir: Path) -> int:
    """The number of boxes (label lines) in a split's label directory."""
    return sum(len(p.read_text().splitlines()) for p in label_dir.glob("*.txt"))
