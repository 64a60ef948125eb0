"""Image files of the model input (JPEG, WebP, PNG): the honest cloud-only baselines for the codec.

Uploading an image of the resized photo is what a plain cloud service would do, so a cut is only
worth its edge compute if it sends fewer bytes than the best of these at the same fidelity (or keeps
the raw input on the device). JPEG and WebP are lossy at a quality 1..95, PNG is lossless (of the
uint8 pixels the normalised tensor rounds to). The tensor is normalised model input; `(mean, std)`
per channel turns it back into pixels and forth. Bytes: for each batch item, `u32 length | image
file`, little-endian.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence

import numpy as np
from PIL import Image

from edgecut.errors import CodecError

_LEN = struct.Struct("<I")

ImageNorm = tuple[Sequence[float], Sequence[float]]  # (mean, std) per channel, pixel units


def is_channels_first(shape: tuple[int, ...]) -> bool:
    """NCHW when axis 1 holds the 3 colours, NHWC when the last axis does; else not an image."""
    if len(shape) == 4 and shape[1] == 3:
        return True
    if len(shape) == 4 and shape[3] == 3:
        return False
    raise CodecError(f"image schemes need a (N,3,H,W) or (N,H,W,3) image tensor, got shape {shape}")


FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}  # codec scheme -> Pillow format


def encode_images(x: np.ndarray, norm: ImageNorm | None, quality: int, scheme: str = "jpeg") -> bytes:
    """De-normalise `x` to uint8 pixels and save each batch item as `scheme` (quality: lossy only)."""
    options = {"quality": quality} if scheme != "png" else {"optimize": True}
    mean, std = _norm(norm)
    nhwc = x.transpose(0, 2, 3, 1) if is_channels_first(x.shape) else x
    pixels = np.clip(np.rint(nhwc * std + mean), 0, 255).astype(np.uint8)
    parts = []
    for item in pixels:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(item)).save(buffer, FORMATS[scheme], **options)
        parts += [_LEN.pack(buffer.tell()), buffer.getvalue()]
    return b"".join(parts)


def decode_images(
    data: memoryview, shape: tuple[int, ...], norm: ImageNorm | None, scheme: str = "jpeg"
) -> np.ndarray:
    """Inverse of `encode_images`; each image must be an RGB `scheme` file of exactly the expected size.

    The size is checked from the file header before Pillow decodes pixels, so a hostile image
    cannot make us allocate more than `shape` promises.
    """
    mean, std = _norm(norm)
    channels_first = is_channels_first(shape)
    height, width = shape[2:4] if channels_first else shape[1:3]
    items, pos = [], 0
    for _ in range(shape[0]):
        if pos + _LEN.size > len(data):
            raise CodecError(f"{scheme} payload truncated")
        (length,) = _LEN.unpack_from(data, pos)
        pos += _LEN.size + length
        if pos > len(data):
            raise CodecError(f"{scheme} payload truncated")
        items.append(_decode_one(data[pos - length : pos], width, height, FORMATS[scheme]))
    if pos != len(data):
        raise CodecError(f"{scheme} payload has {len(data) - pos} trailing bytes")
    x = ((np.stack(items).astype(np.float32) - mean) / std).astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if channels_first else x


def _decode_one(data: memoryview, width: int, height: int, fmt: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as image:
            if image.format != fmt or image.mode != "RGB" or image.size != (width, height):
                raise CodecError(
                    f"expected an RGB {fmt} of {width}x{height}, got {image.format} "
                    f"{image.mode} {image.size[0]}x{image.size[1]}"
                )
            return np.asarray(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise CodecError(f"bad {fmt} image in frame: {error}") from None


def _norm(norm: ImageNorm | None) -> tuple[np.ndarray, np.ndarray]:
    if norm is None:
        raise CodecError("image schemes need image_norm=(mean, std) to turn the tensor into pixels")
    mean, std = (np.asarray(v, np.float32) for v in norm)
    if mean.shape != (3,) or std.shape != (3,) or not np.all(std != 0):
        raise CodecError("image_norm must be (mean, std) with 3 values each and std non-zero")
    return mean, std
