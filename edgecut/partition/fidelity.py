"""How far a codec moves the model's answer, measured so that the figure is not noise.

Most views of everyday photos are not ImageNet-like: the unsplit model is unsure (top-1 probability
well under 0.5), and there any perturbation flips the argmax, so plain top-1 agreement mostly counts
near-ties. The headline figure is therefore top-1 agreement on the *confident* views (unsplit top-1
probability >= `CONFIDENT`), with the mean KL divergence KL(unsplit ‖ codec) of the softmax and
the top-5 overlap over all views beside it. Every row states the views, confident views and
distinct photos it rests on, so a reader can tell a 100 % on 7 views from one on 50.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFIDENT = 0.5  # unsplit top-1 probability from which a view counts as confident


@dataclass(frozen=True)
class FidelityRow:
    """One (cut, codec) measurement on the held-out views."""

    cut: str
    codec: str  # canonical text form, str(CodecSpec)
    bytes: int  # mean encoded frame bytes per batch-1 request (before sealing)
    agreement_confident: float | None  # headline: top-1 agreement 0..1 on the confident views
    agreement: float  # top-1 agreement 0..1 on all views
    mean_kl: float  # mean KL(unsplit ‖ codec) of the softmax over all views, nats
    top5_overlap: float  # mean |top-5 ∩ unsplit top-5| / 5 over all views
    max_abs_error: float  # largest |logit - unsplit logit| over views and classes
    views: int  # held-out views measured
    confident_views: int  # views where the unsplit top-1 probability >= CONFIDENT
    photos: int  # distinct held-out photos the views come from
    samples: int  # = views; the name older readers know

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confident(reference: np.ndarray) -> np.ndarray:
    """Boolean mask of the views whose unsplit top-1 probability is at least CONFIDENT."""
    return softmax(reference.reshape(len(reference), -1)).max(axis=1) >= CONFIDENT


def mean_kl(reference: np.ndarray, logits: np.ndarray) -> float:
    p, q = softmax(reference), softmax(logits)
    return float(np.mean(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30)), axis=1)))


def top1_agreement(reference: np.ndarray, logits: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction of (masked) views with the same argmax; NaN when the mask selects none."""
    agree = reference.argmax(axis=1) == logits.argmax(axis=1)
    chosen = agree if mask is None else agree[mask]
    return float(chosen.mean()) if chosen.size else float("nan")


def top5_overlap(reference: np.ndarray, logits: np.ndarray) -> float:
    k = min(5, reference.shape[1])
    a, b = np.argsort(reference, axis=1)[:, -k:], np.argsort(logits, axis=1)[:, -k:]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]))


def row(
    cut: str, codec: str, sizes: Sequence[int], logits: np.ndarray, reference: np.ndarray, photos: int
) -> FidelityRow:
    n = len(sizes)
    logits, reference = logits.reshape(n, -1), reference.reshape(n, -1)
    mask = confident(reference)
    return FidelityRow(
        cut=cut,
        codec=codec,
        bytes=round(float(np.mean(sizes))),
        agreement_confident=round(top1_agreement(reference, logits, mask), 6) if mask.any() else None,
        agreement=round(top1_agreement(reference, logits), 6),
        mean_kl=round(mean_kl(reference, logits), 6),
        top5_overlap=round(top5_overlap(reference, logits), 6),
        max_abs_error=round(float(np.max(np.abs(logits.astype(np.float64) - reference))), 6),
        views=n,
        confident_views=int(mask.sum()),
        photos=photos,
        samples=n,
    )
