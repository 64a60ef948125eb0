"""The Open Inference Protocol (KServe v2 / Triton gRPC) on the tail service's port.

Users already own clients and load tools for this protocol (`tritonclient`, `perf_analyzer`,
KServe SDKs); serving it beside edgecut's native stream lets them call any bundle, whole or at a
cut (`edgecut.cloud.catalog` names them), with no edgecut code. It runs on the same
`TailPipeline` as the native stream: same registry, executor, batcher, metrics, limits and tokens.

These payloads are plaintext tensors by the protocol's nature: no HPKE seal, no replay guard, no
device binding. Serve them over TLS (`--tls-cert/--tls-key`); the sealed path is `Infer`.

Auth: with device tokens configured, every call but ServerLive / ServerReady (probes) needs
`authorization: Bearer <token>`, and a grant's model list applies (by bundle model name).
Errors are the protocol's: a gRPC status with one message (INVALID_ARGUMENT for a tensor whose
name, datatype or shape the model does not take).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from edgecut import __version__
from edgecut.cloud import catalog, oip_tensors
from edgecut.cloud.admission import Caller, authenticate
from edgecut.cloud.pipeline import TailPipeline, authorize
from edgecut.errors import CodecError, EdgecutError, NotFoundError
from edgecut.v1 import grpc_predict_v2_pb2 as opb

log = logging.getLogger(__name__)

# The standard service path tritonclient / KServe clients call; edgecut's proto package differs
# (edgecut.v1.oip) only so its messages never collide with a client's `inference` gencode.
WIRE_SERVICE = "inference.GRPCInferenceService"
PLATFORM = "onnxruntime_onnx"
MAX_STREAM_IN_FLIGHT = 256  # ModelStreamInfer requests one stream may hold at once
_Tensor = opb.ModelInferResponse.InferOutputTensor
_Meta = opb.ModelMetadataResponse.TensorMetadata


class InferenceServicer:
    """`inference.GRPCInferenceService` over a `TailPipeline`."""

    def __init__(self, pipeline: TailPipeline) -> None:
        self.pipeline = pipeline
        self.ctx = pipeline.ctx

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return opb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return opb.ServerReadyResponse(ready=bool(self.ctx.registry.entries()))

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await authenticate(self.ctx.grants, context)
        return opb.ServerMetadataResponse(name="edgecut", version=__version__, extensions=["streaming"])

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        caller = await authenticate(self.ctx.grants, context)
        try:
            self._resolve(caller, request.name, request.version)
        except EdgecutError:
            return opb.ModelReadyResponse(ready=False)
        return opb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        caller = await authenticate(self.ctx.grants, context)
        try:
            manifest, cut = self._resolve(caller, request.name, request.version)
        except EdgecutError as exc:
            await context.abort(grpc.StatusCode[exc.grpc_status], exc.message)
        model, _ = catalog.split_name(request.name)
        versions = sorted({e.key[1] for e in self.ctx.registry.entries() if e.key[0] == model})
        batch = -1 if manifest.batchable else None
        return opb.ModelMetadataResponse(
            name=request.name,
            versions=versions,
            platform=PLATFORM,
            inputs=[_meta(t.name, t.dtype, t.shape, batch) for t in cut.frontier],
            outputs=[_meta(t.name, t.dtype, t.shape, batch) for t in manifest.outputs],
        )

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        caller = await authenticate(self.ctx.grants, context)
        remaining = context.time_remaining()
        deadline_ms = time.time_ns() // 1_000_000 + int(remaining * 1e3) if remaining is not None else 0
        try:
            return await self._infer(request, caller, deadline_ms)
        except EdgecutError as exc:
            status = self.pipeline.note_failure(catalog.split_name(request.model_name)[0], exc)
            message = f"{exc.message} (hint: {exc.hint})" if exc.hint else exc.message
            await context.abort(status, message)
        raise AssertionError("unreachable")  # abort raises

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Triton's streaming extension: each request answered as it finishes, errors in-band."""
        caller = await authenticate(self.ctx.grants, context)
        answers: asyncio.Queue[Any] = asyncio.Queue(MAX_STREAM_IN_FLIGHT)
        tasks: set[asyncio.Task[None]] = set()

        async def one(request: Any) -> None:
            try:
                response = await self._infer(request, caller, 0)
                await answers.put(opb.ModelStreamInferResponse(infer_response=response))
            except EdgecutError as exc:
                self.pipeline.note_failure(catalog.split_name(request.model_name)[0], exc)
                error = f"{grpc.StatusCode[exc.grpc_status].name}: {exc.message}"
                reply = opb.ModelInferResponse(model_name=request.model_name, id=request.id)
                await answers.put(opb.ModelStreamInferResponse(error_message=error, infer_response=reply))

        async def read() -> None:
            with contextlib.suppress(Exception):  # the client went away: its tasks are cancelled
                async for request in requests:
                    if len(tasks) >= MAX_STREAM_IN_FLIGHT:
                        busy = f"RESOURCE_EXHAUSTED: more than {MAX_STREAM_IN_FLIGHT} requests in flight"
                        reply = opb.ModelInferResponse(model_name=request.model_name, id=request.id)
                        refused = opb.ModelStreamInferResponse(error_message=busy, infer_response=reply)
                        await answers.put(refused)
                        continue
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                await asyncio.gather(*list(tasks), return_exceptions=True)
            await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _infer(self, request: Any, caller: Caller, deadline_ms: int) -> Any:
        t0 = time.perf_counter()
        in_flight = self.ctx.limits.in_flight
        in_flight.acquire(caller.identity)
        try:
            manifest, cut = self._resolve(caller, request.model_name, request.model_version)
            tensors = oip_tensors.read_inputs(request, self.ctx.config.max_decoded_bytes)
            specs = {t.name: t for t in cut.frontier}
            whole_image = cut.id == catalog.WHOLE_MODEL_CUT and manifest.preprocess.kind == "image"
            feeds = {}
            for tensor in request.inputs:
                spec = specs.get(tensor.name)
                if spec is None:
                    known = sorted(specs)
                    raise CodecError(f"{request.model_name} has no input {tensor.name!r} (inputs: {known})")
                params = {k: oip_tensors.param_value(v) for k, v in tensor.parameters.items()}
                pre = manifest.preprocess if whole_image else None
                feeds[spec.name] = oip_tensors.to_bundle(tensors[spec.name], spec, params, pre)
            wanted = [o.name for o in request.outputs] or [t.name for t in manifest.outputs]
            unknown = sorted(set(wanted) - {t.name for t in manifest.outputs})
            if unknown:
                raise CodecError(f"{request.model_name} has no output(s) {unknown}")
            model, _ = catalog.split_name(request.model_name)
            answer = await self.pipeline.infer_tensors(
                caller, model, manifest.version, cut.id, feeds, deadline_ms=deadline_ms
            )
        finally:
            in_flight.release(caller.identity)
        self.ctx.metrics.requests.labels(model, "OK").inc()
        self.ctx.metrics.triton.request(model, answer.version, True, time.perf_counter() - t0)
        response = opb.ModelInferResponse(
            model_name=request.model_name, model_version=answer.version, id=request.id
        )
        oip_tensors.write_outputs(response, answer.outputs, wanted, _Tensor)
        return response

    def _resolve(self, caller: Caller, name: str, version: str) -> tuple[Any, Any]:
        """The manifest and cut an OIP model name means; NotFoundError / ForbiddenError if none."""
        model, cut_id = catalog.split_name(name)
        authorize(self.ctx.grants, caller, model)
        with self.ctx.registry.acquire(model, version) as entry:
            manifest = entry.bundle.manifest
            cut = self.ctx.registry.cut(entry, cut_id)
        if not manifest.tail(cut.id):
            raise NotFoundError(f"{name}: the {cut.id!r} cut has no tail to serve")
        return manifest, cut


def _meta(name: str, dtype: str, shape: tuple[int, ...], batch: int | None) -> Any:
    dims = [batch if (k == 0 and batch is not None) else d for k, d in enumerate(shape)]
    return _Meta(name=name, datatype=oip_tensors.datatype_of(dtype), shape=dims)


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Serve `servicer` under the standard `inference.GRPCInferenceService` path."""
    handlers = {}
    for method in opb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        request, response = getattr(opb, method.input_type.name), getattr(opb, method.output_type.name)
        streams = method.server_streaming
        make = grpc.stream_stream_rpc_method_handler if streams else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(WIRE_SERVICE, handlers),))
