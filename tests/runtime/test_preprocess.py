"""The runtime's declared pre-processing (serve --transform): JPEG/PNG bytes as an OIP BYTES tensor or as an
image/jpeg body give the same answer as the client-side transform on the quickstart's eval images; hostile
images (decompression bombs, corrupt or foreign files) are refused with 400 and the server keeps serving."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from conftest import models
from PIL import Image

QUICKSTART = models.REPO / "examples" / "quickstart"
MODEL = QUICKSTART / "digits_cnn.onnx"
LABELS = [f"digit-{i}" for i in range(10)]
TRANSFORM = {"preprocessing": {"image": {"width": 8, "height": 8, "color": "GRAY", "layout": "NCHW"}},
             "postprocessing": {"softmax": True, "topK": 3, "labels": LABELS}}


@pytest.fixture(scope="module")
def eval_images():
    data = np.load(QUICKSTART / "digits_eval.npz")
    return data["input"], data["y"]


def pixels(x: np.ndarray) -> np.ndarray:
    """One eval input (1x8x8 floats in 0..1) as an 8-bit grey image."""
    return np.clip(np.rint(x[0] * 255), 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def client_transform(data: bytes) -> np.ndarray:
    """What a client does without server-side pre-processing: decode, grey, 8x8, /255, NCHW (numpy)."""
    img = Image.open(io.BytesIO(data)).convert("L")
    if img.size != (8, 8):
        img = img.resize((8, 8), Image.Resampling.BILINEAR)
    return (np.asarray(img, dtype=np.float32) / np.float32(255))[None]


def bytes_request(images: list[bytes], outputs: list[str]) -> tuple[bytes, dict]:
    blob = b"".join(struct.pack("<I", len(b)) + b for b in images)
    head = json.dumps({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [len(images)],
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "outputs": [{"name": n} for n in outputs]}).encode()
    return head + blob, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}


def top1_of_tensors(server, batch: np.ndarray) -> np.ndarray:
    status, body = server.infer_json({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(batch.shape),
                                                  "data": batch.ravel().tolist()}], "outputs": [{"name": "logits"}]})
    assert status == 200, body
    return np.asarray(body["outputs"][0]["data"]).reshape(len(batch), 10).argmax(1)


def top1_of_images(server, images: list[bytes]) -> tuple[np.ndarray, list]:
    body, headers = bytes_request(images, ["topk_indices", "topk_labels"])
    status, _, out = server.request("POST", "/v2/models/digits/infer", body, headers)
    assert status == 200, out
    outs = {o["name"]: o for o in json.loads(out)["outputs"]}
    indices = np.asarray(outs["topk_indices"]["data"]).reshape(len(images), 3)
    return indices[:, 0], outs["topk_labels"]["data"]


@pytest.fixture
def image_server(start_server):
    return start_server(MODEL, models.sha256(MODEL), "--transform", json.dumps(TRANSFORM))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_preprocess_encoded_eval_images_give_the_client_transform_top1(image_server, eval_images, fmt):
    x, y = eval_images
    images = [encode(pixels(v), fmt, **({"quality": 90} if fmt == "JPEG" else {})) for v in x]
    server_top1, labels = [], []
    client_top1 = []
    for i in range(0, len(images), 50):
        top1, names = top1_of_images(image_server, images[i:i + 50])
        server_top1 += list(top1)
        labels += names[::3]
        client_top1 += list(top1_of_tensors(image_server, np.stack([client_transform(b) for b in images[i:i + 50]])))
    assert server_top1 == client_top1  # every one of the 450 images
    assert labels == [LABELS[i] for i in server_top1]
    accuracy = float(np.mean(np.asarray(server_top1) == y))
    original = float(np.mean(top1_of_tensors(image_server, x) == y))
    assert accuracy >= original - 0.02, (fmt, accuracy, original)  # the encoded path keeps the model's accuracy


def test_preprocess_image_jpeg_body_resizes_and_converts_like_the_client(image_server, eval_images):
    x, _ = eval_images
    for v in x[:20]:
        big = np.asarray(Image.fromarray(pixels(v)).resize((64, 48), Image.Resampling.NEAREST).convert("RGB"))
        data = encode(big, "JPEG", quality=95)
        status, _, out = image_server.request("POST", "/v2/models/digits/infer", data, {"Content-Type": "image/jpeg"})
        assert status == 200, out
        outs = {o["name"]: o for o in json.loads(out)["outputs"]}
        assert set(outs) == {"logits", "topk_indices", "topk_scores", "topk_labels"}
        want = int(top1_of_tensors(image_server, client_transform(data)[None])[0])
        assert outs["topk_indices"]["data"][0] == want
        assert outs["topk_labels"]["data"][0] == LABELS[want]
        scores = outs["topk_scores"]["data"]
        assert 0 < scores[2] <= scores[1] <= scores[0] <= 1  # softmax probabilities, ranked


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height and whose IDAT is a few bytes: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def zeros_png(width: int, height: int) -> bytes:
    """A real bomb: width x height zeros, compressed (a few KiB for megabytes of pixels)."""
    z = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_preprocess_refuses_decompression_bombs_with_400(start_server):
    transform = json.loads(json.dumps(TRANSFORM))
    transform["preprocessing"]["image"]["maxPixels"] = 1_000_000
    server = start_server(MODEL, models.sha256(MODEL), "--transform", json.dumps(transform))
    bomb = zeros_png(4000, 4000)  # 16 M pixels in a few KiB
    assert len(bomb) < 64 << 10
    for data in (bomb, png_header_only(100_000, 100_000)):
        for content_type in ("image/png", None):
            if content_type:
                status, _, out = server.request("POST", "/v2/models/digits/infer", data, {"Content-Type": content_type})
            else:
                body, headers = bytes_request([data], ["logits"])
                status, _, out = server.request("POST", "/v2/models/digits/infer", body, headers)
            assert status == 400, out
            assert "maxPixels" in json.loads(out)["error"]
    assert server.request("GET", "/v2/health/ready")[0] == 200
    ok = encode(np.zeros((8, 8), np.uint8), "PNG")
    assert server.request("POST", "/v2/models/digits/infer", ok, {"Content-Type": "image/png"})[0] == 200


def test_preprocess_refuses_corrupt_and_foreign_images(image_server):
    good = encode(np.full((32, 32, 3), 128, np.uint8), "JPEG")
    cases = {
        "corrupt": good[: len(good) // 2],
        "not a JPEG or PNG": encode(np.zeros((8, 8), np.uint8), "GIF"),
        "not a JPEG or PNG ": b"hello, not an image",
    }
    for want, data in cases.items():
        status, _, out = image_server.request("POST", "/v2/models/digits/infer", data, {"Content-Type": "image/jpeg"})
        assert status == 400, (want, out)
        assert want.strip() in json.loads(out)["error"], out
    status, _, out = image_server.request("POST", "/v2/models/digits/infer", good, {"Content-Type": "image/gif"})
    assert status == 415 and "image/jpeg" in json.loads(out)["error"]
    status, body = image_server.infer_json({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                                                        "data": ["not bytes"]}]})
    assert status == 400 and "binary data" in body["error"]


def test_preprocess_without_a_declared_transform_refuses_image_bodies(start_server):
    server = start_server(MODEL, models.sha256(MODEL))
    data = encode(np.zeros((8, 8), np.uint8), "PNG")
    status, _, out = server.request("POST", "/v2/models/digits/infer", data, {"Content-Type": "image/png"})
    assert status == 415 and "spec.preprocessing.image" in json.loads(out)["error"]


@pytest.mark.parametrize("image, field", [
    ({"width": 16, "height": 8, "color": "GRAY"}, "set width, height, color and layout"),
    ({"width": 8, "height": 8}, "set width, height, color and layout"),  # RGB: 3 channels, the model takes 1
    ({"width": 8, "height": 8, "color": "GRAY", "dtype": "uint8"}, "preprocessing.image.dtype"),
    ({"width": 8, "height": 8, "color": "GRAY", "input": "x"}, "preprocessing.image.input"),
])
def test_preprocess_transform_that_does_not_fit_the_model_stops_serve(start_server, image, field):
    server = start_server(MODEL, models.sha256(MODEL), "--transform",
                          json.dumps({"preprocessing": {"image": image}}), wait=False)
    assert server.proc.wait(30) != 0
    assert field in server.logs()
