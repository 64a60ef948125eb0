"""Photos in, model inputs out: decoding, resize + center crop, normalisation per the bundle.

Shared by the partitioner (verification samples), the edge agent (its inputs) and the tail
service (the JPEG cloud-only baseline), so all three see exactly the same pixels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgecut.bundle import Manifest, Preprocess, TensorSpec
from edgecut.errors import ImageError, UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Real photos that ship inside installed packages, split BY PHOTO into calibration and held-out, so
# fidelity is measured on photos the codec was never fitted to. The held-out side holds the photos
# whose subject EfficientNet-Lite0 recognises with confidence (top-1 probability >= 0.5 on the
# centre crop: coffee 0.94, camera 0.94, motorcycle 0.72, clock 0.68), since agreement is only
# meaningful where the unsplit model is sure; the calibration side holds the rest, textures and
# micrographs included, as a codec must fit whatever a device photographs.
CALIBRATION_PHOTOS = (
    "astronaut",
    "chelsea",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "brick",
    "gravel",
    "grass",
    "moon",
    "text",
)
HELDOUT_PHOTOS = ("coffee", "camera", "motorcycle", "clock", "rocket", "grace_hopper")
MAX_PIXELS = 64_000_000  # refuse decompression-bomb images before decoding


def load_image(source: Path | bytes, label: str | None = None) -> np.ndarray:
    """Decode an image file or bytes into an RGB (H, W, 3) uint8 array, EXIF rotation applied."""
    name = label or (str(source) if isinstance(source, Path) else "image")
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageError(f"{name}: {im.width}x{im.height} pixels is too large")
            upright = ImageOps.exif_transpose(im) or im
            return np.asarray(upright.convert("RGB"))
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{name}: not a readable image ({exc.__class__.__name__})") from None


def resize_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize the shorter side to fit, then center-crop to (height, width): no distortion."""
    h, w = size
    im = Image.fromarray(image)
    scale = max(h / im.height, w / im.width)
    new = (max(w, round(im.width * scale)), max(h, round(im.height * scale)))
    im = im.resize(new, Image.Resampling.BILINEAR)
    left, top = (new[0] - w) // 2, (new[1] - h) // 2
    return np.asarray(im.crop((left, top, left + w, top + h)))


def resize_stretch(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to exactly (height, width), aspect ratio not kept (models trained that way)."""
    im = Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(im)


def prepare(image: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Raw RGB photo → batch-1 model input tensor, as the bundle's preprocessing says."""
    if pre.kind != "image":
        raise UsageError(
            "this model takes tensors, not images (its bundle has no image preprocessing)",
            hint="partition it with --preprocess (e.g. --preprocess imagenet) to feed it photos",
        )
    fit = resize_crop if pre.resize == "crop" else resize_stretch
    return pre.apply(fit(image, pre.size))


def sample_photos(
    names: tuple[str, ...] = CALIBRATION_PHOTOS + HELDOUT_PHOTOS,
) -> list[tuple[str, np.ndarray]]:
    """Real photos shipped with scikit-image (and matplotlib's grace_hopper.jpg when matplotlib is
    installed), no download, as (name, RGB uint8) pairs in the order of `names`."""
    try:
        from skimage import data
    except ModuleNotFoundError as exc:
        raise UsageError("sample photos need scikit-image", hint='pip install "edgecut[partition]"') from exc
    photos = []
    for name in names:
        img = _packaged_photo(data, name)
        if img is None:
            continue
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        photos.append((name, np.ascontiguousarray(img[..., :3]).astype(np.uint8)))
    return photos


def _packaged_photo(data: object, name: str) -> np.ndarray | None:
    if name == "motorcycle":
        return np.asarray(data.stereo_motorcycle()[0])  # type: ignore[attr-defined]  # left view only
    if name == "grace_hopper":
        try:
            from matplotlib import cbook
        except ModuleNotFoundError:
            return None  # optional: the held-out set is then one photo smaller, and says so
        return load_image(Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    return np.asarray(getattr(data, name)())


def list_images(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise UsageError(f"images directory '{directory}' does not exist")
    found = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise UsageError(f"images directory '{directory}' has no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def random_feeds(specs: Sequence[TensorSpec], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs for a model without image preprocessing: N(0, 1) for floats, small integers else
    (token ids, masks); the one way every caller fakes an input it has no photo for."""
    return {
        s.name: (
            rng.standard_normal(s.shape)
            if s.dtype.startswith("float")
            else rng.integers(0, 2 if s.dtype == "bool" else 10, s.shape)
        ).astype(s.dtype)
        for s in specs
    }


def photo_feeds(name: str, preprocess: Preprocess, count: int) -> list[dict[str, np.ndarray]]:
    """The first `count` built-in photos through `preprocess`, as feeds of input `name`."""
    return [{name: prepare(img, preprocess)} for _, img in sample_photos()[:count]]


def synthetic_feeds(m: Manifest, seed: int = 0) -> dict[str, np.ndarray]:
    """A realistic model input for timing: a smooth random image (close to photo statistics)
    through the bundle's preprocessing for image models, N(0, 1) noise otherwise. Zeros would
    not do: some kernels skip through them faster than through real activations."""
    rng = np.random.default_rng(seed)
    if m.preprocess.kind == "image":
        h, w = m.preprocess.size
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3)).astype(np.float32)
        img = np.kron(small, np.ones((16, 16, 1)))[:h, :w].astype(np.uint8)
        return {m.inputs[0].name: prepare(img, m.preprocess)}
    return random_feeds(m.inputs, rng)
