"""Open Inference Protocol V2 routes, served by a real uvicorn on loopback over really trained
models, called with Triton's own HTTP client (`tritonclient[http]`) and with raw HTTP for the
malformed requests a well-behaved client cannot send."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from starlette.applications import Starlette

from tests.conftest import free_port, wait_for
from tiffin.featurize import CARD_FRAUD_FEATURES
from tiffin.oip import StoreBackend, oip_routes


@pytest.fixture(scope="module")
def backend(model_store: str) -> StoreBackend:
    return StoreBackend()


@pytest.fixture(scope="module")
def oip_url(backend: StoreBackend) -> Iterator[str]:
    app = Starlette(routes=oip_routes(lambda _: backend, max_rows=64))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 20, "uvicorn")
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def triton(oip_url: str):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=oip_url)
    yield client
    client.close()


def _input(name: str, array: np.ndarray, datatype: str, binary: bool = True):
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def test_server_health_and_metadata(triton) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "tiffin" and "binary_tensor_data" in meta["extensions"]
    assert triton.is_model_ready("card_fraud")
    assert triton.is_model_ready("species_classifier", "v2-quantized")
    assert not triton.is_model_ready("nope")


def test_model_metadata_names_features_and_outputs(triton) -> None:
    meta = triton.get_model_metadata("species_classifier")
    assert set(meta["versions"]) == {"v1", "v2", "v2-quantized"}
    assert meta["inputs"][0]["name"] == "input" and meta["inputs"][0]["shape"] == [-1, 4]
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert outputs["probabilities"]["shape"] == [-1, 3] and outputs["label"]["datatype"] == "BYTES"
    pinned = triton.get_model_metadata("species_classifier", "v1")
    assert pinned["versions"] == ["v1"]


@pytest.mark.parametrize("binary", [True, False])
def test_triton_infer_matches_the_model(triton, backend: StoreBackend, binary: bool) -> None:
    import tritonclient.http as httpclient

    rows = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.8, 2.2]], dtype=np.float32)
    outputs = [
        httpclient.InferRequestedOutput(name, binary_data=binary)
        for name in ("probabilities", "label", "class_index")
    ]
    result = triton.infer(
        "species_classifier",
        [_input("input", rows, "FP32", binary)],
        model_version="v1",
        outputs=outputs,
        request_id="req-1",
    )
    expected = backend._pool("species_classifier").get("v1").predict(rows)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-6)
    assert [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")] == [
        "setosa",
        "virginica",
    ]
    assert result.as_numpy("class_index").tolist() == list(expected.argmax(axis=1))
    response = result.get_response()
    assert response["model_version"] == "v1" and response["id"] == "req-1"


def test_triton_per_feature_fp64_inputs_and_default_binary_outputs(triton, backend) -> None:
    rng = np.random.default_rng(3)
    table = rng.normal(1, 2, (5, len(CARD_FRAUD_FEATURES)))
    inputs = [
        _input(name, table[:, i].copy(), "FP64") for i, name in enumerate(CARD_FRAUD_FEATURES)
    ]
    result = triton.infer("card_fraud", inputs)  # no outputs: every output, binary
    expected = backend._pool("card_fraud").get().predict(table.astype(np.float32))
    np.testing.assert_allclose(result.as_numpy("probabilities")[:, 1], expected, rtol=1e-5)
    assert result.get_response()["model_version"] == "v1.0"


def test_regression_and_multi_output_shapes(triton) -> None:
    bid = triton.infer("bid_optimization", [_input("input", np.ones((3, 5), np.float32), "FP32")])
    assert bid.as_numpy("prediction").shape == (3,)
    meta = triton.get_model_metadata("personalization")
    n = meta["inputs"][0]["shape"][1]
    person = triton.infer(
        "personalization", [_input("input", np.zeros((2, n), np.float32), "FP32")]
    )
    assert person.as_numpy("prediction").shape == (2, 3)


def test_triton_client_sees_errors(triton) -> None:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="nope"):
        triton.infer("nope", [_input("input", np.ones((1, 4), np.float32), "FP32")])
    with pytest.raises(InferenceServerException, match=r"should be \[rows, 4\]"):
        triton.infer("species_classifier", [_input("input", np.ones((1, 3), np.float32), "FP32")])
    with pytest.raises(InferenceServerException, match="'petal'"):
        triton.infer("species_classifier", [_input("petal", np.ones(2, np.float32), "FP32")])
    with pytest.raises(InferenceServerException, match="BYTES"):
        triton.infer(
            "species_classifier",
            [_input("input", np.array([["a", "b", "c", "d"]], dtype=object), "BYTES")],
        )


def _post(oip_url: str, path: str, body: object) -> httpx.Response:
    return httpx.post(f"http://{oip_url}{path}", json=body, timeout=10)


GOOD = {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}


@pytest.mark.parametrize(
    ("path", "body", "status", "names"),
    [
        ("/v2/models/nope/infer", {"inputs": [GOOD]}, 404, "'nope'"),
        ("/v2/models/species_classifier/versions/v9/infer", {"inputs": [GOOD]}, 404, "'v9'"),
        (
            "/v2/models/species_classifier/infer",
            {"inputs": [{**GOOD, "datatype": "FP128"}]},
            400,
            "datatype 'FP128'",
        ),
        (
            "/v2/models/species_classifier/infer",
            {"inputs": [{**GOOD, "shape": [2, 4]}]},
            400,
            "needs 8 values but data has 4",
        ),
        (
            "/v2/models/species_classifier/infer",
            {"inputs": [{**GOOD, "shape": [2, 2]}]},
            400,
            "should be [rows, 4]",
        ),
        (
            "/v2/models/species_classifier/infer",
            {"inputs": [{**GOOD, "name": "sepal"}]},
            400,
            "input 'sepal': unknown input name",
        ),
        (
            "/v2/models/species_classifier/infer",
            {"inputs": [{**GOOD, "datatype": "INT32"}]},
            400,
            "INT32 needs integers",
        ),
        (
            "/v2/models/species_classifier/infer",
            {"inputs": [{**GOOD, "data": [[1, 2], [3]], "shape": [1, 3]}]},
            400,
            "rectangular",
        ),
        (
            "/v2/models/species_classifier/infer",
            {"inputs": [{**GOOD, "data": ["a", "b", "c", "d"]}]},
            400,
            "needs numbers",
        ),
        ("/v2/models/species_classifier/infer", {"inputs": []}, 400, "inputs"),
        ("/v2/models/species_classifier/infer", {"inputs": [{"name": "input"}]}, 400, "shape"),
        (
            "/v2/models/species_classifier/infer",
            {"inputs": [GOOD], "outputs": [{"name": "logits"}]},
            400,
            "output 'logits'",
        ),
        (
            "/v2/models/species_classifier/infer",
            {"inputs": [{**GOOD, "shape": [100, 4], "data": [1.0] * 400}]},
            400,
            "limit of 64",
        ),
    ],
)
def test_malformed_requests_get_a_body_naming_the_problem(oip_url, path, body, status, names):
    response = _post(oip_url, path, body)
    assert response.status_code == status, response.text
    assert names in response.json()["error"]


def test_json_request_and_response_follow_the_spec(oip_url: str) -> None:
    nested = {**GOOD, "shape": [2, 4], "data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.8, 2.2]]}
    response = _post(
        oip_url, "/v2/models/species_classifier/versions/v2/infer", {"inputs": [nested]}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "species_classifier" and body["model_version"] == "v2"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["probabilities"]["shape"] == [2, 3]
    assert len(outputs["probabilities"]["data"]) == 6  # flattened row-major
    assert outputs["label"] == {
        "name": "label",
        "datatype": "BYTES",
        "shape": [2],
        "data": ["setosa", "virginica"],
    }
    ready = httpx.get(f"http://{oip_url}/v2/models/species_classifier/versions/v9/ready")
    assert ready.status_code == 404 and "'v9'" in ready.json()["error"]


def test_the_docs_v2_example_runs_as_written(oip_url: str, capsys) -> None:
    """README's tritonclient example, with this server's address for localhost:3000."""
    from tests.doc_snippets import doc_blocks

    code = next(code for _, tags, code in doc_blocks() if "oip" in tags)
    exec(compile(code.replace("localhost:3000", oip_url), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "setosa" in printed and "[[" in printed


KSERVE_PYTHON = os.environ.get("TIFFIN_KSERVE_PYTHON")


@pytest.mark.skipif(
    not KSERVE_PYTHON,
    reason="set TIFFIN_KSERVE_PYTHON to a python with kserve installed, as `make test` does "
    "with .venv-kserve (its pins on psutil and protobuf conflict with BentoML's, so it cannot "
    "live in Tiffin's venv)",
)
def test_kserve_inference_rest_client(oip_url: str) -> None:
    probe = Path(__file__).with_name("kserve_probe.py")
    done = subprocess.run(
        [str(KSERVE_PYTHON), str(probe), f"http://{oip_url}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert seen["outputs"]["label"] == ["setosa", "virginica"]
    assert seen["outputs"]["class_index"] == [0, 2]
    expected = {  # the status and what the error must name
        "unknown_model": (404, "'nope'"),
        "bad_datatype": (400, "BYTES"),
        "wrong_shape": (400, "[rows, 4]"),
        "unknown_input": (400, "'sepal'"),
    }
    for label, (status, named) in expected.items():
        error = seen["errors"][label]
        assert error is not None, f"{label}: KServe's client accepted it"
        assert error["status"] == status, (label, error)
        # KServe's message starts with the body's `error` string only when the body is JSON
        # served as exactly `application/json` with an `error` key (else the whole body, or
        # nothing): replayed without KServe, the same request must give that very string
        replayed = httpx.post(
            f"http://{oip_url}{error['path']}",
            content=error["sent"],
            headers={"Content-Type": "application/json"},
        )
        assert replayed.status_code == status, replayed.text
        reason = replayed.reason_phrase
        assert error["message"].startswith(f"{replayed.json()['error']}, '{status} {reason}'")
        assert named in replayed.json()["error"], (label, replayed.json())


class RoutedElsewhere(StoreBackend):
    """A backend whose router answers unpinned requests with another version than the one
    whose card describes the model (as a split or canary does)."""

    def __init__(self, routed: str) -> None:
        super().__init__()
        self.routed = routed

    async def infer(self, name: str, version: str | None, rows: np.ndarray):
        return await super().infer(name, version or self.routed, rows)


def test_a_routed_version_with_other_columns_gets_its_own_layout(
    backend: StoreBackend, request: pytest.FixtureRequest
) -> None:
    """Per-feature inputs are laid out for the version that answers, not the default's order."""
    from models import importer
    from tests.store_cleanup import forget
    from tiffin import model_store

    onnx = Path(model_store.get("species_classifier", "v1").path, "model.onnx").read_bytes()
    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    request.addfinalizer(lambda: [forget("oip_reorder", v) for v in ("r1", "r2")])
    for version, order in (("r1", names), ("r2", names[::-1])):
        if not model_store.exists("oip_reorder", version):
            importer.import_version(
                "oip_reorder", version, {"model.onnx": onnx},
                {"feature_names": order, "task": "multiclass", "output_names": ["a", "b", "c"]},
            )  # fmt: skip
    tested = RoutedElsewhere("")
    default = tested.versions("oip_reorder")[0]  # the newest: what card(name, None) describes
    tested.routed = other = "r1" if default == "r2" else "r2"
    app = Starlette(routes=oip_routes(lambda _: tested))
    values = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
    body = {
        "inputs": [
            {"name": k, "shape": [1], "datatype": "FP64", "data": [v]} for k, v in values.items()
        ]
    }

    async def post(path: str) -> dict:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.post(path, json=body)
            assert response.status_code == 200, response.text
            return response.json()

    import asyncio

    routed = asyncio.run(post("/v2/models/oip_reorder/infer"))
    pinned = asyncio.run(post(f"/v2/models/oip_reorder/versions/{other}/infer"))
    assert routed["model_version"] == other
    assert routed["outputs"] == pinned["outputs"]
    order = names if other == "r1" else names[::-1]
    row = np.array([[values[n] for n in order]], dtype=np.float32)
    expected = backend._pool("oip_reorder").get(other).predict(row)
    np.testing.assert_allclose(routed["outputs"][0]["data"], expected.reshape(-1), rtol=1e-6)
