"""Open Inference Protocol V2 (REST) for every tabular model family.

The protocol KServe, Triton and MLServer speak, so their clients (`tritonclient[http]`, KServe's
`InferenceRESTClient`) and tooling work against Tiffin unchanged:

- `GET  /v2`, `/v2/health/live`, `/v2/health/ready` — server metadata and health
- `GET  /v2/models/{name}[/versions/{version}]` — model metadata: inputs, outputs, versions
- `GET  /v2/models/{name}[/versions/{version}]/ready`
- `POST /v2/models/{name}[/versions/{version}]/infer`

A model takes either one 2-D tensor `input` of shape `[rows, n_features]` (the ONNX export's
input) or one 1-D tensor per feature, named as in the model card, of shape `[rows]` (or
`[rows, 1]`). Any numeric datatype or BOOL is accepted and cast to FP32, the models' input type,
because clients pick their own (numpy defaults to FP64). Data may be flat or nested; it is read
row-major. The binary tensor data extension (`Inference-Header-Content-Length`, inputs with
`parameters.binary_data_size`) is supported both ways, as `tritonclient` sends binary by default.

Outputs depend on the model's task: classifiers answer `probabilities` (FP32 `[rows, classes]`),
`class_index` (INT64 `[rows]`) and, when the card names its classes, `label` (BYTES `[rows]`);
regressors `prediction` (FP32 `[rows]`, or `[rows, outputs]` for multi-output models).

Requests without a version go through the backend's router (splits, canaries, shadows, metrics);
a version in the path pins it. Errors are `{"error": "..."}`: 400 for a malformed request or
tensor (naming the input and what is wrong), 404 for an unknown model or version.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tiffin.errors import InvalidInput, ModelNotFound, TiffinError
from tiffin.families import Families
from tiffin.http_errors import describe_errors, problem_of
from tiffin.pipelines import RowsPipeline, RowsRequest

if TYPE_CHECKING:
    from tiffin.model_pool import ModelPool
    from tiffin.model_store import ModelCard

HEADER_LENGTH = "inference-header-content-length"
SERVER_NAME = "tiffin"
EXTENSIONS = ["binary_tensor_data", "model_repository_metadata"]
TWO_D_INPUT = "input"
MAX_ROWS_DEFAULT = 1024

# The spec's datatypes and their numpy equivalents; BYTES carries length-prefixed strings.
NUMPY_OF: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
DATATYPES = (*NUMPY_OF, "BYTES")


class InferenceBackend(Protocol):
    """What the OIP routes need from the service; the lead's router implements it."""

    def model_names(self) -> list[str]:
        """Tabular model families served."""
        ...

    def versions(self, name: str) -> list[str]:
        """Versions of `name`; raises tiffin.errors.ModelNotFound for an unknown family."""
        ...

    def card(self, name: str, version: str | None) -> ModelCard:
        """The card of `version` (the serving default when None); ModelNotFound when unknown."""
        ...

    def ready(self, name: str, version: str | None) -> bool: ...

    async def infer(
        self, name: str, version: str | None, rows: np.ndarray
    ) -> tuple[str, np.ndarray]:
        """(version that answered, task-shaped outputs); routed through splits when version is
        None. Raises ModelNotFound for an unknown version."""
        ...


# --- wire types -------------------------------------------------------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RequestInput(_Wire):
    name: str = Field(min_length=1)
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class RequestOutput(_Wire):
    name: str = Field(min_length=1)
    parameters: dict[str, Any] | None = None


class InferenceRequest(_Wire):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(_Wire):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(_Wire):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class MetadataTensor(_Wire):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None


class ModelMetadata(_Wire):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, Any] | None = None


# --- tensors ----------------------------------------------------------------------------------


class BadTensor(InvalidInput):
    """A malformed tensor or request: 400 with the input named (the spec's status for it)."""


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def _check_shape(where: str, shape: Sequence[int]) -> int:
    if any(d < 0 for d in shape):
        raise BadTensor(f"{where}: shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def decode_tensor(tensor: RequestInput, binary: bytes | None) -> np.ndarray:
    """The tensor's values as an array of its declared shape, row-major."""
    where = f"input {tensor.name!r}"
    if tensor.datatype not in DATATYPES:
        raise BadTensor(
            f"{where}: datatype {tensor.datatype!r} is not one of {', '.join(DATATYPES)}"
        )
    size = _check_shape(where, tensor.shape)
    if tensor.datatype == "BYTES":
        raise BadTensor(
            f"{where}: datatype BYTES cannot feed a numeric model; send a numeric datatype (FP32)"
        )
    dtype = NUMPY_OF[tensor.datatype]
    if binary is not None:
        if len(binary) != size * dtype.itemsize:
            raise BadTensor(
                f"{where}: binary_data_size {len(binary)} bytes does not match shape "
                f"{tensor.shape} of {tensor.datatype} ({size * dtype.itemsize} bytes)"
            )
        return np.frombuffer(binary, dtype=dtype.newbyteorder("<")).reshape(tensor.shape)
    if tensor.data is None:
        raise BadTensor(f"{where}: has no data (and no binary_data_size)")
    try:
        values = np.asarray(tensor.data)
    except ValueError:
        raise BadTensor(f"{where}: data is not a rectangular array") from None
    if values.dtype == object:
        raise BadTensor(f"{where}: data is not a rectangular array of numbers")
    if values.size != size:
        raise BadTensor(
            f"{where}: shape {tensor.shape} needs {size} values but data has {values.size}"
        )
    if tensor.datatype == "BOOL":
        if values.size and values.dtype != np.bool_:
            raise BadTensor(f"{where}: datatype BOOL needs true/false values")
    elif values.size and values.dtype.kind not in "biuf":
        raise BadTensor(f"{where}: datatype {tensor.datatype} needs numbers, got {values.dtype}")
    elif (
        values.dtype.kind == "f"
        and NUMPY_OF[tensor.datatype].kind in "iu"
        and not (np.all(np.isfinite(values)) and np.all(values == np.round(values)))
    ):
        raise BadTensor(f"{where}: datatype {tensor.datatype} needs integers")
    return values.reshape(tensor.shape).astype(dtype, copy=False)


def rows_from_inputs(
    tensors: Sequence[tuple[RequestInput, np.ndarray]],
    feature_names: Sequence[str],
    max_rows: int,
) -> np.ndarray:
    """One FP32 row matrix in the model's feature order, from a 2-D `input` or per-feature
    tensors."""
    n_features = len(feature_names)
    names = [t.name for t, _ in tensors]
    if len(set(names)) != len(names):
        raise BadTensor(f"inputs: duplicate input names {names}")
    accepted = f"{TWO_D_INPUT!r} [rows, {n_features}] or one input per feature: " + ", ".join(
        feature_names
    )
    unknown = [n for n in names if n != TWO_D_INPUT and n not in feature_names]
    if unknown:
        raise BadTensor(f"input {unknown[0]!r}: unknown input name; the model takes {accepted}")
    if TWO_D_INPUT in names and TWO_D_INPUT not in feature_names:
        if len(names) > 1:
            raise BadTensor(f"inputs: send {TWO_D_INPUT!r} alone, or one input per feature")
        tensor, values = tensors[0]
        if values.ndim != 2 or values.shape[1] != n_features:
            raise BadTensor(
                f"input {TWO_D_INPUT!r}: shape {tensor.shape} should be [rows, {n_features}] "
                f"({', '.join(feature_names)})"
            )
        matrix = values
    else:
        missing = [f for f in feature_names if f not in names]
        if missing:
            raise BadTensor(f"inputs: missing {', '.join(missing)}; the model takes {accepted}")
        by_name = dict(zip(names, (v for _, v in tensors), strict=True))
        columns = []
        for feature in feature_names:
            values = by_name[feature]
            if values.ndim == 2 and values.shape[1] == 1:
                values = values[:, 0]
            if values.ndim != 1:
                raise BadTensor(
                    f"input {feature!r}: shape {list(values.shape)} should be [rows] or [rows, 1]"
                )
            columns.append(values)
        lengths = {len(c) for c in columns}
        if len(lengths) != 1:
            raise BadTensor(f"inputs: every feature needs the same number of rows, got {lengths}")
        matrix = np.column_stack(columns)
    if matrix.shape[0] == 0:
        raise BadTensor("inputs: no rows to score")
    if matrix.shape[0] > max_rows:
        raise BadTensor(f"inputs: {matrix.shape[0]} rows is more than the limit of {max_rows}")
    return np.ascontiguousarray(matrix, dtype=np.float32)


def output_tensors(card: ModelCard, outputs: np.ndarray) -> dict[str, tuple[str, np.ndarray]]:
    """The task's outputs as {name: (datatype, array)}."""
    if card.task in ("binary", "multiclass"):
        probs = outputs if outputs.ndim == 2 else np.column_stack([1 - outputs, outputs])
        index = probs.argmax(axis=1).astype(np.int64)
        found: dict[str, tuple[str, np.ndarray]] = {
            "probabilities": ("FP32", probs.astype(np.float32)),
            "class_index": ("INT64", index),
        }
        labels = card.output_names
        if len(labels) == probs.shape[1]:
            found["label"] = ("BYTES", np.asarray([labels[k] for k in index], dtype=object))
        return found
    return {"prediction": ("FP32", outputs.astype(np.float32))}


def output_metadata(card: ModelCard) -> list[MetadataTensor]:
    if card.task in ("binary", "multiclass"):
        classes = len(card.output_names) if card.task == "multiclass" else 2
        meta = [
            MetadataTensor(name="probabilities", datatype="FP32", shape=[-1, classes]),
            MetadataTensor(name="class_index", datatype="INT64", shape=[-1]),
        ]
        if len(card.output_names) == classes:
            meta.append(
                MetadataTensor(
                    name="label",
                    datatype="BYTES",
                    shape=[-1],
                    parameters={"labels": card.output_names},
                )
            )
        return meta
    shape = [-1, len(card.output_names)] if card.task == "multi_output" else [-1]
    names = {"output_names": card.output_names} if card.output_names else None
    return [MetadataTensor(name="prediction", datatype="FP32", shape=shape, parameters=names)]


def _bytes_element(value: Any) -> bytes:
    raw = value if isinstance(value, bytes) else str(value).encode()
    return struct.pack("<I", len(raw)) + raw


def encode_response(
    body: dict[str, Any],
    tensors: dict[str, tuple[str, np.ndarray]],
    binary_names: set[str],
) -> Response:
    """JSON, or JSON followed by raw tensors (binary extension) for the outputs asked so."""
    blobs: list[bytes] = []
    outputs = []
    for name, (datatype, values) in tensors.items():
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(values.shape)}
        if name in binary_names:
            if datatype == "BYTES":
                blob = b"".join(_bytes_element(v) for v in values.reshape(-1))
            else:
                little = NUMPY_OF[datatype].newbyteorder("<")
                blob = np.ascontiguousarray(values, dtype=little).tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = values.reshape(-1).tolist()
        outputs.append(out)
    header = orjson.dumps({**body, "outputs": outputs})
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *blobs]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


def parse_request(raw: bytes, header_length: str | None) -> tuple[InferenceRequest, bytes]:
    """The JSON part as an InferenceRequest and the binary part (empty without one)."""
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise BadTensor("Inference-Header-Content-Length: not an integer") from None
        if not 0 < split <= len(raw):
            raise BadTensor(
                f"Inference-Header-Content-Length: {split} is outside the body ({len(raw)} bytes)"
            )
        head, tail = raw[:split], raw[split:]
    else:
        head, tail = raw, b""
    try:
        payload = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise BadTensor(f"body: invalid JSON ({exc})") from None
    try:
        return InferenceRequest.model_validate(payload), tail
    except ValidationError as exc:
        raise BadTensor(describe_errors(exc.errors(include_url=False))) from None


def decode_inputs(
    request: InferenceRequest, binary: bytes
) -> list[tuple[RequestInput, np.ndarray]]:
    decoded = []
    offset = 0
    for tensor in request.inputs:
        size = (tensor.parameters or {}).get("binary_data_size")
        chunk = None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadTensor(f"input {tensor.name!r}: binary_data_size must be an integer")
            if offset + size > len(binary):
                raise BadTensor(
                    f"input {tensor.name!r}: binary_data_size {size} runs past the body's end"
                )
            chunk = binary[offset : offset + size]
            offset += size
        decoded.append((tensor, decode_tensor(tensor, chunk)))
    if offset != len(binary):
        raise BadTensor(f"body: {len(binary) - offset} bytes of binary data belong to no input")
    return decoded


def _wants_binary(
    request: InferenceRequest, available: Sequence[str]
) -> tuple[list[str], set[str]]:
    """(output names to return, those to return as binary)."""
    every_binary = bool((request.parameters or {}).get("binary_data_output", False))
    if not request.outputs:
        return list(available), set(available) if every_binary else set()
    names, binary = [], set()
    for out in request.outputs:
        if out.name not in available:
            raise BadTensor(
                f"output {out.name!r}: unknown output; the model answers {', '.join(available)}"
            )
        names.append(out.name)
        if (out.parameters or {}).get("binary_data", every_binary):
            binary.add(out.name)
    return names, binary


# --- routes -----------------------------------------------------------------------------------


def oip_routes(
    get_backend: Callable[[Request], InferenceBackend],
    max_rows: int = MAX_ROWS_DEFAULT,
    server_version: str = "0.1.0",
) -> list[Route]:
    """The V2 REST routes; `get_backend(request)` gives the worker's backend (the lead's
    composition root), so one route list serves any number of apps."""

    def guarded(handler: Callable[[Request, InferenceBackend], Awaitable[Response]]) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request, get_backend(request))
            except Exception as exc:
                problem = problem_of(exc)  # the one error table; the protocol's own statuses:
                status = problem.status  # every malformed request is a 400, unknown a 404
                if 400 <= status < 500 and status != 404:
                    status = 400
                return _error(status, problem.message)

        return endpoint

    def _version(request: Request) -> str | None:
        return request.path_params.get("version")

    def _known(backend: InferenceBackend, name: str, version: str | None) -> None:
        versions = backend.versions(name)
        if version is not None and version not in versions:
            raise ModelNotFound(f"version {version!r} of model {name!r} does not exist")

    async def server_metadata(_: Request, __: InferenceBackend) -> Response:
        return _json({"name": SERVER_NAME, "version": server_version, "extensions": EXTENSIONS})

    async def live(_: Request, __: InferenceBackend) -> Response:
        return _json({"live": True})

    async def server_ready(_: Request, backend: InferenceBackend) -> Response:
        names = backend.model_names()
        ready = bool(names) and all(backend.ready(n, None) for n in names)
        return _json({"ready": ready}, 200 if ready else 400)

    async def model_metadata(request: Request, backend: InferenceBackend) -> Response:
        name, version = request.path_params["name"], _version(request)
        _known(backend, name, version)
        card = backend.card(name, version)
        n = len(card.feature_names)
        meta = ModelMetadata(
            name=name,
            versions=[version] if version else backend.versions(name),
            platform=f"tiffin_{card.framework}",
            inputs=[
                MetadataTensor(
                    name=TWO_D_INPUT,
                    datatype="FP32",
                    shape=[-1, n],
                    parameters={"feature_names": card.feature_names},
                )
            ],
            outputs=output_metadata(card),
            parameters={"task": card.task, "per_feature_inputs": True},
        )
        return _json(meta.model_dump(exclude_none=True))

    async def model_ready(request: Request, backend: InferenceBackend) -> Response:
        name, version = request.path_params["name"], _version(request)
        _known(backend, name, version)
        ready = backend.ready(name, version)
        return _json({"name": name, "ready": ready}, 200 if ready else 400)

    async def infer(request: Request, backend: InferenceBackend) -> Response:
        name, version = request.path_params["name"], _version(request)
        _known(backend, name, version)
        parsed, binary = parse_request(await request.body(), request.headers.get(HEADER_LENGTH))
        card = backend.card(name, version)
        decoded = decode_inputs(parsed, binary)
        rows = rows_from_inputs(decoded, card.feature_names, max_rows)
        answered, raw = await backend.infer(name, version, rows)
        if version is None:  # routed: the answering version's card, which is cheap to look up
            routed = backend.card(name, answered)
            if routed.feature_names != card.feature_names:
                # The router chose a version whose columns differ from the default's: the rows
                # were laid out for the wrong model, so they are rebuilt and that version pinned.
                rows = rows_from_inputs(decoded, routed.feature_names, max_rows)
                answered, raw = await backend.infer(name, answered, rows)
            card = routed  # its outputs (classes) may differ too
        tensors = output_tensors(card, raw)
        names, binary_names = _wants_binary(parsed, list(tensors))
        body: dict[str, Any] = {"model_name": name, "model_version": answered}
        if parsed.id is not None:
            body["id"] = parsed.id
        return encode_response(body, {n: tensors[n] for n in names}, binary_names)

    model_paths = ["/v2/models/{name}", "/v2/models/{name}/versions/{version}"]
    routes = [
        Route("/v2", guarded(server_metadata), methods=["GET"]),
        Route("/v2/health/live", guarded(live), methods=["GET"]),
        Route("/v2/health/ready", guarded(server_ready), methods=["GET"]),
    ]
    for path in model_paths:
        routes += [
            Route(path, guarded(model_metadata), methods=["GET"]),
            Route(f"{path}/ready", guarded(model_ready), methods=["GET"]),
            Route(f"{path}/infer", guarded(infer), methods=["POST"]),
        ]
    return routes


# --- an in-process backend over the model store -----------------------------------------------


class StoreBackend:
    """`InferenceBackend` over one `ModelPool` per family, straight from the BentoML model store:
    no router (a request without a version is answered by the family's newest version). For tests
    and tools; the service mounts the routes over its router instead."""

    def __init__(self) -> None:
        self._pools: dict[str, ModelPool] = {}

    def model_names(self) -> list[str]:
        from tiffin import model_store

        return sorted(
            {
                m.tag.name
                for m in model_store.tiffin_models()
                if m.info.labels.get("framework") != "mlx"
            }
        )

    def versions(self, name: str) -> list[str]:
        from tiffin import model_store

        found = [
            m.tag.version or ""
            for m in model_store.tiffin_models()
            if m.tag.name == name and m.info.labels.get("framework") != "mlx"
        ]
        if not found:
            raise ModelNotFound(f"model {name!r} is not served")
        return found

    def _pool(self, name: str) -> ModelPool:
        from tiffin.model_pool import ModelPool

        if name not in self._pools:
            self._pools[name] = ModelPool(name, self.versions(name)[0])
        return self._pools[name]

    def card(self, name: str, version: str | None) -> ModelCard:
        return self._pool(name).get(version).card

    def ready(self, name: str, version: str | None) -> bool:
        try:
            self.card(name, version)  # a version that cannot be loaded has no card to give
        except TiffinError:
            return False
        return True

    async def infer(
        self, name: str, version: str | None, rows: np.ndarray
    ) -> tuple[str, np.ndarray]:
        model = self._pool(name).get(version)
        return model.version, model.predict(rows)


class RouterBackend(StoreBackend):
    """The service's `InferenceBackend`: names, versions and cards from the model store, every
    inference through the worker's router (splits, canaries, shadows, metrics), as a pipeline."""

    def __init__(self, families: Families, rows: RowsPipeline) -> None:
        super().__init__()
        self.families = families
        self.rows = rows

    def card(self, name: str, version: str | None) -> ModelCard:
        from tiffin import model_store

        version = version or self.families.get(name).default_version
        return model_store.card_of(model_store.get(name, version))

    async def infer(
        self, name: str, version: str | None, rows: np.ndarray
    ) -> tuple[str, np.ndarray]:
        return await self.rows(RowsRequest(name, version, rows))
