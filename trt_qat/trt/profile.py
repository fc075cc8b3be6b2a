"""Shape flags and optimization profiles: trtexec's ``--minShapes``/``--optShapes``/``--maxShapes`` and
``--batch MIN:OPT:MAX``, checked against the ONNX's inputs on CPU (no ``tensorrt``).

A profile is ``{input name: (min shape, opt shape, max shape)}``, what
``IOptimizationProfile.set_shape`` takes for each input (see :func:`trt_qat.trt.build.build_engine`).
"""
from __future__ import annotations

from trt_qat.errors import LOG, TrtQatError

__all__ = ["parse_shapes", "parse_batch", "resolve_profile"]


def parse_shapes(text) -> dict:
    """Parse a trtexec shapes flag: ``"images:1x3x640x640,mask:1x1"`` -> ``{"images": (1, 3, 640, 640), ...}``.

    Input names may be quoted (``'images':1x3x8x8``) and may contain ``:`` (the last ``:`` splits).

    Args:
        text (str | None): the flag value.

    Returns:
        dict[str, tuple[int, ...]]: the shapes ({} for None or "").

    Raises:
        TrtQatError: an item is not ``NAME:DxDxD...``, a dimension is not a positive integer, or an input is
            given twice.
    """
    if text is None or not str(text).strip():
        return {}
    shapes = {}
    for item in str(text).split(","):
        item = item.strip()
        name, sep, dims = item.rpartition(":")
        name = name.strip().strip("'\"")
        if not sep or not name or not dims:
            raise TrtQatError(f"cannot read the shape '{item}'; write NAME:DxDxD..., "
                              "e.g. --optShapes images:4x3x640x640")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise TrtQatError(f"cannot read the shape '{item}': dimensions must be integers separated by 'x', "
                              "e.g. images:4x3x640x640") from None
        if any(d <= 0 for d in shape):
            raise TrtQatError(f"shape '{item}' has a dimension <= 0; every dimension must be positive")
        if name in shapes:
            raise TrtQatError(f"input '{name}' appears twice in '{text}'; give each input once")
        shapes[name] = shape
    return shapes


def parse_batch(text) -> tuple:
    """Parse ``--batch``: ``"1:8:16"`` -> (1, 8, 16); ``"8"`` -> (8, 8, 8); ``"1:16"`` -> (1, 16, 16).

    Args:
        text (str): the flag value, ``MIN:OPT:MAX``, ``MIN:MAX`` or ``N``.

    Returns:
        tuple[int, int, int]: (min, opt, max).

    Raises:
        TrtQatError: not integers, more than three of them, or not ``1 <= MIN <= OPT <= MAX``.
    """
    parts = str(text).strip().split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise TrtQatError(f"cannot read --batch '{text}'; write MIN:OPT:MAX, e.g. --batch 1:8:16") from None
    if len(values) == 1:
        values = values * 3
    elif len(values) == 2:
        values = [values[0], values[1], values[1]]
    elif len(values) != 3:
        raise TrtQatError(f"cannot read --batch '{text}'; write MIN:OPT:MAX, e.g. --batch 1:8:16")
    if values[0] < 1 or not values[0] <= values[1] <= values[2]:
        raise TrtQatError(f"--batch '{text}' must satisfy 1 <= MIN <= OPT <= MAX")
    return tuple(values)


def resolve_profile(inputs: dict, min_shapes=None, opt_shapes=None, max_shapes=None, batch=None) -> dict:
    """Build the optimization profile ``{name: (min, opt, max)}`` from the flags and the ONNX's inputs.

    Args:
        inputs (dict): ``{name: [dim or None]}`` from :func:`trt_qat.onnx.io.onnx_inputs`.
        min_shapes, opt_shapes, max_shapes (str | dict | None): trtexec-style shapes (see :func:`parse_shapes`).
            A missing one of min/max defaults to opt.
        batch (str | tuple | None): ``MIN:OPT:MAX`` for dimension 0 of every input (other dims from the ONNX).

    Returns:
        dict[str, tuple[tuple, tuple, tuple]]: the profile; {} when every input is static and no flag is given.

    Raises:
        TrtQatError: the flags conflict, name unknown inputs, or do not fit an input's rank or fixed dimensions.
    """
    mins, opts, maxs = (s if isinstance(s, dict) else parse_shapes(s) for s in (min_shapes, opt_shapes, max_shapes))
    if batch is not None and (mins or opts or maxs):
        raise TrtQatError("give either --batch or --minShapes/--optShapes/--maxShapes, not both")
    profile = {}
    if batch is not None:
        b = parse_batch(batch) if not isinstance(batch, (tuple, list)) else tuple(batch)
        for name, dims in inputs.items():
            if not dims:
                raise TrtQatError(f"input '{name}' has no known rank, so --batch cannot apply; use --minShapes/"
                                  "--optShapes/--maxShapes")
            rest = dims[1:]
            if any(d is None for d in rest):
                raise TrtQatError(f"input '{name}' has dynamic non-batch dimensions {dims}; give them with "
                                  "--minShapes/--optShapes/--maxShapes instead of --batch")
            if dims[0] is not None and not b[0] == b[2] == dims[0]:
                raise TrtQatError(f"input '{name}' has a fixed batch of {dims[0]}; re-export the ONNX with a "
                                  "dynamic batch (`trt-qat export --dynamic-batch`) to use --batch")
            profile[name] = tuple(tuple([v] + list(rest)) for v in b)
        return profile

    given = set(mins) | set(opts) | set(maxs)
    unknown = sorted(given - set(inputs))
    if unknown:
        raise TrtQatError(f"shape flags name unknown inputs {unknown}; the ONNX's inputs are {sorted(inputs)}")
    for name, dims in inputs.items():
        dynamic = any(d is None for d in dims)
        if name not in given:
            if dynamic:
                if dims and dims[0] is None and all(d is not None for d in dims[1:]):
                    LOG.warning("input '%s' has a dynamic batch and no profile was given; building for batch 1 "
                                "(use --batch MIN:OPT:MAX for a range)", name)
                    shape = tuple([1] + dims[1:])
                    profile[name] = (shape, shape, shape)
                else:
                    raise TrtQatError(f"input '{name}' has dynamic dimensions {dims}; give its shapes with "
                                      "--minShapes/--optShapes/--maxShapes")
            continue
        opt = opts.get(name) or maxs.get(name) or mins.get(name)
        mn, mx = mins.get(name, opt), maxs.get(name, opt)
        for label, shape in (("min", mn), ("opt", opt), ("max", mx)):
            if len(shape) != len(dims):
                raise TrtQatError(f"--{label}Shapes for '{name}' has rank {len(shape)} but the input has rank "
                                  f"{len(dims)} ({dims})")
            for i, (s, d) in enumerate(zip(shape, dims)):
                if d is not None and s != d:
                    raise TrtQatError(f"--{label}Shapes for '{name}' sets dimension {i} to {s} but the ONNX fixes "
                                      f"it at {d}")
        if not all(a <= b <= c for a, b, c in zip(mn, opt, mx)):
            raise TrtQatError(f"shapes for '{name}' must satisfy min <= opt <= max in every dimension "
                              f"(got {mn}, {opt}, {mx})")
        profile[name] = (tuple(mn), tuple(opt), tuple(mx))
    return profile
