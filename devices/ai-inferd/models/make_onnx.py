#!/usr/bin/env python3
"""Writes the test ONNX models of ai-inferd: mlp.onnx, mlp_ref.json and fixed.onnx.

Model: input "x" f32 [N, 16] (N dynamic) -> Gemm(16x32) -> Relu -> Gemm(32x4) -> "y" f32 [N, 4].

Every weight and bias is a multiple of 1/4 in [-2, 2]. For inputs that are multiples of
1/16 in [-8, 8], every partial sum in either layer is a multiple of 1/256 below 2^15 in
magnitude, so it fits in f32's 24-bit significand: the result is exact whatever the
summation order, the kernel (FMA or not) or the batch a row is computed in. Tests and
the end-to-end rig rely on this to compare outputs bit for bit.

fixed.onnx: input "x" f32 [2, 3] (no dynamic dim, so not batchable) -> "y" = 2 * x.

mlp_ref.json holds the weights (so tests can recompute independently), a sample input
and its output computed here in float64 (exact, hence equal to the f32 result).

Usage: make_onnx.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IN, HIDDEN, OUT = 16, 32, 4
SEED = 20240601


def quarters(rng, shape):
    """Multiples of 1/4 in [-2, 2]."""
    return rng.integers(-8, 9, size=shape).astype(np.float64) / 4.0


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_onnx.py OUT_DIR")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(SEED)
    w1, b1 = quarters(rng, (IN, HIDDEN)), quarters(rng, (HIDDEN,))
    w2, b2 = quarters(rng, (HIDDEN, OUT)), quarters(rng, (OUT,))

    inits = [
        numpy_helper.from_array(a.astype(np.float32), name)
        for name, a in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "aivmm_test_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", OUT])],
        inits,
    )
    model = helper.make_model(
        graph,
        producer_name="aivmm make_onnx.py",
        opset_imports=[helper.make_opsetid("", 13)],
    )
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(out / "mlp.onnx"))

    # Sample input: multiples of 1/16 in [-8, 8], a few rows.
    x = rng.integers(-128, 129, size=(5, IN)).astype(np.float64) / 16.0
    y = np.maximum(x @ w1 + b1, 0.0) @ w2 + b2
    assert np.array_equal(y.astype(np.float32).astype(np.float64), y), "not exact in f32"
    ref = {
        "w1": w1.tolist(),
        "b1": b1.tolist(),
        "w2": w2.tolist(),
        "b2": b2.tolist(),
        "input": x.tolist(),
        "output": y.tolist(),
    }
    (out / "mlp_ref.json").write_text(json.dumps(ref) + "\n")

    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    fixed = helper.make_model(
        helper.make_graph(
            [helper.make_node("Mul", ["x", "two"], ["y"], name="double")],
            "aivmm_test_fixed",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
            [two],
        ),
        producer_name="aivmm make_onnx.py",
        opset_imports=[helper.make_opsetid("", 13)],
    )
    fixed.ir_version = 7
    onnx.checker.check_model(fixed)
    onnx.save(fixed, str(out / "fixed.onnx"))
    print(f"wrote mlp.onnx, mlp_ref.json and fixed.onnx in {out}")


if __name__ == "__main__":
    main()
