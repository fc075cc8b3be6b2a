"""Tests of image decoding (trt_qat.data.dataset.decode_rgb) for every PIL mode, EXIF orientation and the size probe
of the dataset scan, and of label or image paths that exist but are not readable files."""
from __future__ import annotations

import json
import logging
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageOps, PngImagePlugin

from trt_qat.__main__ import main as dispatch
from trt_qat.data.coco import CocoDataset
from trt_qat.data.dataset import decode_rgb
from trt_qat.data.yolo import YoloDataset
from trt_qat.errors import TrtQatError

SIXTEEN = np.array([[0, 256, 32768], [65535, 257, 1000]], np.uint16)
SIXTEEN_AS_8BIT = np.array([[0, 1, 128], [255, 1, 3]], np.uint8)  # the high byte
RGB = np.arange(18, dtype=np.uint8).reshape(2, 3, 3) * 13  # 2x3 px, every value distinct


def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        out = decode_rgb(im, path)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.flags.c_contiguous
    return out


def _grey3(grey) -> np.ndarray:
    return np.repeat(np.asarray(grey, np.uint8)[:, :, None], 3, axis=2)


def _old_decode(path: Path) -> np.ndarray:
    """How trt_qat decoded every image before decode_rgb."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _write_png16(path: Path, arr: np.ndarray, color_type: int) -> Path:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB): color_type 0 grey, 2 RGB."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw))
                     + _png_chunk(b"IEND", b""))
    return path


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _yolo_set(root: Path, images: dict, labels: dict | None = None) -> Path:
    """A val split with ``images`` (file name -> PIL image, saved with its save kwargs) and label texts."""
    img_dir, lbl_dir = root / "images" / "val", root / "labels" / "val"
    img_dir.mkdir(parents=True)
    lbl_dir.mkdir(parents=True)
    for name, (im, kwargs) in images.items():
        im.save(img_dir / name, **kwargs)
        (lbl_dir / (Path(name).stem + ".txt")).write_text((labels or {}).get(name, "0 0.5 0.5 0.5 0.5\n"))
    (root / "data.yaml").write_text(yaml.safe_dump({"path": str(root), "val": "images/val", "nc": 1,
                                                    "names": ["a"]}))
    return root / "data.yaml"


# ------------------------------------------------------------------------------------------------ 16-bit and int
def test_16bit_grey_png_is_scaled_by_its_high_byte_not_clipped(tmp_path):
    Image.fromarray(SIXTEEN).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
    assert np.array_equal(_decode(tmp_path / "g16.png"), _grey3(SIXTEEN_AS_8BIT))


def test_16bit_grey_png_decodes_like_pil_reads_the_same_16bit_rgb_png(tmp_path):
    grey = _write_png16(tmp_path / "g16.png", SIXTEEN, color_type=0)
    rgb = _write_png16(tmp_path / "rgb16.png", np.stack([SIXTEEN] * 3, axis=-1), color_type=2)
    with Image.open(rgb) as im:
        assert im.mode == "RGB"  # PIL reads 16-bit RGB by the high byte itself
    assert np.array_equal(_decode(grey), _decode(rgb))
    assert np.array_equal(_decode(grey), _grey3(SIXTEEN_AS_8BIT))


@pytest.mark.parametrize("mode, dtype", [("I;16", "<u2"), ("I;16B", ">u2")])
def test_16bit_tiff_either_byte_order(tmp_path, mode, dtype):
    Image.frombytes(mode, (3, 2), SIXTEEN.astype(dtype).tobytes()).save(tmp_path / "g.tif")
    with Image.open(tmp_path / "g.tif") as im:
        assert im.mode == mode
    assert np.array_equal(_decode(tmp_path / "g.tif"), _grey3(SIXTEEN_AS_8BIT))


def test_32bit_int_read_as_16bit_when_it_fits_else_refused(tmp_path):
    Image.fromarray(SIXTEEN.astype(np.int32)).save(tmp_path / "i.tif")
    with Image.open(tmp_path / "i.tif") as im:
        assert im.mode == "I"
    assert np.array_equal(_decode(tmp_path / "i.tif"), _grey3(SIXTEEN_AS_8BIT))
    (tmp_path / "g.pgm").write_bytes(b"P5 3 2 1023\n" + np.array([[0, 512, 1023], [1, 2, 3]], ">u2").tobytes())
    with Image.open(tmp_path / "g.pgm") as im:
        assert im.mode == "I"  # PIL scales a 10-bit PGM to 0..65535: 0, 32800, 65535, 64, 128, 192
    assert np.array_equal(_decode(tmp_path / "g.pgm"), _grey3([[0, 128, 255], [0, 0, 0]]))
    for bad, span in ((70000, "256..70000"), (-1, "-1..65535")):
        values = SIXTEEN.astype(np.int32)
        values[0, 0] = bad
        Image.fromarray(values).save(tmp_path / "bad.tif")
        with pytest.raises(TrtQatError, match=f"32-bit integer pixels in {span}, outside") as exc:
            _decode(tmp_path / "bad.tif")
        assert "bad.tif" in str(exc.value) and "\n" not in str(exc.value)


def test_float_lab_and_unknown_modes_refused(tmp_path):
    Image.fromarray(SIXTEEN.astype(np.float32) / 65535).save(tmp_path / "f.tif")
    with pytest.raises(TrtQatError, match=r"f\.tif' has 32-bit float pixels \(PIL mode F\).*convert it to"):
        _decode(tmp_path / "f.tif")
    with pytest.raises(TrtQatError, match="CIE Lab pixels"):
        decode_rgb(Image.new("LAB", (3, 2), (255, 128, 128)))
    with pytest.raises(TrtQatError, match="image 'x.png' has pixels of PIL mode La"):
        decode_rgb(Image.new("La", (3, 2)), "x.png")


def test_refused_mode_stops_the_dataset_scan(tmp_path):
    data = _yolo_set(tmp_path, {"ok.png": (Image.fromarray(RGB), {}),
                                "f.tif": (Image.fromarray(SIXTEEN.astype(np.float32)), {})})
    with pytest.raises(TrtQatError, match=r"f\.tif' has 32-bit float pixels"):
        YoloDataset(data, split="val")  # refused at the scan, not skipped or met halfway through an eval


# ---------------------------------------------------------------------------------- palette, CMYK, grey, alpha
def _palette(transparency=None) -> Image.Image:
    im = Image.new("P", (3, 2))
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])
    im.putdata([0, 1, 2, 3, 0, 1])
    if transparency is not None:
        im.info["transparency"] = transparency
    return im


PALETTE_RGB = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[10, 20, 30], [255, 0, 0], [0, 255, 0]]],
                       np.uint8)


@pytest.mark.parametrize("name, transparency", [("p.png", None), ("p_index.png", 3),
                                                ("p_bytes.png", b"\x00\x80\xff\x00"), ("p.gif", 3)])
def test_palette_keeps_the_stored_colours_and_drops_transparency(tmp_path, name, transparency):
    im = _palette(transparency)
    im.save(tmp_path / name, **({"transparency": transparency} if name.endswith(".gif") else {}))
    with Image.open(tmp_path / name) as opened:
        assert opened.mode == "P" and (transparency is None) == ("transparency" not in opened.info)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns on a byte-transparency palette converted straight to RGB
        assert np.array_equal(_decode(tmp_path / name), PALETTE_RGB)
    pa = _palette().convert("PA")
    assert np.array_equal(decode_rgb(pa), PALETTE_RGB)


def test_cmyk_tiff_exact_and_jpeg_close(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]],
                     [[0, 128, 0, 0], [100, 50, 200, 60], [0, 0, 0, 128]]], np.uint8)
    c = cmyk.astype(np.float64)
    expected = np.round((255 - c[..., :3]) * (255 - c[..., 3:]) / 255).astype(np.uint8)
    assert expected[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]  # white, cyan, black
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.tif")
    assert np.array_equal(_decode(tmp_path / "c.tif"), expected)
    flat = np.tile(cmyk[1, 1], (16, 16, 1))  # a flat 16x16 CMYK JPEG (Adobe-inverted on disk)
    Image.fromarray(flat, mode="CMYK").save(tmp_path / "c.jpg", quality=100)
    got = _decode(tmp_path / "c.jpg").astype(int)
    assert np.abs(got - expected[1, 1].astype(int)).max() <= 2


def test_grey_bilevel_and_alpha_modes(tmp_path):
    grey = np.array([[0, 10, 200], [255, 128, 1]], np.uint8)
    alpha = np.array([[0, 255, 128], [1, 0, 255]], np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "l.png")
    Image.fromarray(np.stack([grey, alpha], -1), mode="LA").save(tmp_path / "la.png")
    Image.fromarray(np.concatenate([RGB, alpha[..., None]], -1), mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grey > 100).save(tmp_path / "bw.png")
    assert np.array_equal(_decode(tmp_path / "l.png"), _grey3(grey))
    assert np.array_equal(_decode(tmp_path / "la.png"), _grey3(grey))  # alpha dropped, grey kept
    assert np.array_equal(_decode(tmp_path / "rgba.png"), RGB)  # even where alpha is 0
    assert np.array_equal(_decode(tmp_path / "bw.png"), _grey3(np.where(grey > 100, 255, 0)))
    opaque = Image.fromarray(np.concatenate([RGB, np.full((2, 3, 1), 255, np.uint8)], -1), mode="RGBA")
    assert np.array_equal(decode_rgb(opaque.convert("RGBa")), RGB)


def test_regular_rgb_and_grey_png_decode_exactly_as_before(tmp_path, tiny_digits_yaml):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (7, 5), dtype=np.uint8)).save(tmp_path / "l.png")
    for name in ("rgb.png", "l.png"):
        assert np.array_equal(_decode(tmp_path / name), _old_decode(tmp_path / name))
    ds = YoloDataset(tiny_digits_yaml, split="val")  # the demo dataset: 8-bit RGB PNGs
    for i, path in enumerate(ds.image_paths):
        img = ds.load_image(i)
        assert np.array_equal(img, _old_decode(path)) and ds.shapes[i] == img.shape[:2]


# ------------------------------------------------------------------------------------------------ orientation
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied_and_probe_agrees(tmp_path, orientation):
    Image.fromarray(RGB).save(tmp_path / "o.png", exif=_exif(orientation))
    with Image.open(tmp_path / "o.png") as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    got = _decode(tmp_path / "o.png")
    assert np.array_equal(got, expected)
    assert got.shape[:2] == ((3, 2) if orientation >= 5 else (2, 3))
    if orientation == 6:
        assert np.array_equal(got, np.rot90(RGB, k=-1))  # 6: the upright image is the stored one turned clockwise
    ds = YoloDataset(_yolo_set(tmp_path / "set", {"o.png": (Image.fromarray(RGB), {"exif": _exif(orientation)})}))
    assert ds.shapes[0] == got.shape[:2] and np.array_equal(ds.load_image(0), got)


def test_exif_rotated_jpeg_probe_shape_equals_decoded_shape(tmp_path):
    blocks = np.kron(np.arange(6, dtype=np.uint8).reshape(2, 3) * 40, np.ones((8, 8), np.uint8))  # 16x24 px
    arr = np.stack([blocks, 255 - blocks, blocks // 2], axis=-1)
    Image.fromarray(arr).save(tmp_path / "plain.jpg", quality=95)
    data = _yolo_set(tmp_path / "set", {"rot.jpg": (Image.fromarray(arr), {"quality": 95, "exif": _exif(6)})},
                     {"rot.jpg": "0 0.5 0.25 0.5 0.5\n"})  # drawn on the upright (24 high, 16 wide) image
    ds = YoloDataset(data, split="val")
    img = ds.load_image(0)
    assert img.shape == (24, 16, 3) and ds.shapes[0] == (24, 16) == img.shape[:2]
    # the same compressed pixels as plain.jpg, turned clockwise
    assert np.array_equal(img, np.rot90(_decode(tmp_path / "plain.jpg"), k=-1))
    _, _, meta = ds[0]
    assert meta["orig_shape"] == (24, 16)
    gt = ds.coco_ground_truth()
    assert (gt["images"][0]["height"], gt["images"][0]["width"]) == (24, 16)
    assert gt["annotations"][0]["bbox"] == pytest.approx([4.0, 0.0, 8.0, 12.0])


XMP_ORIENTATION_6 = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'


@pytest.mark.parametrize("chunk, shape", [
    (_png_chunk(b"eXIf", _exif(6).tobytes().removeprefix(b"Exif\x00\x00")), (3, 2)),
    (_png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + XMP_ORIENTATION_6), (3, 2)),
    (_png_chunk(b"tEXt", b"Comment\0" + XMP_ORIENTATION_6), (2, 3)),  # not a key PIL reads orientation from
])
def test_png_orientation_after_the_pixel_data(tmp_path, chunk, shape):
    """PIL reads a PNG's trailing chunks only when decoding: the probe must see them as decoding does."""
    root = tmp_path / "set"
    _yolo_set(root, {"o.png": (Image.fromarray(RGB), {})})
    png = root / "images" / "val" / "o.png"
    data = png.read_bytes()
    png.write_bytes(data[:-12] + chunk + data[-12:])  # just before IEND
    with Image.open(png) as im:
        assert "exif" not in im.info and "xmp" not in im.info  # not in the header
    got = _decode(png)
    assert np.array_equal(got, np.rot90(RGB, k=-1) if shape == (3, 2) else RGB)
    assert YoloDataset(root / "data.yaml").shapes == [shape]


def test_probe_does_not_decode_a_png_without_metadata(tmp_path, monkeypatch):
    data = _yolo_set(tmp_path, {"a.png": (Image.fromarray(RGB), {})})

    def no_decoding(self):
        raise AssertionError("the probe decoded a PNG")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    assert YoloDataset(data).shapes == [(2, 3)]


# ------------------------------------------------------------------------------ paths that are not readable files
def test_label_path_that_is_a_directory_is_one_error(tmp_path):
    data = _yolo_set(tmp_path, {"a.png": (Image.fromarray(RGB), {}), "b.png": (Image.fromarray(RGB), {})})
    label = tmp_path / "labels" / "val" / "b.txt"
    label.unlink()
    label.mkdir()
    with pytest.raises(TrtQatError) as exc:
        YoloDataset(data, split="val")
    msg = str(exc.value)
    assert f"label path '{label}' is a directory" in msg and "replace it with" in msg and "\n" not in msg


def test_unreadable_label_files_are_one_error(tmp_path):
    data = _yolo_set(tmp_path, {"a.png": (Image.fromarray(RGB), {})})
    label = tmp_path / "labels" / "val" / "a.txt"
    label.write_bytes(b"\xff\xfe0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(TrtQatError, match=r"label file '.*a\.txt' cannot be read \(UnicodeDecodeError"):
        YoloDataset(data, split="val")
    label.unlink()
    label.symlink_to(tmp_path / "gone.txt")
    with pytest.raises(TrtQatError, match=r"a\.txt' is not a regular file \(a broken link"):
        YoloDataset(data, split="val")
    label.unlink()
    label.write_text("0 0.5 0.5 0.2 0.2\n")
    if os.geteuid() != 0:  # root reads anything
        label.chmod(0)
        try:
            with pytest.raises(TrtQatError, match=r"a\.txt' cannot be read \(Permission denied\)"):
                YoloDataset(data, split="val")
        finally:
            label.chmod(0o644)
    assert len(YoloDataset(data, split="val").labels[0]) == 1


@pytest.mark.parametrize("problem, message", [("label_dir", "is a directory"), ("float_image", "32-bit float")])
def test_cli_reports_one_line(tmp_path, capsys, problem, message):
    data = _yolo_set(tmp_path, {"a.png": (Image.fromarray(RGB), {})})
    if problem == "label_dir":
        (tmp_path / "labels" / "val" / "a.txt").unlink()
        (tmp_path / "labels" / "val" / "a.txt").mkdir()
    else:
        Image.fromarray(SIXTEEN.astype(np.float32)).save(tmp_path / "images" / "val" / "b.tif")
    from trt_qat.models.adapter import get_adapter

    adapter = get_adapter()
    adapter.save(adapter.build("yolo-n", nc=1), tmp_path / "w.pt")
    with pytest.raises(SystemExit) as exc:
        dispatch(["eval", "--checkpoint", str(tmp_path / "w.pt"), "--data", str(data), "--imgsz", "64"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("trt_qat: error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_coco_rotated_image_and_paths_that_are_not_files(tmp_path, caplog):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    blocks = np.kron(np.arange(6, dtype=np.uint8).reshape(2, 3) * 40, np.ones((8, 8), np.uint8))
    Image.fromarray(blocks).save(img_dir / "rot.jpg", exif=_exif(6))  # stored 16x24, upright 24x16
    doc = {"images": [{"id": 1, "file_name": "rot.jpg", "height": 24, "width": 16}],
           "categories": [{"id": 5, "name": "x"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [4, 0, 8, 12]}]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="trt_qat"):
        ds = CocoDataset(ann, img_dir)
    assert not caplog.records  # the json's size is the upright one: no size mismatch
    assert ds.shapes == [(24, 16)] and ds.load_image(0).shape == (24, 16, 3)
    assert ds.labels[0][0].tolist() == pytest.approx([0, 0.5, 0.25, 0.5, 0.5])
    with pytest.raises(TrtQatError, match="'.*imgs' is a directory, not a file"):
        CocoDataset(img_dir, img_dir)
    with pytest.raises(TrtQatError, match="'.*ann.json' is a file, not a directory"):
        CocoDataset(ann, ann)
    (img_dir / "rot.jpg").unlink()
    (img_dir / "rot.jpg").mkdir()
    with pytest.raises(TrtQatError, match=r"image '.*rot\.jpg' of '.*ann\.json' is not a regular file"):
        CocoDataset(ann, img_dir)
