"""The Open Inference Protocol on the tail service's port, spoken by the real `tritonclient[grpc]`.

The server is the real `create_server` (native stream and OIP on one port) with the real
EfficientNet-Lite0 bundle; the client is NVIDIA's own gRPC client, so wire compatibility is what
is tested, not edgecut's idea of it.
"""

from __future__ import annotations

import queue
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from edgecut.bundle import load_bundle
from edgecut.images import prepare, sample_photos

tg = pytest.importorskip("tritonclient.grpc", reason="pip install 'tritonclient[grpc]' (edgecut[dev])")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
MODEL = "efficientnet-lite0"


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return dict(sample_photos())["chelsea"]


@pytest.fixture
def server(tail_server: Any) -> Iterator[Any]:
    with tail_server(max_queue_delay_ms=2, metrics_port=0) as handle:
        yield handle


def client(port: int) -> Any:
    return tg.InferenceServerClient(f"127.0.0.1:{port}")


def infer(c: Any, model: str, arrays: dict[str, np.ndarray], datatype: str | None = None, **kw: Any) -> Any:
    inputs = []
    for name, x in arrays.items():
        t = tg.InferInput(name, list(x.shape), datatype or tg_datatype(x))
        t.set_data_from_numpy(x)
        inputs.append(t)
    return c.infer(model, inputs, **kw)


def tg_datatype(x: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return str(np_to_triton_dtype(x.dtype))


def test_live_ready_and_metadata(server: Any, effl0_bundle: Path) -> None:
    m = load_bundle(effl0_bundle).manifest
    c = client(server.port)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready(MODEL) and c.is_model_ready(f"{MODEL}@c11")
    assert c.is_model_ready(MODEL, m.version)
    assert not c.is_model_ready("no-such-model")
    assert not c.is_model_ready(f"{MODEL}@c99")
    assert not c.is_model_ready(f"{MODEL}@output")  # nothing left to run behind the last cut
    meta = c.get_server_metadata()
    assert meta.name == "edgecut" and meta.version
    whole = c.get_model_metadata(MODEL)
    assert list(whole.versions) == [m.version] and whole.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in whole.inputs] == [
        (m.inputs[0].name, "FP32", [-1, *m.inputs[0].shape[1:]])
    ]
    assert [t.name for t in whole.outputs] == [o.name for o in m.outputs]
    c11 = c.get_model_metadata(f"{MODEL}@c11")
    assert [(t.name, list(t.shape)) for t in c11.inputs] == [
        (s.name, [-1, *s.shape[1:]]) for s in m.cut("c11").frontier
    ]
    with pytest.raises(InferenceServerException) as err:
        c.get_model_metadata("no-such-model")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_cat_photo_is_a_cat_whole_and_at_a_cut(server: Any, edge: Any, chelsea: np.ndarray) -> None:
    m = edge.manifest
    c = client(server.port)
    x = prepare(chelsea, m.preprocess)
    out = infer(c, MODEL, {m.inputs[0].name: x}, request_id="r1")
    logits = out.as_numpy(m.outputs[0].name)
    assert out.get_response().id == "r1" and out.get_response().model_version == m.version
    assert int(np.argmax(logits)) in CAT_CLASSES
    reference = edge.logits(chelsea)
    np.testing.assert_allclose(logits, reference, atol=1e-3)
    frontier = edge.frontier(chelsea, "c11")
    at_cut = infer(c, f"{MODEL}@c11", frontier).as_numpy(m.outputs[0].name)
    np.testing.assert_allclose(at_cut, reference, atol=1e-3)
    half = {k: v.astype(np.float16) for k, v in frontier.items()}  # FP16: half the bytes
    assert int(np.argmax(infer(c, f"{MODEL}@c11", half).as_numpy(m.outputs[0].name))) in CAT_CLASSES


def test_uint8_pixels_and_int8_frontier_are_accepted(server: Any, edge: Any, chelsea: np.ndarray) -> None:
    m = edge.manifest
    c = client(server.port)
    x = prepare(chelsea, m.preprocess)
    mean, std = np.asarray(m.preprocess.mean)[:, None, None], np.asarray(m.preprocess.std)[:, None, None]
    pixels = np.clip(np.rint(x * std + mean), 0, 255).astype(np.uint8)  # the photo as UINT8 NCHW
    logits = infer(c, MODEL, {m.inputs[0].name: pixels}).as_numpy(m.outputs[0].name)
    assert int(np.argmax(logits)) == int(np.argmax(edge.logits(chelsea)))
    (name, f), *_ = edge.frontier(chelsea, "c11").items()
    scale = float(np.abs(f).max()) / 127
    q = np.clip(np.rint(f / scale), -127, 127).astype(np.int8)
    with server.channel() as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = int8_request(f"{MODEL}@c11", name, q)
        request.inputs[0].parameters["scale"].double_param = scale  # Triton's InferParameter field
        reply = stub.ModelInfer(request)
        out = np.frombuffer(reply.raw_output_contents[0], np.float32)
        assert int(np.argmax(out)) in CAT_CLASSES
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(int8_request(f"{MODEL}@c11", name, q))  # no scale: no meaning
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INT8 (scale)" in str(err.value.details())


def int8_request(model: str, name: str, q: np.ndarray) -> Any:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="INT8", shape=list(q.shape))
    request.raw_input_contents.append(q.tobytes())
    return request


def test_typed_contents_give_the_same_answer_as_raw(server: Any, edge: Any, chelsea: np.ndarray) -> None:
    m = edge.manifest
    x = prepare(chelsea, m.preprocess)
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name=m.inputs[0].name, datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    with server.channel() as channel:
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    (out,) = reply.outputs
    logits = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(list(out.shape))
    np.testing.assert_allclose(logits, edge.logits(chelsea), atol=1e-3)


@pytest.mark.parametrize(
    ("shape", "datatype", "says"),
    [
        ((1, 3, 200, 200), "FP32", "shape [1, 3, 200, 200]"),
        ((3, 224, 224), "FP32", "shape [3, 224, 224]"),
        ((1, 3, 224, 224), "INT64", "datatype INT64"),
    ],
)
def test_wrong_tensor_is_invalid_argument(
    server: Any, edge: Any, shape: tuple[int, ...], datatype: str, says: str
) -> None:
    c = client(server.port)
    x = np.zeros(shape, np.int64 if datatype == "INT64" else np.float32)
    with pytest.raises(InferenceServerException) as err:
        infer(c, MODEL, {edge.manifest.inputs[0].name: x}, datatype)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value
    assert says in err.value.message()
    assert c.is_server_live()  # and it goes on serving


def test_raw_bytes_that_do_not_match_the_shape_are_invalid_argument(server: Any) -> None:
    request = service_pb2.ModelInferRequest(model_name=f"{MODEL}@c11")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\0" * 12)
    with server.channel() as channel, pytest.raises(grpc.RpcError) as err:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "12 raw bytes" in str(err.value.details())


def test_stream_infer_answers_each_request(server: Any, edge: Any, chelsea: np.ndarray) -> None:
    m = edge.manifest
    c = client(server.port)
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        x = prepare(chelsea, m.preprocess)
        t = tg.InferInput(m.inputs[0].name, list(x.shape), "FP32")
        t.set_data_from_numpy(x)
        bad = tg.InferInput(m.inputs[0].name, [1, 3, 8, 8], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
        c.async_stream_infer(MODEL, [t], request_id="good")
        c.async_stream_infer(MODEL, [bad], request_id="bad")
        got = [results.get(timeout=60) for _ in range(2)]
    finally:
        c.stop_stream()
    good = [r for r, e in got if e is None]
    errors = [e for r, e in got if e is not None]
    assert len(good) == 1 and int(np.argmax(good[0].as_numpy(m.outputs[0].name))) in CAT_CLASSES
    assert len(errors) == 1 and "INVALID_ARGUMENT" in str(errors[0])


def test_triton_named_metrics_count_inferences(server: Any, edge: Any, chelsea: np.ndarray) -> None:
    m = edge.manifest
    c = client(server.port)
    for _ in range(3):
        infer(c, MODEL, {m.inputs[0].name: prepare(chelsea, m.preprocess)})
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    count = rf'^nv_inference_count(?:_total)?{{model="{MODEL}",version="[^"]*"}} (\S+)'
    counts = re.findall(count, text, re.M)
    assert counts and float(counts[0]) == 3.0, text
    assert re.search(rf'^nv_inference_request_success(?:_total)?{{model="{MODEL}"', text, re.M)
    assert re.search(rf'^nv_inference_compute_infer_duration_us(?:_total)?{{model="{MODEL}"', text, re.M)


def test_device_token_is_enforced(tail_server: Any, tmp_path: Path, edge: Any, chelsea: np.ndarray) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("tok-a cam-1\ntok-b cam-2 other-model\n")
    tokens.chmod(0o600)
    m = edge.manifest
    x = {m.inputs[0].name: prepare(chelsea, m.preprocess)}
    with tail_server(tokens=tokens) as h:
        c = client(h.port)
        assert c.is_server_live()  # probes need no token
        for headers, status in [
            (None, "StatusCode.UNAUTHENTICATED"),
            ({"authorization": "Bearer nope"}, "StatusCode.UNAUTHENTICATED"),
            ({"authorization": "Bearer tok-b"}, "StatusCode.PERMISSION_DENIED"),  # not its model
        ]:
            with pytest.raises(InferenceServerException) as err:
                infer(c, MODEL, x, headers=headers)
            assert err.value.status() == status
        out = infer(c, MODEL, x, headers={"authorization": "Bearer tok-a"})
        assert int(np.argmax(out.as_numpy(m.outputs[0].name))) in CAT_CLASSES
