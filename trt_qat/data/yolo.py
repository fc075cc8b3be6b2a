"""YOLO-format datasets: ``data.yaml`` loading, a letterboxing torch Dataset, COCO ground truth, and a loader.

Layout (the standard one): a split is a directory of images (``.../images/<split>/x.png``) whose labels live at
the same path with the last ``/images/`` replaced by ``/labels/`` and a ``.txt`` extension, one object per line
``cls cx cy w h`` (normalized 0-1). A split may also be a ``.txt`` file listing image paths, one per line —
that is how calibration image lists under ``calib/`` are stored (see :func:`write_image_list`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from trt_qat.data.transforms import letterbox, xywhn_to_xyxy, xyxy_to_xywhn
from trt_qat.errors import LOG, TrtQatError
from trt_qat.fileio import atomic_write_text

__all__ = [
    "IMAGE_EXTENSIONS",
    "DetectionDataset",
    "YoloDataset",
    "build_dataloader",
    "collate_fn",
    "label_path_for",
    "load_data_yaml",
    "read_image_list",
    "write_image_list",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SPLIT_KEYS = ("train", "val", "test", "calib")
_BOX_TOLERANCE = 0.01  # normalized coordinates may exceed [0, 1] by this much (then they are clipped)
_MAKE_DATA_HINT = "run `trt-qat make-data` or pass --data path/to/data.yaml"


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
    """(h, w) of a decodable image, or raise with a reason (cheap: header + PIL verify)."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        im.verify()
    if w < 1 or h < 1:
        raise ValueError("empty image")
    return int(h), int(w)


def _parse_label_file(path: Path, nc: int):
    """Return (labels float32 [n,5] normalized cls,cx,cy,w,h; list of (line_no, reason) for skipped lines)."""
    rows, bad = [], []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return np.zeros((0, 5), np.float32), [(0, f"unreadable ({type(exc).__name__})")]
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
class DetectionDataset(torch.utils.data.Dataset):
    """Common base of :class:`YoloDataset` and :class:`~trt_qat.data.coco.CocoDataset`.

    Subclasses fill ``image_paths`` (list[Path]), ``shapes`` (list of original (h, w)), ``labels`` (list of float32
    [n,5] arrays: cls, cx, cy, w, h normalized to the ORIGINAL image), ``nc``, ``names``; this class does the
    loading, letterboxing, augmentation and COCO ground truth.
    """

    image_paths: list
    shapes: list
    labels: list
    nc: int
    names: list

    def __init__(self, imgsz=128, augment: bool = False, cache: bool = False):
        self.imgsz = imgsz
        self.augment = bool(augment)
        self.cache = bool(cache)
        self._cache: dict = {}

    # -- torch Dataset protocol
    def __len__(self) -> int:
        return len(self.image_paths)

    def load_image(self, i: int) -> np.ndarray:
        """The original image ``i`` as HxWx3 uint8 RGB."""
        from PIL import Image

        if i in self._cache:
            return self._cache[i]
        path = self.image_paths[i]
        try:
            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as exc:
            raise TrtQatError(f"image '{path}' cannot be decoded ({exc}); remove it from the dataset") from None
        if self.cache:
            self._cache[i] = img
        return img

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} images")
        img0 = self.load_image(i)
        h0, w0 = img0.shape[:2]
        img, ratio, pad = letterbox(img0, self.imgsz)
        out_h, out_w = img.shape[:2]
        labels = self.labels[i]
        boxes = xywhn_to_xyxy(labels[:, 1:5], w0 * ratio, h0 * ratio, pad[0], pad[1])
        cls = labels[:, 0].astype(np.float64)
        if self.augment:
            img, boxes, cls = _augment(img, boxes, cls)
        xywhn = xyxy_to_xywhn(boxes, out_w, out_h)
        target = np.concatenate([cls[:, None], xywhn], axis=1).astype(np.float32).reshape(-1, 5)
        img_t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)
        meta = {"image_id": int(i), "path": str(self.image_paths[i]), "orig_shape": (int(h0), int(w0)),
                "ratio": float(ratio), "pad": (float(pad[0]), float(pad[1]))}
        return img_t, torch.from_numpy(target), meta

    # -- evaluation
    def coco_ground_truth(self) -> dict:
        """Ground truth in COCO format, boxes in original-image pixels, ``category_id`` = class index,
        ``image_id`` = dataset index (as in ``meta['image_id']``)."""
        images, annotations = [], []
        ann_id = 1
        for i, (path, (h, w), labels) in enumerate(zip(self.image_paths, self.shapes, self.labels)):
            images.append({"id": i, "file_name": Path(path).name, "height": int(h), "width": int(w)})
            for cls, cx, cy, bw, bh in labels.astype(np.float64).tolist():
                x, y, pw, ph = (cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h
                annotations.append({"id": ann_id, "image_id": i, "category_id": int(cls),
                                    "bbox": [x, y, pw, ph], "area": pw * ph, "iscrowd": 0})
                ann_id += 1
        categories = [{"id": c, "name": name, "supercategory": "object"} for c, name in enumerate(self.names)]
        return {"info": {"description": f"trt_qat ground truth ({type(self).__name__})"}, "licenses": [],
                "images": images, "annotations": annotations, "categories": categories}

    def _set_items(self, kept: list, where: str) -> None:
        """Store the kept ``(path, (h, w), labels)`` items; raise if there are none."""
        if not kept:
            raise TrtQatError(f"no images found in '{where}'; put images ({', '.join(IMAGE_EXTENSIONS)}) there "
                              "or fix the split path")
        self.image_paths = [Path(k[0]) for k in kept]
        self.shapes = [tuple(k[1]) for k in kept]
        self.labels = [k[2] for k in kept]


def _augment(img: np.ndarray, boxes: np.ndarray, cls: np.ndarray):
    """Digit-safe augmentation on a letterboxed image (no flips): brightness/colour jitter and a random
    scale + translate about the centre. Boxes (pixel xyxy) follow; boxes mostly pushed out are dropped."""
    from PIL import Image

    h, w = img.shape[:2]
    r = torch.rand(7).tolist()
    gain = 0.75 + 0.5 * r[0]
    channel = np.array([0.92 + 0.16 * r[1], 0.92 + 0.16 * r[2], 0.92 + 0.16 * r[3]], dtype=np.float32)
    out = np.clip(img.astype(np.float32) * (gain * channel), 0, 255).astype(np.uint8)

    s = 0.75 + 0.5 * r[4]
    tx, ty = (r[5] - 0.5) * 0.2 * w, (r[6] - 0.5) * 0.2 * h
    cx, cy = w / 2.0, h / 2.0
    # PIL wants the inverse map: output (x', y') samples input ((x' - c - t) / s + c)
    inv = (1 / s, 0.0, cx - (cx + tx) / s, 0.0, 1 / s, cy - (cy + ty) / s)
    out = np.asarray(Image.fromarray(out).transform((w, h), Image.AFFINE, inv, resample=Image.BILINEAR,
                                                    fillcolor=(114, 114, 114)))
    if len(boxes):
        moved = boxes.copy()
        moved[:, [0, 2]] = s * (boxes[:, [0, 2]] - cx) + cx + tx
        moved[:, [1, 3]] = s * (boxes[:, [1, 3]] - cy) + cy + ty
        area = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
        moved[:, [0, 2]] = moved[:, [0, 2]].clip(0, w)
        moved[:, [1, 3]] = moved[:, [1, 3]].clip(0, h)
        bw, bh = moved[:, 2] - moved[:, 0], moved[:, 3] - moved[:, 1]
        keep = (bw > 2) & (bh > 2) & (bw * bh >= 0.6 * area)
        boxes, cls = moved[keep], cls[keep]
    return out, boxes, cls


def _scan_split(paths: list, label_of, where: str):
    """Probe images and parse labels; return kept (path, (h, w), labels) and log one warning per problem kind."""
    kept, bad_images = [], []
    bad_lines, bad_files = 0, 0
    first_bad_line = None
    for p in paths:
        try:
            shape = _probe_image(p)
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
    ratio, pad (pad_w, pad_h)).

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
        self._set_items(_scan_split(paths, self._read_labels, where), where)

    def _read_labels(self, image_path):
        path = label_path_for(image_path)
        if not path.is_file():
            return np.zeros((0, 5), np.float32), []
        return _parse_label_file(path, self.nc)


# ---------------------------------------------------------------------------------------------------- batching
def collate_fn(batch):
    """Stack a list of ``(img, labels, meta)`` into ``(imgs [B,3,H,W], targets [N,6], metas)``;
    targets rows are ``(batch_idx, cls, cx, cy, w, h)``."""
    imgs, labels, metas = zip(*batch)
    targets = [torch.cat([torch.full((len(lb), 1), float(i), dtype=torch.float32), lb.float()], dim=1)
               for i, lb in enumerate(labels)]
    return torch.stack(imgs, 0), torch.cat(targets, 0).reshape(-1, 6), list(metas)


def build_dataloader(dataset, batch_size: int = 16, shuffle: bool = False, workers: int = 0, sampler=None,
                     drop_last: bool = False):
    """A ``torch.utils.data.DataLoader`` over a detection dataset with :func:`collate_fn`.

    Args:
        dataset (DetectionDataset): The dataset.
        batch_size (int): Images per batch. Defaults to 16.
        shuffle (bool): Shuffle each epoch (ignored when ``sampler`` is given). Defaults to False.
        workers (int): Loader worker processes. Defaults to 0 (load in the main process).
        sampler (torch.utils.data.Sampler | None): E.g. a DistributedSampler. Defaults to None.
        drop_last (bool): Drop the last incomplete batch. Defaults to False.
    """
    workers = max(int(workers), 0)
    return torch.utils.data.DataLoader(
        dataset, batch_size=int(batch_size), shuffle=bool(shuffle) and sampler is None, sampler=sampler,
        num_workers=workers, collate_fn=collate_fn, drop_last=bool(drop_last),
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
