"""Model artifacts the tests register through the admin API."""

from __future__ import annotations

import base64


def broken_onnx() -> str:
    """Loads and warms up fine on zeros, returns NaN for every real transaction amount."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["input", "col"], ["amount"], axis=1),
            helper.make_node("Sub", ["big", "amount"], ["shifted"]),
            helper.make_node("Sqrt", ["shifted"], ["probabilities"]),
        ],
        "broken",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 16])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 1])],
        [
            helper.make_tensor("col", TensorProto.INT64, [1], [0]),
            helper.make_tensor("big", TensorProto.FLOAT, [], [0.5]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    return base64.b64encode(model.SerializeToString()).decode()
