"""The built-in model from its shipped weights: cuts, verification, and a cat that is a cat."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecut.bundle import load_bundle
from edgecut.images import prepare, sample_photos
from edgecut.runtime import SegmentChain

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_effl0_bundle_is_verified_and_batchable(effl0_bundle: Path) -> None:
    b = load_bundle(effl0_bundle)
    m = b.manifest
    assert m.cuts[0].id == "input" and m.cuts[-1].id == "output"
    assert len(m.cuts) >= 8
    assert m.verification["relative_diff"] <= 1e-4
    assert m.batchable
    labels = b.labels()
    assert labels is not None and len(labels) == 1000
    sizes = [c.bytes_fp32 for c in m.cuts[1:]]
    assert sizes == sorted(sizes, reverse=True)  # useful cuts send no more than earlier ones


def test_cat_photo_is_a_cat_at_every_cut(effl0_bundle: Path) -> None:
    b = load_bundle(effl0_bundle)
    m = b.manifest
    chelsea = dict(sample_photos())["chelsea"]
    x = {m.inputs[0].name: prepare(chelsea, m.preprocess)}
    full = SegmentChain.from_files([b.path(s.file) for s in m.segments]).run(x)
    logits = full[m.outputs[0].name]
    assert int(np.argmax(logits)) in CAT_CLASSES
    for cut in m.cuts:
        head = SegmentChain.from_files([b.path(s.file) for s in m.head(cut.id)])
        tail = SegmentChain.from_files([b.path(s.file) for s in m.tail(cut.id)])
        mid = head.run(x) if m.head(cut.id) else x
        out = tail.run(mid) if m.tail(cut.id) else mid
        np.testing.assert_allclose(out[m.outputs[0].name], logits, atol=1e-4)
