"""The bundle: the unit of deployment shared by partitioner, edge agent and tail service.

A bundle is a directory holding `manifest.json`, `segments/seg_XXX.onnx` and optionally
`manifest.sig` (detached Ed25519 signature over the exact manifest bytes). The manifest lists the
sha256 of every other file, so verifying the signature and then every hash pins the whole bundle.
The format is described once, in docs/bundle-format.md; this module is its only reader and writer.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
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


@dataclass(frozen=True)
class Preprocess:
    """How a raw image becomes the model input: resize, then `(pixel - mean) / std` per channel."""

    kind: str = "image"  # "image" (RGB photo) or "none" (caller supplies the tensor)
    size: tuple[int, int] = (224, 224)  # (height, width) in pixels after resize
    mean: tuple[float, ...] = (127.0, 127.0, 127.0)  # subtracted per channel, pixel units
    std: tuple[float, ...] = (128.0, 128.0, 128.0)  # divided per channel, pixel units
    layout: str = "NCHW"  # "NCHW" or "NHWC"

    def apply(self, image_hwc_uint8: np.ndarray) -> np.ndarray:
        """Normalise an already-resized RGB image (H, W, 3 uint8) into a batch-1 float32 tensor."""
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        x = (image_hwc_uint8.astype(np.float32) - mean) / std
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

    def cut(self, cut_id: str) -> Cut:
        for c in self.cuts:
            if c.id == cut_id:
                return c
        known = ", ".join(c.id for c in self.cuts)
        raise BundleError(f"model '{self.model}' has no cut '{cut_id}' (cuts: {known})")

    def head(self, cut_id: str) -> tuple[Segment, ...]:
        """Segments the edge runs for this cut (empty for "input")."""
        return self.segments[: self.cut(cut_id).depth]

    def tail(self, cut_id: str) -> tuple[Segment, ...]:
        """Segments the tail service runs for this cut (empty for "output")."""
        return self.segments[self.cut(cut_id).depth :]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["files"] = dict(sorted(self.files.items()))
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
            str(pre["kind"]), tuple(pre["size"]), tuple(pre["mean"]), tuple(pre["std"]), str(pre["layout"])
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

    @property
    def build_sha256(self) -> str:
        """Identity of the model build, the same on the edge and the tail service: the manifest
        hash without device-only LiteRT conversions (`.tflite` files and their report), which
        may be added to a device's copy after partitioning."""
        m = self.manifest
        if not any(k.endswith(".tflite") for k in m.files) and "tflite" not in m.verification:
            return self.manifest_sha256
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


def _check_file(root: Path, rel: str, digest: str, model: str) -> None:
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:
        raise IntegrityError(f"bundle '{model}': file '{rel}' points outside the bundle")
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


def specs_json(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    return [asdict(s) for s in specs]
