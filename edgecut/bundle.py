"""The bundle: the unit of deployment shared by partitioner, edge agent and tail service.

A bundle is a directory holding `manifest.json`, `segments/seg_XXX.onnx` and optionally
`manifest.sig` (detached Ed25519 signature over the exact manifest bytes). The manifest lists the
sha256 of every other file, so verifying the signature and then every hash pins the whole bundle.
Every file the manifest names (segments, labels) must be listed there and lie inside the bundle
directory: a relative path without `..`, not escaping through a symlink. A reader that hands a file
to another library (ONNX Runtime) uses `read_verified`: the bytes it hashed are the bytes it passes
on, so a file swapped after the check (or after a session cache eviction) is never run.
The format is described once, in docs/bundle-format.md; this module is its only reader and writer.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgecut.errors import BundleError, IntegrityError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"

# Element types a frontier may carry, by their numpy names. Anything else is refused on load, so
# no downstream code has to handle object arrays or platform-dependent widths.
DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor crossing a cut. `shape` includes the batch dimension (1 in the manifest)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name, one of DTYPES

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * np.dtype(self.dtype).itemsize


PRE_KINDS = ("image", "none")
LAYOUTS = ("NCHW", "NHWC")
RESIZES = ("crop", "stretch")
COLORS = ("RGB", "BGR")


@dataclass(frozen=True)
class Preprocess:
    """How a raw image becomes the model input: resize, then `(pixel - mean) / std` per channel.

    `mean` and `std` are in pixel units (0..255) and in the model's channel order, so a framework's
    `(x / 255 - 0.485) / 0.229` is stored as mean 123.675, std 58.395.
    """

    kind: str = "image"  # "image" (a photo) or "none" (caller supplies the tensor)
    size: tuple[int, int] = (224, 224)  # (height, width) in pixels after resize
    mean: tuple[float, ...] = (127.0, 127.0, 127.0)  # subtracted per channel, pixel units
    std: tuple[float, ...] = (128.0, 128.0, 128.0)  # divided per channel, pixel units
    layout: str = "NCHW"  # "NCHW" or "NHWC"
    resize: str = "crop"  # "crop": shorter side to fit, then center crop; "stretch": to size exactly
    color: str = "RGB"  # channel order the model expects: "RGB" or "BGR"
    preset: str = ""  # the named preset these values came from, if any (informational)

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("kind", self.kind, PRE_KINDS),
            ("layout", self.layout, LAYOUTS),
            ("resize", self.resize, RESIZES),
            ("color", self.color, COLORS),
        ):
            if value not in allowed:
                raise ValueError(f"preprocess {name} {value!r}: expected one of {', '.join(allowed)}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"preprocess size {self.size}: expected (height, width) >= 1")
        if len(self.mean) != 3 or len(self.std) != 3 or 0 in self.std:
            raise ValueError("preprocess mean and std need 3 values each, std non-zero")

    def apply(self, image_hwc_uint8: np.ndarray) -> np.ndarray:
        """Normalise an already-resized RGB image (H, W, 3 uint8) into a batch-1 float32 tensor."""
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        pixels = image_hwc_uint8[..., ::-1] if self.color == "BGR" else image_hwc_uint8
        x = (pixels.astype(np.float32) - mean) / std
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x[None])


@dataclass(frozen=True)
class Cut:
    """A place the network can be split. Cut 0 is "input" (cloud-only), the last is "output"."""

    id: str
    depth: int  # index in manifest order; `--min-cut N` forbids depths < N
    position: int  # index of the last node run on the edge, in the partitioner's topological order
    frontier: tuple[TensorSpec, ...]

    @property
    def bytes_fp32(self) -> int:
        return sum(t.numel * 4 for t in self.frontier)


@dataclass(frozen=True)
class Segment:
    """`file` maps the frontier of cut `start` to the frontier of cut `end` (consecutive cuts)."""

    file: str  # relative to the bundle root, e.g. "segments/seg_003.onnx"
    start: str  # cut id
    end: str  # cut id
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def name(self) -> str:
        """The segment's name in profiles, timings and logs: its file's stem, e.g. "seg_003"."""
        return Path(self.file).stem


@dataclass(frozen=True)
class Manifest:
    """Everything about a bundle except the bytes of its files."""

    model: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    preprocess: Preprocess
    cuts: tuple[Cut, ...]
    segments: tuple[Segment, ...]
    files: Mapping[str, str]  # relative path -> sha256 hex, for every file except manifest + sig
    labels_file: str | None = None  # JSON list of class names, one per output index
    verification: Mapping[str, Any] = field(default_factory=dict)
    calibration: Mapping[str, Any] = field(default_factory=dict)  # cut id -> codec calibration
    fidelity: tuple[Mapping[str, Any], ...] = ()  # rows: cut, codec, bytes, agreements, views, …
    bottlenecks: Mapping[str, str] = field(default_factory=dict)  # cut id -> its pca codec's .npz
    batchable: bool = False  # segments accept any batch size on axis 0 (verified at partition time)
    format_version: int = FORMAT_VERSION
    # Optional sections, written only when present (older manifests keep their exact bytes):
    encryption: Mapping[str, Any] = field(default_factory=dict)  # edgecut.protect: encrypted files
    variants: tuple[Mapping[str, Any], ...] = ()  # edgecut.variants: e.g. int8 heads, per cut

    def cut(self, cut_id: str) -> Cut:
        for c in self.cuts:
            if c.id == cut_id:
                return c
        known = ", ".join(c.id for c in self.cuts)
        raise BundleError(f"model '{self.model}' has no cut '{cut_id}' (cuts: {known})")

    def depth_of(self, cut: str | int) -> int:
        """A `--min-cut`-style limit as a depth: a cut id (its depth) or a number ("" = 0). One
        reading for the edge, the tail service, `plan` and the sweep, so a limit means the same
        everywhere."""
        text = str(cut).strip()
        if not text:
            return 0
        return int(text) if text.isdigit() else self.cut(text).depth

    def head(self, cut_id: str) -> tuple[Segment, ...]:
        """Segments the edge runs for this cut (empty for "input")."""
        return self.segments[: self.cut(cut_id).depth]

    def tail(self, cut_id: str) -> tuple[Segment, ...]:
        """Segments the tail service runs for this cut (empty for "output")."""
        return self.segments[self.cut(cut_id).depth :]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["files"] = dict(sorted(self.files.items()))
        for optional in ("encryption", "variants"):
            if not d[optional]:
                del d[optional]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Manifest:
        try:
            return _manifest_from_json(d)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest is malformed: {type(exc).__name__}: {exc}") from exc


def _spec(d: Mapping[str, Any]) -> TensorSpec:
    dtype = str(d["dtype"])
    if dtype not in DTYPES:
        raise ValueError(f"tensor '{d['name']}' has unsupported dtype '{dtype}'")
    shape = tuple(int(s) for s in d["shape"])
    if any(s < 1 for s in shape):
        raise ValueError(f"tensor '{d['name']}' has a non-static shape {shape}")
    return TensorSpec(name=str(d["name"]), shape=shape, dtype=dtype)


def _manifest_from_json(d: Mapping[str, Any]) -> Manifest:
    version = int(d["format_version"])
    if version != FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {version} is not supported (this edgecut reads {FORMAT_VERSION})"
        )
    pre = d["preprocess"]
    cuts = tuple(
        Cut(str(c["id"]), int(c["depth"]), int(c["position"]), tuple(map(_spec, c["frontier"])))
        for c in d["cuts"]
    )
    segments = tuple(
        Segment(str(s["file"]), str(s["start"]), str(s["end"]), tuple(s["inputs"]), tuple(s["outputs"]))
        for s in d["segments"]
    )
    if len(segments) != len(cuts) - 1:
        raise ValueError(f"{len(cuts)} cuts need {len(cuts) - 1} segments, found {len(segments)}")
    return Manifest(
        model=str(d["model"]),
        version=str(d["version"]),
        inputs=tuple(map(_spec, d["inputs"])),
        outputs=tuple(map(_spec, d["outputs"])),
        preprocess=Preprocess(
            str(pre["kind"]),
            (int(pre["size"][0]), int(pre["size"][1])),
            tuple(float(v) for v in pre["mean"]),
            tuple(float(v) for v in pre["std"]),
            str(pre["layout"]),
            str(pre.get("resize", "crop")),  # absent in bundles written before these fields
            str(pre.get("color", "RGB")),
            str(pre.get("preset", "")),
        ),
        cuts=cuts,
        segments=segments,
        files={str(k): str(v) for k, v in d["files"].items()},
        labels_file=d.get("labels_file"),
        verification=dict(d.get("verification", {})),
        calibration=dict(d.get("calibration", {})),
        fidelity=tuple(d.get("fidelity", ())),
        bottlenecks={str(k): str(v) for k, v in d.get("bottlenecks", {}).items()},
        batchable=bool(d.get("batchable", False)),
        format_version=version,
        encryption=dict(d.get("encryption", {})),
        variants=tuple(d.get("variants", ())),
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_bytes(manifest: Manifest) -> bytes:
    """Canonical bytes: what the signature covers and what `manifest_sha256` names."""
    return (json.dumps(manifest.to_json(), indent=1, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk: every listed file's hash checked at load."""

    root: Path
    manifest: Manifest
    manifest_sha256: str
    signed: bool  # True when a signature was present and verified against a configured key

    @property
    def name(self) -> str:
        return f"{self.manifest.model}:{self.manifest.version}"

    def path(self, relative: str) -> Path:
        return self.root / relative

    def read_verified(self, relative: str) -> bytes:
        """A listed file's bytes, read once and checked against the manifest's sha256."""
        digest = self.manifest.files.get(relative)
        if digest is None:
            raise IntegrityError(f"bundle '{self.manifest.model}': file '{relative}' is not listed in files")
        data = _read_contained(self.root, relative, self.manifest.model)
        if hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(
                f"bundle '{self.manifest.model}' {relative}: sha256 mismatch — file changed after loading"
            )
        return data

    def stored(self, relative: str) -> str:
        """Where a file's bytes are stored: itself, or its ciphertext in an encrypted bundle."""
        entry = self.manifest.encryption.get("files", {}).get(relative)
        return str(entry["stored"]) if entry else relative

    def size_bytes(self, relative: str) -> int:
        """Bytes of a file as the model runtime sees it (plaintext size for an encrypted file)."""
        entry = self.manifest.encryption.get("files", {}).get(relative)
        return int(entry["plain_bytes"]) if entry else self.path(relative).stat().st_size

    @property
    def build_sha256(self) -> str:
        """Identity of the model build, the same on the edge and the tail service: the manifest
        hash without device-only LiteRT conversions (`.tflite` files and their report), which
        may be added to a device's copy after partitioning, and of the plaintext manifest where
        the device's copy is encrypted (edgecut.protect)."""
        m = self.manifest
        if m.encryption:
            from edgecut.protect import plaintext_manifest

            m = plaintext_manifest(m)
        if not any(k.endswith(".tflite") for k in m.files) and "tflite" not in m.verification:
            if m is self.manifest:
                return self.manifest_sha256
            return hashlib.sha256(manifest_bytes(m)).hexdigest()
        plain = replace(
            m,
            files={k: v for k, v in m.files.items() if not k.endswith(".tflite")},
            verification={k: v for k, v in m.verification.items() if k != "tflite"},
        )
        return hashlib.sha256(manifest_bytes(plain)).hexdigest()

    def labels(self) -> list[str] | None:
        if self.manifest.labels_file is None:
            return None
        return list(json.loads(self.path(self.manifest.labels_file).read_text()))


def load_bundle(
    root: Path | str,
    *,
    public_key: Any = None,
    require_signature: bool = False,
) -> Bundle:
    """Read and verify a bundle. `public_key` is an Ed25519 key from `edgecut.keys`.

    Hashes are always checked: a bundle is the thing that crosses from a workstation to devices and
    servers, and a silently changed segment would compute garbage with no error anywhere.
    """
    root = Path(root)
    raw = _read_manifest(root)
    manifest = Manifest.from_json(_parse_json(raw, root))
    signed = _check_signature(root, raw, public_key, require_signature)
    _check_references(manifest)
    for rel, digest in manifest.files.items():
        _check_file(root, rel, digest, manifest.model)
    return Bundle(root, manifest, hashlib.sha256(raw).hexdigest(), signed)


def _read_manifest(root: Path) -> bytes:
    if not root.is_dir():
        raise BundleError(f"bundle '{root}' does not exist or is not a directory")
    try:
        return (root / MANIFEST).read_bytes()
    except OSError as exc:
        raise BundleError(f"bundle '{root}': cannot read {MANIFEST}: {exc.strerror}") from exc


def _parse_json(raw: bytes, root: Path) -> Mapping[str, Any]:
    try:
        d = json.loads(raw)
    except ValueError as exc:
        raise BundleError(f"bundle '{root}': {MANIFEST} is not valid JSON ({exc})") from exc
    if not isinstance(d, dict):
        raise BundleError(f"bundle '{root}': {MANIFEST} is not a JSON object")
    return d


def _check_signature(root: Path, raw: bytes, public_key: Any, required: bool) -> bool:
    sig_path = root / SIGNATURE
    if public_key is None:
        if required:
            raise IntegrityError(f"bundle '{root}': a signature is required but no key is set")
        return False
    if not sig_path.exists():
        raise IntegrityError(f"bundle '{root}' is not signed ({SIGNATURE} missing)")
    from edgecut.keys import verify_bytes

    try:
        verify_bytes(public_key, raw, sig_path.read_bytes())
    except IntegrityError as exc:
        raise IntegrityError(
            f"bundle '{root}': {MANIFEST} signature does not verify — changed after signing "
            "or signed with another key"
        ) from exc
    return True


def _check_references(manifest: Manifest) -> None:
    """Every file the manifest names must be hash-listed: an unlisted one would run unchecked."""
    named = [s.file for s in manifest.segments]
    if manifest.labels_file is not None:
        named.append(manifest.labels_file)
    named.extend(manifest.bottlenecks.values())
    encrypted = manifest.encryption.get("files", {})
    for name in named:
        # An encrypted device copy names the plaintext file; the ciphertext is what is listed.
        rel = str(encrypted[name]["stored"]) if name in encrypted else name
        if rel not in manifest.files:
            raise IntegrityError(
                f"bundle '{manifest.model}': file '{rel}' is used by the manifest but not listed "
                "in its files (so it would not be hash-checked)"
            )


def _contained(root: Path, rel: str, model: str) -> Path:
    """`root/rel`, refusing absolute paths, `..` parts and symlinks that lead out of `root`."""
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts or "\\" in rel:
        raise IntegrityError(f"bundle '{model}': file '{rel}' is not a plain relative path inside the bundle")
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:
        raise IntegrityError(f"bundle '{model}': file '{rel}' points outside the bundle")
    return path


def _read_contained(root: Path, rel: str, model: str) -> bytes:
    path = _contained(root, rel, model)
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise IntegrityError(f"bundle '{model}': file '{rel}' is missing") from None
    except OSError as exc:
        raise IntegrityError(f"bundle '{model}': file '{rel}' cannot be read ({exc.strerror})") from None


def _check_file(root: Path, rel: str, digest: str, model: str) -> None:
    path = _contained(root, rel, model)
    if not path.is_file():
        raise IntegrityError(f"bundle '{model}': file '{rel}' is missing")
    if sha256_file(path) != digest:
        raise IntegrityError(f"bundle '{model}' {rel}: sha256 mismatch — file changed after partitioning")


def write_manifest(root: Path, manifest: Manifest, signing_key: Any = None) -> None:
    """Write manifest.json (and manifest.sig when a signing key is given) into `root`."""
    raw = manifest_bytes(manifest)
    (root / MANIFEST).write_bytes(raw)
    if signing_key is not None:
        from edgecut.keys import sign_bytes

        (root / SIGNATURE).write_bytes(sign_bytes(signing_key, raw))
