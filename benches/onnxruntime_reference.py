"""onnxruntime on the encoder's graph, for comparison with `cargo bench --bench encoder -- forward`.

Builds ResNet18 + CBAM exactly as fer-cam's encoder computes it in inference (batch-norm folded
into the conv biases, CBAM's channel MLP and 7x7 spatial conv, both stems, 1x48x48 input, 512
features out) with random weights, and times onnxruntime's CPU provider with 2 intra-op threads
at batch 1 and 8. Not part of the test suite; run it on the machine where you run the Rust bench,
right before or after it, so that the two are compared under the same load:

    python3 -m venv /tmp/ortenv
    /tmp/ortenv/bin/pip install onnxruntime==1.32.0 onnx numpy
    /tmp/ortenv/bin/python benches/onnxruntime_reference.py
"""

import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

WIDTHS = [64, 128, 256, 512]
CBAM_REDUCTION = 16


class Graph:
    """Collects ONNX nodes and initialisers under fresh names."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, prefix):
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, array, dtype=np.float32):
        n = self.name("w")
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), n))
        return n

    def op(self, kind, inputs, **attrs):
        out = self.name(kind)
        self.nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    def conv(self, x, c_in, c_out, k, stride, pad, relu):
        """Conv with bias: batch-norm folded, as on fer-cam's inference path."""
        std = np.sqrt(2.0 / (c_in * k * k))
        w = self.const(self.rng.standard_normal((c_out, c_in, k, k)) * std)
        b = self.const(self.rng.standard_normal(c_out) * 0.01)
        y = self.op("Conv", [x, w, b], kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4)
        return self.op("Relu", [y]) if relu else y

    def cbam(self, x, c):
        hidden = max(c // CBAM_REDUCTION, 1)
        w1, b1 = self.const(self.rng.standard_normal((c, hidden)) * 0.1), self.const(np.zeros(hidden))
        w2, b2 = self.const(self.rng.standard_normal((hidden, c)) * 0.1), self.const(np.zeros(c))

        def mlp(pooled):
            h = self.op("Relu", [self.op("Gemm", [self.op("Flatten", [pooled]), w1, b1])])
            return self.op("Gemm", [h, w2, b2])

        avg, mx = self.op("GlobalAveragePool", [x]), self.op("GlobalMaxPool", [x])
        gate = self.op("Sigmoid", [self.op("Add", [mlp(avg), mlp(mx)])])
        shape = self.const([0, c, 1, 1], np.int64)
        x = self.op("Mul", [x, self.op("Reshape", [gate, shape])])
        axis = self.const([1], np.int64)
        pooled = self.op(
            "Concat",
            [self.op("ReduceMean", [x, axis], keepdims=1), self.op("ReduceMax", [x, axis], keepdims=1)],
            axis=1,
        )
        return self.op("Mul", [x, self.op("Sigmoid", [self.conv(pooled, 2, 1, 7, 1, 3, False)])])


def encoder(stem, seed=0):
    g = Graph(seed)
    if stem == "conv3x3":
        x = g.conv("x", 1, WIDTHS[0], 3, 1, 1, True)
    else:
        x = g.conv("x", 1, WIDTHS[0], 7, 2, 3, True)
        x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    c_in = WIDTHS[0]
    for stage, width in enumerate(WIDTHS):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            y = g.conv(x, c_in, width, 3, stride, 1, True)
            y = g.cbam(g.conv(y, width, width, 3, 1, 1, False), width)
            shortcut = x
            if stride != 1 or c_in != width:
                shortcut = g.conv(x, c_in, width, 1, stride, 0, False)
            x = g.op("Relu", [g.op("Add", [y, shortcut])])
            c_in = width
    out = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    graph = helper.make_graph(
        g.nodes,
        f"fer-cam-encoder-{stem}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 1, 48, 48])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["b", c_in])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def main():
    rng = np.random.default_rng(1)
    for stem in ["conv3x3", "conv7x7_pool"]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(
            encoder(stem).SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        for batch in [1, 8]:
            x = rng.standard_normal((batch, 1, 48, 48)).astype(np.float32)
            for _ in range(10):
                session.run(None, {"x": x})
            times = []
            for _ in range(200 if batch == 1 else 50):
                start = time.perf_counter()
                session.run(None, {"x": x})
                times.append((time.perf_counter() - start) * 1e3)
            times.sort()
            print(
                f"onnxruntime {ort.__version__} {stem} b{batch}: "
                f"median {times[len(times) // 2]:.2f} ms, best {times[0]:.2f} ms"
            )


if __name__ == "__main__":
    main()
