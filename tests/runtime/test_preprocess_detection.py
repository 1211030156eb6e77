"""Detection post-processing (EdgeModel.spec.postprocessing.detection): a YOLOv8 head -> labelled boxes after
per-class NMS, bounded; checked against a plain reference NMS, then end to end with the zoo's YOLOv8n detector
(nudenet's 320n.onnx, MIT) on a real photograph (scikit-image's astronaut.png, public domain, from its wheel):
a video made by ffmpeg from it runs through the pipeline to a real Mosquitto broker as labelled boxes."""

from __future__ import annotations

import ast
import json
import subprocess
import threading
import zipfile

import numpy as np
import pytest
from edgefleet_dev import zoo
from edgefleet_runtime import detect
from edgefleet_runtime.app import Metrics, ModelSlot
from edgefleet_runtime.backends import ModelLoadError
from edgefleet_runtime.pipeline.config import parse
from edgefleet_runtime.pipeline.runner import Pipeline
from edgefleet_runtime.preprocess import Transform, TransformError
from pipeline_helpers import FFMPEG, Broker, Subscriber, first_seen, need

YOLO = zoo.MODELS["yolov8n-320"]
# scikit-image ships its sample photographs; astronaut.png (Eileen Collins, NASA) is in the public domain
SKIMAGE = zoo.Wheel("scikit-image", "0.26.0", "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af",
                    "BSD-3-Clause")


def head(anchors: list[tuple[float, float, float, float, int, float]], classes: int) -> np.ndarray:
    """A [1, 4 + classes, A] head: (cx, cy, w, h in input pixels, class, score) per anchor."""
    out = np.zeros((1, 4 + classes, len(anchors)), np.float32)
    for i, (cx, cy, w, h, c, s) in enumerate(anchors):
        out[0, :4, i] = (cx, cy, w, h)
        out[0, 4 + c, i] = s
    return out


ANCHORS = [(100, 100, 50, 50, 0, 0.9),  # kept: the best
           (102, 101, 50, 52, 0, 0.8),  # the same object, same class: suppressed
           (100, 100, 50, 50, 1, 0.7),  # the same place, another class: kept
           (250, 250, 40, 40, 0, 0.6),  # another object: kept
           (300, 300, 10, 10, 1, 0.1)]  # under the threshold


def test_preprocess_detection_nms_keeps_one_box_per_object_and_class():
    got = detect.decode(head(ANCHORS, 2)[0], 320, 320, 0.25, 0.45, 100)
    assert got.classes.tolist() == [0, 1, 0]
    assert np.allclose(got.scores, [0.9, 0.7, 0.6])
    assert np.allclose(got.boxes[0], [75 / 320, 75 / 320, 125 / 320, 125 / 320])
    transposed = detect.decode(head(ANCHORS, 2)[0].T, 320, 320, 0.25, 0.45, 100, classes=2)  # [A, 4 + C] too
    assert np.array_equal(transposed.boxes, got.boxes)
    assert len(detect.decode(head(ANCHORS, 2)[0], 320, 320, 0.25, 0.45, 2).scores) == 2  # maxDetections


def iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def reference_nms(rows: np.ndarray, width: int, height: int, score_min: float, iou_max: float) -> list[tuple]:
    """Plain per-class greedy NMS, one box at a time, for comparison."""
    cands = []
    for r in rows:
        c = int(np.argmax(r[4:]))
        s = float(r[4 + c])
        if s >= score_min:
            cx, cy, w, h = (float(v) for v in r[:4])
            box = [min(max(v, 0.0), 1.0) for v in ((cx - w / 2) / width, (cy - h / 2) / height,
                                                   (cx + w / 2) / width, (cy + h / 2) / height)]
            cands.append((s, c, box))
    cands.sort(key=lambda t: -t[0])
    kept: list[tuple] = []
    for s, c, b in cands:
        if all(k[1] != c or iou(b, k[2]) <= iou_max for k in kept):
            kept.append((s, c, b))
    return kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_preprocess_detection_matches_a_plain_reference_nms(seed):
    rng = np.random.default_rng(seed)
    a, classes = 400, 3
    rows = np.concatenate([rng.uniform(0, 320, (a, 2)), rng.uniform(5, 120, (a, 2)), rng.uniform(0, 1, (a, classes))],
                          axis=1).astype(np.float32)
    got = detect.decode(rows.T, 320, 320, 0.5, 0.45, 1000)
    want = reference_nms(rows, 320, 320, 0.5, 0.45)
    assert len(got.scores) == len(want) > 10
    assert np.allclose(got.scores, [w[0] for w in want]) and got.classes.tolist() == [w[1] for w in want]
    assert np.allclose(got.boxes, [w[2] for w in want], atol=1e-6)


def test_preprocess_detection_batch_pads_and_counts():
    per = [detect.decode(head(ANCHORS, 2)[0], 320, 320, 0.25, 0.45, 100),
           detect.decode(head(ANCHORS[:1], 2)[0], 320, 320, 0.25, 0.45, 100)]
    out = detect.batch(per, ("cat", "dog"))
    assert out[detect.OUTPUT_COUNT].tolist() == [3, 1]
    assert out[detect.OUTPUT_BOXES].shape == (2, 3, 4)
    assert out[detect.OUTPUT_CLASSES][1].tolist() == [0, -1, -1]
    assert out[detect.OUTPUT_LABELS][0].tolist() == [b"cat", b"dog", b"cat"]


def test_preprocess_detection_refuses_bad_declarations_naming_the_field():
    with pytest.raises(TransformError, match=r"postprocessing.detection.iouThreshold"):
        Transform.from_json(json.dumps({"postprocessing": {"detection": {"iouThreshold": 2}}}))
    with pytest.raises(TransformError, match=r"postprocessing.detection.format"):
        Transform.from_json(json.dumps({"postprocessing": {"detection": {"format": "ssd"}}}))
    yolo = zoo.fetch(YOLO)
    image = {"width": 320, "height": 320}
    bad_labels = {"preprocessing": {"image": image}, "postprocessing": {"labels": ["a", "b"], "detection": {}}}
    with pytest.raises(ModelLoadError, match=r"postprocessing.labels: 2 labels, but output 'output0' \[-1, 22, -1\]"):
        ModelSlot("yolo", Metrics(), threads=1, transform=Transform.from_json(json.dumps(bad_labels))).load(
            str(yolo), "sha256:" + YOLO.sha256)
    with pytest.raises(TransformError, match=r"postprocessing.detection: needs preprocessing.image"):
        Transform.from_json(json.dumps({"postprocessing": {"detection": {}}}))


def nudenet_labels() -> list[str]:
    """The detector's class names, from its own package (nudenet/nudenet.py, ``__labels``)."""
    with zipfile.ZipFile(zoo.wheel_file(YOLO.wheel)) as z:
        tree = ast.parse(z.read("nudenet/nudenet.py"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "__labels":
            return list(ast.literal_eval(node.value))
    raise AssertionError("nudenet.py has no __labels")


def astronaut(folder) -> bytes:
    with zipfile.ZipFile(zoo.wheel_file(SKIMAGE)) as z:
        data = z.read("skimage/data/astronaut.png")
    (folder / "astronaut.png").write_bytes(data)
    return data


def yolo_transform(**detection) -> dict:
    return {"preprocessing": {"image": {"width": 320, "height": 320, "color": "RGB"}},
            "postprocessing": {"labels": nudenet_labels(), "detection": detection}}


def test_preprocess_detection_served_for_a_jpeg_body(start_server, tmp_path):
    """serve with the detector's transform: a photograph as an image/jpeg body comes back as labelled boxes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(astronaut(tmp_path))).convert("RGB").save(buf, "JPEG", quality=90)
    server = start_server(zoo.fetch(YOLO), "sha256:" + YOLO.sha256, "--transform",
                          json.dumps(yolo_transform(scoreThreshold=0.4, maxDetections=5)), name="yolo")
    status, _, out = server.request("POST", "/v2/models/yolo/infer", buf.getvalue(), {"Content-Type": "image/jpeg"})
    assert status == 200, out
    outs = {o["name"]: o for o in json.loads(out)["outputs"]}
    assert {"detection_boxes", "detection_scores", "detection_classes", "detection_labels",
            "detection_count"} <= set(outs)
    count = outs["detection_count"]["data"][0]
    assert 1 <= count <= 5 and outs["detection_boxes"]["shape"] == [1, count, 4]
    assert outs["detection_labels"]["data"][0] == "FACE_FEMALE" and outs["detection_scores"]["data"][0] > 0.6


def test_pipeline_yolov8n_puts_labelled_boxes_on_mqtt(tmp_path):
    yolo = zoo.fetch(YOLO)
    astronaut(tmp_path)
    video = tmp_path / "astronaut.mp4"  # 20 frames of the photograph, H.264, made by ffmpeg
    subprocess.run([need(FFMPEG, "ffmpeg"), "-v", "error", "-y", "-loop", "1", "-i", str(tmp_path / "astronaut.png"),
                    "-frames:v", "20", "-r", "10", "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast",
                    str(video)], check=True, timeout=60)
    assert len(nudenet_labels()) == 18
    transform = yolo_transform(scoreThreshold=0.4, maxDetections=10)
    model = ModelSlot("yolo", Metrics(), threads=1, transform=Transform.from_json(json.dumps(transform))).load(
        str(yolo), "sha256:" + YOLO.sha256)
    broker = Broker(tmp_path).start()
    sub = Subscriber(broker.port, "edgefleet/detect")
    cfg = {"name": "line", "queue": {"path": str(tmp_path / "queue")},
           "sources": [{"name": "cam", "kind": "video", "url": str(video)}],
           "sinks": [{"name": "broker", "mqtt": {"host": "127.0.0.1", "port": broker.port,
                                                 "topic": "edgefleet/detect"}}]}
    try:
        done = Pipeline(parse(json.dumps(cfg)), model).run(threading.Event(), 30)
        frames = sub.wait_for(20, 20)
    finally:
        sub.close()
        broker.stop()
    assert done == 0 and first_seen(frames) == list(range(20))
    for record in sub.records:
        best = record["detections"][0]  # best first
        assert best["label"] == "FACE_FEMALE" and best["class"] == 1 and best["score"] > 0.6, record
        x1, y1, x2, y2 = best["box"]
        # the face: in the upper middle of the portrait, a fifth of its width
        assert 0.3 < (x1 + x2) / 2 < 0.6 and 0.1 < (y1 + y2) / 2 < 0.45 and 0.1 < x2 - x1 < 0.35, best
        assert len(record["detections"]) <= 10
        assert len({(d["class"], tuple(d["box"])) for d in record["detections"]}) == len(record["detections"])
