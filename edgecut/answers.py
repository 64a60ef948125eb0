"""Compact answers: the tail sends only what the edge asked for (top-k by default, or everything).

A classifier's full answer is its logits: 1000 fp32 values, ~3.8 KB after zstd, more downlink than
a deep cut's whole request. Most callers want the best few classes, so the edge asks for top-k and
the tail sends, per ranked output, the k best indices (int32), their values (fp16) and the log of
the sum of exp over all values (fp32). That is enough to give exact softmax probabilities of those k
classes on the edge (`Ranked.probs`) in ~140 bytes instead of ~4 KB.

An output is *ranked* when it is a float (N, C) tensor with C > k (a classifier head); every other
output travels in full inside the same frame, so top-k never loses an output. The answer is a normal
codec frame (scheme `none`, no zstd: the body is tiny) whose tensors are the ranked outputs'
`<name>.idx`, `<name>.top`, `<name>.lse` and the unranked outputs under their own names.

What the edge asks for travels inside the sealed request (see `edgecut.sealing`), so neither the
network nor anyone else can change it; `to_wire` / `from_wire` are those 3 bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgecut import codec
from edgecut.bundle import TensorSpec
from edgecut.errors import CodecError, UsageError

KINDS = ("full", "topk")  # wire code = index
DEFAULT_K = 5
MAX_K = 1000
ANSWER_CODEC = codec.CodecSpec("none", zstd_level=0)  # ranked answers: zstd would only add bytes
FULL_CODEC = codec.CodecSpec("none", zstd_level=1)  # full answers: exact, lightly packed
RESPONSE_SEAL_BYTES = 12 + 16 + 16  # AES-GCM nonce + tag, plus the Answer message's own fields
_WIRE = struct.Struct(">BH")  # kind, k


@dataclass(frozen=True)
class AnswerSpec:
    """What the edge wants back. Text form: `top5`, `top10`, `full`."""

    kind: str = "topk"  # "topk" | "full"
    k: int = DEFAULT_K  # classes per ranked output (topk only)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"answer kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.kind == "topk" and not 1 <= self.k <= MAX_K:
            raise UsageError(f"top-k answer with k={self.k}: expected 1 to {MAX_K}")

    @classmethod
    def parse(cls, text: str) -> AnswerSpec:
        """`full`, `topk` (k = 5) or `top<k>`."""
        t = text.strip().lower()
        if t in KINDS:
            return cls(t)
        if t.startswith("top") and t[3:].isdigit():
            return cls("topk", int(t[3:]))
        raise UsageError(f"answer format {text!r}: expected full, topk or top<k> (e.g. top5)")

    def __str__(self) -> str:
        return "full" if self.kind == "full" else f"top{self.k}"

    def to_wire(self) -> bytes:
        return _WIRE.pack(KINDS.index(self.kind), self.k if self.kind == "topk" else 0)

    @classmethod
    def from_wire(cls, data: bytes) -> AnswerSpec:
        kind, k = _WIRE.unpack(data)
        if kind >= len(KINDS):
            raise CodecError(f"unknown answer kind code {kind} in request")
        try:
            return cls(KINDS[kind], k) if KINDS[kind] == "topk" else cls("full")
        except UsageError as exc:
            raise CodecError(f"bad answer request: {exc.message}") from None


WIRE_BYTES = _WIRE.size
FULL = AnswerSpec("full")


@dataclass(frozen=True)
class Ranked:
    """The k best entries of one (N, C) output, best first, with what makes them probabilities."""

    indices: np.ndarray  # (N, k) int
    values: np.ndarray  # (N, k) float32: the output's own values (logits) at those indices
    logsumexp: np.ndarray  # (N,) float32: log Σ exp over all C values, for exact softmax

    def probs(self) -> np.ndarray:
        """Softmax probabilities of the k entries (the same as softmax over all C, then top-k)."""
        return np.exp(self.values.astype(np.float64) - self.logsumexp[:, None].astype(np.float64))


@dataclass(frozen=True)
class Answer:
    """An answer as the edge reads it: ranked outputs, and the outputs that came in full."""

    ranked: Mapping[str, Ranked] = field(default_factory=dict)
    full: Mapping[str, np.ndarray] = field(default_factory=dict)

    def top(self, name: str, k: int = DEFAULT_K) -> Ranked:
        """The top-k of output `name`, from whichever form it came in."""
        if name in self.ranked:
            r = self.ranked[name]
            return Ranked(r.indices[:, :k], r.values[:, :k], r.logsumexp)
        return rank(self.full[name], k)


def rank(x: np.ndarray, k: int) -> Ranked:
    """Top-k of each row of a (N, C) array (or of a vector), ties broken by the lower index."""
    rows = np.asarray(x, np.float32).reshape(x.shape[0] if x.ndim > 1 else 1, -1)
    k = min(k, rows.shape[1])
    order = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(rows, order, axis=1)
    peak = rows.max(axis=1)
    lse = peak + np.log(np.exp(rows - peak[:, None]).sum(axis=1))
    return Ranked(order.astype(np.int32), top, lse.astype(np.float32))


def default_for(outputs: Sequence[TensorSpec]) -> AnswerSpec:
    """Top-5 when the first output is a classifier head, else the full output."""
    return AnswerSpec() if outputs and is_ranked(outputs[0], DEFAULT_K) else FULL


def is_ranked(spec: TensorSpec, k: int) -> bool:
    return np.dtype(spec.dtype).kind == "f" and len(spec.shape) == 2 and spec.shape[1] > k


def wire_specs(outputs: Sequence[TensorSpec], answer: AnswerSpec) -> list[TensorSpec]:
    """The tensors an answer frame carries for these model outputs."""
    specs: list[TensorSpec] = []
    for s in outputs:
        if answer.kind == "topk" and is_ranked(s, answer.k):
            n, k = s.shape[0], answer.k
            specs += [
                TensorSpec(f"{s.name}.idx", (n, k), "int32"),
                TensorSpec(f"{s.name}.top", (n, k), "float16"),
                TensorSpec(f"{s.name}.lse", (n,), "float32"),
            ]
        else:
            specs.append(s)
    return specs


def encode_answer(
    outputs: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], answer: AnswerSpec
) -> bytes:
    """The tail's answer frame for `outputs` (the model's outputs, any batch size)."""
    if answer.kind == "full":
        return codec.encode(outputs, specs, FULL_CODEC)
    tensors: dict[str, np.ndarray] = {}
    for s in specs:
        if is_ranked(s, answer.k):
            r = rank(outputs[s.name], answer.k)
            tensors |= {f"{s.name}.idx": r.indices, f"{s.name}.top": r.values.astype(np.float16)}
            tensors[f"{s.name}.lse"] = r.logsumexp
        else:
            tensors[s.name] = outputs[s.name]
    return codec.encode(tensors, wire_specs(specs, answer), ANSWER_CODEC)


def decode_answer(payload: bytes, specs: Sequence[TensorSpec], answer: AnswerSpec) -> Answer:
    """Read an answer frame in the format that was asked for; CodecError if it is not that."""
    decoded = codec.decode(payload, wire_specs(specs, answer))
    if answer.kind == "full":
        return Answer(full=decoded)
    ranked, full = {}, {}
    for s in specs:
        if is_ranked(s, answer.k):
            idx = decoded[f"{s.name}.idx"]
            if idx.size and (idx.min() < 0 or idx.max() >= s.shape[1]):
                raise CodecError(f"answer for {s.name!r} names a class outside 0..{s.shape[1] - 1}")
            values = decoded[f"{s.name}.top"].astype(np.float32)
            ranked[s.name] = Ranked(idx, values, decoded[f"{s.name}.lse"])
        else:
            full[s.name] = decoded[s.name]
    return Answer(ranked, full)


def answer_bytes(outputs: Sequence[TensorSpec], answer: AnswerSpec) -> int:
    """Sealed answer bytes for one batch-1 request: exact for top-k (fixed-size frame); for a full
    answer the raw size, an upper bound (zstd gains ~5 % on fp32 logits)."""
    one = [TensorSpec(s.name, (1, *s.shape[1:]), s.dtype) for s in outputs]
    wire = wire_specs(one, answer)
    frame = codec.encode({s.name: np.zeros(s.shape, s.dtype) for s in wire}, wire, ANSWER_CODEC)
    return len(frame) + RESPONSE_SEAL_BYTES
