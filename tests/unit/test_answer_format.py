"""Compact answers: format round trips, top-k equal to the full output's, and the bytes they save."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecut import answers, codec
from edgecut.answers import FULL, AnswerSpec, decode_answer, encode_answer, rank
from edgecut.bundle import TensorSpec
from edgecut.errors import CodecError, UsageError

LOGITS = TensorSpec("logits", (1, 1000), "float32")


def logits(n: int = 1, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, 1000)) * 3).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


@pytest.mark.parametrize(
    ("text", "spec"),
    [("top5", AnswerSpec()), ("topk", AnswerSpec()), ("TOP10", AnswerSpec("topk", 10)), ("full", FULL)],
)
def test_spec_text_and_wire_round_trip(text: str, spec: AnswerSpec) -> None:
    assert AnswerSpec.parse(text) == spec
    assert AnswerSpec.parse(str(spec)) == spec
    assert AnswerSpec.from_wire(spec.to_wire()) == spec
    assert len(spec.to_wire()) == answers.WIRE_BYTES


@pytest.mark.parametrize("text", ["top0", "top1001", "best5", "", "top-3"])
def test_bad_spec_text_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError):
        AnswerSpec.parse(text)


@pytest.mark.parametrize("wire", [b"\x07\x00\x05", b"\x01\x00\x00", b"\x01\xff\xff"])
def test_bad_wire_spec_is_a_codec_error(wire: bytes) -> None:
    with pytest.raises(CodecError):
        AnswerSpec.from_wire(wire)


@pytest.mark.parametrize("n", [1, 3])
def test_topk_answer_equals_topk_of_full_output(n: int) -> None:
    x = logits(n)
    specs = [TensorSpec("logits", (n, 1000), "float32")]
    ranked = decode_answer(encode_answer({"logits": x}, specs, AnswerSpec()), specs, AnswerSpec())
    full = decode_answer(encode_answer({"logits": x}, specs, FULL), specs, FULL)
    np.testing.assert_array_equal(full.full["logits"], x)  # full stays exact
    top, expected = ranked.top("logits"), full.top("logits")
    np.testing.assert_array_equal(top.indices, np.argsort(-x, axis=1)[:, :5])
    np.testing.assert_array_equal(top.indices, expected.indices)
    p = softmax(x)
    want = np.take_along_axis(p, top.indices.astype(np.int64), axis=1)
    np.testing.assert_allclose(top.probs(), want, rtol=5e-3)  # values travel as fp16
    np.testing.assert_allclose(expected.probs(), want, rtol=1e-5)


@settings(max_examples=50, deadline=None)
@given(k=st.integers(1, 40), classes=st.integers(2, 60), seed=st.integers(0, 2**16))
def test_rank_matches_argsort(k: int, classes: int, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((2, classes)).astype(np.float32)
    r = rank(x, k)
    np.testing.assert_array_equal(r.indices, np.argsort(-x, axis=1, kind="stable")[:, :k])
    np.testing.assert_allclose(np.exp(r.logsumexp), np.exp(x.astype(np.float64)).sum(axis=1), rtol=1e-5)


def test_outputs_that_are_not_classifier_heads_travel_in_full() -> None:
    specs = [
        LOGITS,
        TensorSpec("boxes", (1, 4), "float32"),  # C <= k
        TensorSpec("ids", (1, 100), "int64"),  # not float
        TensorSpec("map", (1, 8, 8), "float32"),  # not (N, C)
    ]
    rng = np.random.default_rng(1)
    outs = {
        "logits": logits(),
        "boxes": rng.standard_normal((1, 4)).astype(np.float32),
        "ids": rng.integers(0, 9, (1, 100)),
        "map": rng.standard_normal((1, 8, 8)).astype(np.float32),
    }
    got = decode_answer(encode_answer(outs, specs, AnswerSpec()), specs, AnswerSpec())
    assert set(got.ranked) == {"logits"} and set(got.full) == {"boxes", "ids", "map"}
    for name in got.full:
        np.testing.assert_array_equal(got.full[name], outs[name])


def test_default_format_is_top5_for_classifiers_else_full() -> None:
    assert answers.default_for([LOGITS]) == AnswerSpec("topk", 5)
    assert answers.default_for([TensorSpec("y", (1, 3), "float32")]) == FULL
    assert answers.default_for([TensorSpec("y", (1, 16, 16), "float32")]) == FULL


def test_answer_in_another_format_than_asked_is_refused() -> None:
    x = {"logits": logits()}
    with pytest.raises(CodecError):
        decode_answer(encode_answer(x, [LOGITS], FULL), [LOGITS], AnswerSpec())
    with pytest.raises(CodecError):
        decode_answer(encode_answer(x, [LOGITS], AnswerSpec("topk", 5)), [LOGITS], AnswerSpec("topk", 3))


def test_answer_naming_a_class_outside_the_output_is_refused() -> None:
    wire = answers.wire_specs([LOGITS], AnswerSpec())
    tensors = {
        "logits.idx": np.array([[0, 1, 2, 3, 1000]], np.int32),
        "logits.top": np.zeros((1, 5), np.float16),
        "logits.lse": np.zeros((1,), np.float32),
    }
    payload = codec.encode(tensors, wire, answers.ANSWER_CODEC)
    with pytest.raises(CodecError, match="outside"):
        decode_answer(payload, [LOGITS], AnswerSpec())


def test_topk_answer_is_a_fraction_of_the_full_one() -> None:
    x = {"logits": logits()}
    top5 = len(encode_answer(x, [LOGITS], AnswerSpec()))
    full = len(encode_answer(x, [LOGITS], FULL))
    assert full > 3500 and top5 < 200, (top5, full)
    # the cost model's figure is the real frame plus the sealed answer's fixed overhead
    assert answers.answer_bytes([LOGITS], AnswerSpec()) == top5 + answers.RESPONSE_SEAL_BYTES
    assert answers.answer_bytes([LOGITS], FULL) >= 4000
