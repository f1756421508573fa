"""Run by KServe's own interpreter (kserve cannot share Tiffin's venv: it pins psutil<6 and
protobuf<7, below what BentoML installs), from tests/test_oip.py: KServe's
`InferenceRESTClient` against Tiffin's V2 routes; prints what it saw as JSON."""

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def main(url: str) -> None:
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
    seen: dict = {
        "live": await client.is_server_live(url),
        "ready": await client.is_server_ready(url),
        "model_ready": await client.is_model_ready(url, "species_classifier"),
    }
    rows = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.8, 2.2]], dtype=np.float32)
    tensor = InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=False)
    request = InferRequest(model_name="species_classifier", infer_inputs=[tensor])
    answer = await client.infer(url, request, model_name="species_classifier")
    seen["outputs"] = {o.name: o.as_numpy().tolist() for o in answer.outputs}
    errors = {}
    for label, name, bad in [
        ("unknown_model", "nope", tensor),
        ("bad_datatype", "species_classifier", InferInput("input", [1, 4], "BYTES", ["a"] * 4)),
        ("wrong_shape", "species_classifier", InferInput("input", [1, 3], "FP32", [1.0] * 3)),
        ("unknown_input", "species_classifier", InferInput("sepal", [1], "FP32", [1.0])),
    ]:
        try:
            await client.infer(url, InferRequest(model_name=name, infer_inputs=[bad]), name)
            errors[label] = None
        except Exception as exc:  # kserve raises httpx.HTTPStatusError with the body's error
            response = getattr(exc, "response", None)
            errors[label] = {
                "message": str(exc),
                "status": None if response is None else response.status_code,
                # what the client sent, for the test to replay without KServe in between
                "path": None if response is None else response.request.url.path,
                "sent": None if response is None else response.request.content.decode(),
            }
    seen["errors"] = errors
    await client.close()
    print(json.dumps(seen))


asyncio.run(main(sys.argv[1]))
