"""`--preprocess`: how the user's own model wants its photos, declared once at partition time.

An .onnx file or a torch factory says nothing about images, yet calibration, fidelity, the image
baselines, photo sources and the sweep all need to turn a photo into its input. The user declares it
as a named preset, optionally followed by overrides, or as overrides alone (starting from raw pixel
values 0..255):

    imagenet                              torchvision: RGB, /255, mean .485 .456 .406, std .229 .224 .225
    efficientnet-lite                     (x - 127) / 128, as the TF EfficientNet-Lite models
    raw01,resize=stretch                  x / 255, resized without keeping the aspect ratio
    scale=1/255,mean=0.5,std=0.5,color=BGR,layout=NHWC

Keys: `size` (HxW or one number), `resize` (crop | stretch), `layout` (NCHW | NHWC), `color`
(RGB | BGR), `scale`, `mean`, `std` (one value or three separated by `:`, in units after `scale`:
input = (pixel · scale − mean) / std). Size and layout default to what the model's input shape says;
a declared one that contradicts the shape is an error, found here rather than on the first photo.
The result is stored, resolved to pixel units, in the manifest's `preprocess`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from edgecut.bundle import COLORS, LAYOUTS, RESIZES, Preprocess, TensorSpec
from edgecut.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Declared:
    """What `--preprocess` said; fields left None come from the model's input shape."""

    scale: float = 1.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # after scale
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)  # after scale
    color: str = "RGB"
    resize: str = "crop"
    layout: str | None = None
    size: tuple[int, int] | None = None
    preset: str = ""


PRESETS: Mapping[str, Declared] = {
    "imagenet": Declared(1 / 255, IMAGENET_MEAN, IMAGENET_STD, preset="imagenet"),
    "efficientnet-lite": Declared(1.0, (127.0,) * 3, (128.0,) * 3, preset="efficientnet-lite"),
    "raw01": Declared(1 / 255, preset="raw01"),
    "raw255": Declared(1.0, preset="raw255"),
    "caffe": Declared(1.0, (103.939, 116.779, 123.68), color="BGR", preset="caffe"),
}


def parse(text: str) -> Declared:
    """Read a `--preprocess` value; UsageError naming the bad part."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise UsageError("--preprocess is empty", hint=_hint())
    declared = Declared()
    if "=" not in parts[0]:
        name = parts.pop(0).lower()
        if name not in PRESETS:
            raise UsageError(f"--preprocess: unknown preset {name!r}", hint=_hint())
        declared = PRESETS[name]
    fields: dict[str, object] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in _READERS:
            raise UsageError(f"--preprocess: {part!r} is not KEY=VALUE with a known key", hint=_hint())
        fields[key] = _READERS[key](value.strip())
    return Declared(**{**vars(declared), **fields})


def resolve(declared: Declared, spec: TensorSpec, model: str) -> Preprocess:
    """The manifest's Preprocess for input `spec`, checked against its shape and dtype."""
    where = f"model '{model}' input '{spec.name}' {spec.dtype}{list(spec.shape)}"
    if len(spec.shape) != 4 or spec.dtype != "float32":
        raise UsageError(f"--preprocess needs a float32 image input (1,3,H,W) or (1,H,W,3); {where}")
    if spec.shape[0] != 1:
        raise UsageError(f"--preprocess: {where} has batch {spec.shape[0]}; partition it with batch 1")
    layout = declared.layout or _layout_of(spec.shape, where)
    channels = spec.shape[1] if layout == "NCHW" else spec.shape[3]
    if channels != 3:
        raise UsageError(f"--preprocess layout={layout} needs 3 colour channels; {where} has {channels}")
    hw = spec.shape[2:4] if layout == "NCHW" else spec.shape[1:3]
    size = (int(hw[0]), int(hw[1]))
    if declared.size is not None and declared.size != size:
        raise UsageError(
            f"--preprocess size={declared.size[0]}x{declared.size[1]} does not match {where} "
            f"({size[0]}x{size[1]} in {layout})"
        )
    s = declared.scale
    return Preprocess(
        "image",
        size,
        tuple(round(m / s, 6) for m in declared.mean),
        tuple(round(d / s, 6) for d in declared.std),
        layout,
        declared.resize,
        declared.color,
        declared.preset,
    )


def _layout_of(shape: tuple[int, ...], where: str) -> str:
    if shape[1] == 3:
        return "NCHW"
    if shape[3] == 3:
        return "NHWC"
    raise UsageError(f"--preprocess: {where} has no 3-channel axis (1,3,H,W) or (1,H,W,3)")


def _number(text: str) -> float:
    try:
        num, _, den = text.partition("/")
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"--preprocess: {text!r} is not a number (e.g. 0.5 or 1/255)") from None
    return value


def _triple(text: str) -> tuple[float, float, float]:
    values = [_number(v) for v in text.split(":")]
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise UsageError(f"--preprocess: {text!r} needs one value or three separated by ':'")
    return values[0], values[1], values[2]


def _std(text: str) -> tuple[float, float, float]:
    values = _triple(text)
    if 0 in values:
        raise UsageError(f"--preprocess: std {text!r} has a zero")
    return values


def _scale(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise UsageError(f"--preprocess: scale {text!r} must be positive")
    return value


def _size(text: str) -> tuple[int, int]:
    try:
        dims = [int(d) for d in text.lower().split("x")]
    except ValueError:
        dims = []
    if len(dims) == 1:
        dims *= 2
    if len(dims) != 2 or min(dims) < 1:
        raise UsageError(f"--preprocess: size {text!r} is not like 224 or 224x224")
    return dims[0], dims[1]


def _choice(key: str, allowed: tuple[str, ...]) -> Callable[[str], str]:
    def read(text: str) -> str:
        for option in allowed:
            if text.lower() == option.lower():
                return option
        raise UsageError(f"--preprocess: {key} {text!r}: expected one of {', '.join(allowed)}")

    return read


_READERS: dict[str, Callable[[str], object]] = {
    "scale": _scale,
    "mean": _triple,
    "std": _std,
    "size": _size,
    "color": _choice("color", COLORS),
    "resize": _choice("resize", RESIZES),
    "layout": _choice("layout", LAYOUTS),
}


def _hint() -> str:
    return (
        f"a preset ({', '.join(PRESETS)}) and/or KEY=VALUE parts: size, resize, layout, color, "
        "scale, mean, std; e.g. --preprocess imagenet or --preprocess raw01,layout=NHWC"
    )
