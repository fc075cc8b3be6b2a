"""A small YOLOv5-style (v6.x layout) detector, written for this project.

Backbone ``Conv(6x6, s2) -> [Conv(s2) + C3] x4 -> SPPF``, a PAN neck (nearest ``nn.Upsample`` + ``torch.cat``),
and a ``Detect`` head with 3 levels (strides 8, 16, 32) and 3 anchors per level. Anchors are sized for a 128-px
input and objects of roughly 10-80 px (the digits-det demo draws 14-48 px digits).

* ``model.train()``: ``forward`` returns a list of 3 raw maps ``[B, na, H, W, 5 + nc]`` (for :mod:`.loss`).
* ``model.eval()``: ``forward`` returns one decoded tensor ``[B, N, 5 + nc]`` =
  ``(cx, cy, w, h`` in input pixels, ``objectness, class probabilities)``, built only from tensor ops so that
  the TorchScript ONNX exporter keeps a dynamic batch axis.

Residual adds are written as plain ``x + y`` and concats as ``torch.cat``: the quantization rules find and
replace them in the exported graph.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from trt_qat.errors import TrtQatError
from trt_qat.fileio import atomic_torch_save

__all__ = ["ConvBNAct", "Bottleneck", "C3", "SPPF", "Detect", "YoloDetector", "build_model", "MODEL_NAMES",
           "SCALES", "DEFAULT_ANCHORS", "DEFAULT_STRIDES", "save_checkpoint", "load_checkpoint", "model_from_cfg",
           "model_from_checkpoint"]

#: (width multiple, depth multiple) per scale, as in YOLOv5
SCALES = {"n": (0.25, 0.33), "s": (0.5, 0.33)}
MODEL_NAMES = tuple(f"yolo-{s}" for s in SCALES)
DEFAULT_STRIDES = (8, 16, 32)
#: anchors in input pixels, one row per level (w0, h0, w1, h1, w2, h2); digits are taller than wide
DEFAULT_ANCHORS = (
    (8, 12, 12, 16, 15, 22),     # P3/8
    (20, 26, 24, 34, 32, 40),    # P4/16
    (38, 50, 48, 62, 64, 80),    # P5/32
)
#: objects expected per 128-px image, used for the objectness bias prior
_OBJECTS_PER_IMAGE = 4.0
_PRIOR_IMGSZ = 128


def _make_divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


class ConvBNAct(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + SiLU, 'same' padding for odd kernels unless ``p`` is given."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 conv -> 3x3 conv, with a residual add when ``shortcut`` and the channel counts match."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = ConvBNAct(c1, c_, 1, 1)
        self.cv2 = ConvBNAct(c_, c2, 3, 1)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C3(nn.Module):
    """CSP block with 3 convs: ``cv3(cat(m(cv1(x)), cv2(x)))``."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = ConvBNAct(c1, c_, 1, 1)
        self.cv2 = ConvBNAct(c1, c_, 1, 1)
        self.cv3 = ConvBNAct(2 * c_, c2, 1, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: one MaxPool2d(5, 1, 2) applied three times, concat, 1x1 conv."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = ConvBNAct(c1, c_, 1, 1)
        self.cv2 = ConvBNAct(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        y3 = self.m(y2)
        return self.cv2(torch.cat((x, y1, y2, y3), 1))


class Detect(nn.Module):
    """Detection head: one 1x1 conv (with bias) per level to ``na * (5 + nc)`` channels, and the v6 decode.

    Args:
        nc (int): number of classes.
        ch (tuple[int]): input channels per level.
        anchors (sequence): per level, flat (w, h) pairs in input pixels.
        strides (sequence[int]): stride per level.
    """

    def __init__(self, nc: int, ch, anchors=DEFAULT_ANCHORS, strides=DEFAULT_STRIDES):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        if len(ch) != self.nl or len(strides) != self.nl:
            raise TrtQatError(f"Detect got {len(ch)} input levels, {len(anchors)} anchor rows and {len(strides)} "
                              "strides; give one anchor row and one stride per level")
        # buffers follow .to(device) and are saved with the state dict
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, self.na, 2))
        self.register_buffer("stride", torch.tensor(strides, dtype=torch.float32))
        self.m = nn.ModuleList(nn.Conv2d(c, self.na * self.no, 1) for c in ch)

    def initialize_biases(self, objects_per_image: float = _OBJECTS_PER_IMAGE, imgsz: int = _PRIOR_IMGSZ):
        """YOLOv5-style priors: objectness ~ objects per image / cells, class ~ 0.6 / (nc - 0.99)."""
        for conv, s in zip(self.m, self.stride.tolist()):
            b = conv.bias.detach().view(self.na, self.no)
            b[:, 4] += math.log(objects_per_image / (imgsz / s) ** 2)
            b[:, 5:] += math.log(0.6 / (self.nc - 0.99)) if self.nc > 1 else 0.0
            conv.bias.data.copy_(b.view(-1))

    def forward(self, xs):
        outs = []
        for i, x in enumerate(xs):
            # [B, na*no, H, W] -> [B, na, H, W, no] without reading the batch size
            x = self.m[i](x).unflatten(1, (self.na, self.no)).permute(0, 1, 3, 4, 2).contiguous()
            outs.append(x if self.training else self._decode(x, i))
        return outs if self.training else torch.cat(outs, 1)

    def _decode(self, x, i: int):
        ny, nx = x.shape[2], x.shape[3]
        ys = torch.arange(ny, device=x.device, dtype=x.dtype)
        xs = torch.arange(nx, device=x.device, dtype=x.dtype)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack((gx, gy), -1).unsqueeze(0).unsqueeze(0)          # [1, 1, H, W, 2]
        anchor = self.anchors[i].to(x.dtype).view(1, self.na, 1, 1, 2)      # pixels
        y = x.sigmoid()
        xy = (y[..., 0:2] * 2.0 - 0.5 + grid) * self.stride[i].to(x.dtype)
        wh = (y[..., 2:4] * 2.0) ** 2 * anchor
        return torch.cat((xy, wh, y[..., 4:]), -1).flatten(1, 3)            # [B, na*H*W, no]


class YoloDetector(nn.Module):
    """YOLOv5-style detector (v6 layout) with width/depth multiples.

    Args:
        nc (int): number of classes. Defaults to 10.
        scale (str): "n" (width 0.25, depth 0.33) or "s" (0.5, 0.33). Defaults to "n".
        anchors (sequence): per level, flat (w, h) pairs in input pixels. Defaults to ``DEFAULT_ANCHORS``.
        strides (sequence[int]): must be (8, 16, 32) for this layout. Defaults to ``DEFAULT_STRIDES``.
        in_ch (int): input channels. Defaults to 3.
        name (str): model name stored in ``cfg``. Defaults to ``f"yolo-{scale}"``.
    """

    def __init__(self, nc: int = 10, scale: str = "n", anchors=DEFAULT_ANCHORS, strides=DEFAULT_STRIDES,
                 in_ch: int = 3, name: str | None = None):
        super().__init__()
        if scale not in SCALES:
            raise TrtQatError(f"unknown YOLO scale '{scale}'; use one of {sorted(SCALES)}")
        if tuple(int(s) for s in strides) != DEFAULT_STRIDES:
            raise TrtQatError(f"strides {tuple(strides)} do not match this layout; use {DEFAULT_STRIDES}")
        if int(nc) < 1:
            raise TrtQatError(f"nc={nc} is invalid; the detector needs at least one class")
        gw, gd = SCALES[scale]
        c = [_make_divisible(v * gw) for v in (64, 128, 256, 512, 1024)]

        def n(k):
            return max(round(k * gd), 1)

        self.cfg = {"name": name or f"yolo-{scale}", "nc": int(nc), "scale": scale, "in_ch": int(in_ch),
                    "anchors": [list(map(float, a)) for a in anchors], "strides": [int(s) for s in strides]}
        self.nc = int(nc)
        # backbone
        self.stem = ConvBNAct(in_ch, c[0], 6, 2, 2)                   # P1/2
        self.down1 = ConvBNAct(c[0], c[1], 3, 2)                      # P2/4
        self.stage1 = C3(c[1], c[1], n(3))
        self.down2 = ConvBNAct(c[1], c[2], 3, 2)                      # P3/8
        self.stage2 = C3(c[2], c[2], n(6))
        self.down3 = ConvBNAct(c[2], c[3], 3, 2)                      # P4/16
        self.stage3 = C3(c[3], c[3], n(9))
        self.down4 = ConvBNAct(c[3], c[4], 3, 2)                      # P5/32
        self.stage4 = C3(c[4], c[4], n(3))
        self.sppf = SPPF(c[4], c[4], 5)
        # PAN neck, top-down
        self.lat5 = ConvBNAct(c[4], c[3], 1, 1)
        self.up5 = nn.Upsample(scale_factor=2, mode="nearest")
        self.td4 = C3(c[3] * 2, c[3], n(3), shortcut=False)
        self.lat4 = ConvBNAct(c[3], c[2], 1, 1)
        self.up4 = nn.Upsample(scale_factor=2, mode="nearest")
        self.out3 = C3(c[2] * 2, c[2], n(3), shortcut=False)          # P3 out
        # bottom-up
        self.pan3 = ConvBNAct(c[2], c[2], 3, 2)
        self.out4 = C3(c[2] * 2, c[3], n(3), shortcut=False)          # P4 out
        self.pan4 = ConvBNAct(c[3], c[3], 3, 2)
        self.out5 = C3(c[3] * 2, c[4], n(3), shortcut=False)          # P5 out
        self.detect = Detect(nc, (c[2], c[3], c[4]), anchors, strides)
        self.detect.initialize_biases()

    @property
    def stride(self) -> torch.Tensor:
        return self.detect.stride

    def forward(self, x):
        x = self.stage1(self.down1(self.stem(x)))
        p3 = self.stage2(self.down2(x))
        p4 = self.stage3(self.down3(p3))
        p5 = self.sppf(self.stage4(self.down4(p4)))
        l5 = self.lat5(p5)
        t4 = self.td4(torch.cat((self.up5(l5), p4), 1))
        l4 = self.lat4(t4)
        o3 = self.out3(torch.cat((self.up4(l4), p3), 1))
        o4 = self.out4(torch.cat((self.pan3(o3), l4), 1))
        o5 = self.out5(torch.cat((self.pan4(o4), l5), 1))
        return self.detect([o3, o4, o5])


def build_model(name: str = "yolo-n", nc: int = 10, **kwargs) -> YoloDetector:
    """Build a built-in detector by name.

    Args:
        name (str): "yolo-n" or "yolo-s". Defaults to "yolo-n".
        nc (int): number of classes. Defaults to 10.
        **kwargs: passed to :class:`YoloDetector` (anchors, strides, in_ch).

    Returns:
        YoloDetector: freshly initialised model (train mode).
    """
    key = str(name).lower()
    if key not in MODEL_NAMES:
        raise TrtQatError(f"unknown model '{name}'; built-in models are {list(MODEL_NAMES)}")
    return YoloDetector(nc=nc, scale=key.split("-", 1)[1], name=key, **kwargs)


def model_from_cfg(cfg: dict) -> YoloDetector:
    """The (untrained) detector described by a checkpoint's ``model_cfg``.

    Raises:
        TrtQatError: when ``cfg`` lacks a key or holds a value of the wrong kind (a damaged checkpoint).
    """
    if not isinstance(cfg, dict):
        raise TrtQatError(f"the checkpoint's model_cfg is a {type(cfg).__name__}, not a mapping; re-create the "
                          "checkpoint with `trt-qat train` / `trt-qat calibrate`")
    missing = [k for k in ("nc", "scale", "anchors", "strides") if k not in cfg]
    if missing:
        raise TrtQatError(f"the checkpoint's model_cfg lacks {', '.join(repr(k) for k in missing)}; it is damaged "
                          "or was not written by trt_qat: re-create it with `trt-qat train` / `trt-qat calibrate`")
    try:
        return YoloDetector(nc=int(cfg["nc"]), scale=cfg["scale"], anchors=[tuple(a) for a in cfg["anchors"]],
                            strides=cfg["strides"], in_ch=int(cfg.get("in_ch", 3)), name=cfg.get("name"))
    except (TypeError, ValueError) as exc:
        raise TrtQatError(f"the checkpoint's model_cfg is malformed ({exc}); re-create it with `trt-qat train` / "
                          "`trt-qat calibrate`") from None


def save_checkpoint(model: YoloDetector, path, **extra) -> Path:
    """Write ``{"model_cfg", "state_dict", **extra}`` atomically with ``torch.save``.

    Args:
        model (YoloDetector): model to save (its ``cfg`` is stored so it can be rebuilt).
        path (str | Path): destination ``.pt`` file.
        **extra: other picklable entries (epoch, metrics, optimizer state, ...).

    Returns:
        Path: the written path.
    """
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise TrtQatError(f"{type(model).__name__} has no .cfg; only built-in detectors can be saved this way")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"model_cfg": dict(cfg), "state_dict": state, **extra}, path)
    return Path(path)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by :func:`save_checkpoint`.

    Args:
        path (str | Path): checkpoint file.
        map_location: passed to ``torch.load``. Defaults to "cpu".

    Returns:
        tuple[YoloDetector, dict]: the rebuilt model (eval mode) and the whole checkpoint dict.
    """
    from trt_qat.fileio import read_checkpoint

    ckpt = read_checkpoint(path, hint="train one with `trt-qat train` or check the path")
    return model_from_checkpoint(ckpt, path), ckpt


def model_from_checkpoint(ckpt: dict, path="<checkpoint>") -> YoloDetector:
    """Rebuild the model (eval mode) from a checkpoint dict written by :func:`save_checkpoint`."""
    if isinstance(ckpt, dict) and ckpt.get("format") == "trt_qat.quantized/1":
        raise TrtQatError(f"checkpoint '{path}' is a quantized (calibrate/qat) checkpoint; this step needs the FP32 "
                          "one written by `trt-qat train`")
    if not isinstance(ckpt, dict) or "model_cfg" not in ckpt or "state_dict" not in ckpt:
        raise TrtQatError(f"checkpoint '{path}' has no 'model_cfg'/'state_dict'; "
                          "it was not written by trt_qat.models.yolo.save_checkpoint")
    try:
        model = model_from_cfg(ckpt["model_cfg"])
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise TrtQatError(f"checkpoint '{path}' does not match its model config ({str(exc).splitlines()[0]}); "
                          "re-create it") from None
    return model.eval()

