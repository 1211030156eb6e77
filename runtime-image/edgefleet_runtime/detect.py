"""Detection post-processing (EdgeModel.spec.postprocessing.detection): a YOLOv8-style head -> labelled boxes after
per-class non-maximum suppression. Bounded work: at most MAX_CANDIDATES boxes (the best scores over the
threshold) enter NMS per image, at most ``max_detections`` leave it.

The head (Ultralytics export): one output [N, 4 + classes, anchors] (or [N, anchors, 4 + classes]); per anchor the
box centre x, y, width and height in the model's input pixels, then one score per class (already a probability:
no objectness, no softmax). Boxes come out as x1, y1, x2, y2 in fractions of the model's input (0..1), which for
`resize: stretch` are fractions of the original image too."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_CANDIDATES = 1000
OUTPUT_BOXES, OUTPUT_SCORES, OUTPUT_CLASSES = "detection_boxes", "detection_scores", "detection_classes"
OUTPUT_LABELS, OUTPUT_COUNT = "detection_labels", "detection_count"
OUTPUTS = (OUTPUT_BOXES, OUTPUT_SCORES, OUTPUT_CLASSES, OUTPUT_LABELS, OUTPUT_COUNT)


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray  # [k, 4] float32 x1, y1, x2, y2 (fractions of the input)
    scores: np.ndarray  # [k] float32, best first
    classes: np.ndarray  # [k] int64


def rows_first(head: np.ndarray, classes: int | None) -> np.ndarray:
    """One image's head [4 + C, A] as [A, 4 + C]. With ``classes`` known (the labels), a head whose last axis
    alone is 4 + classes is taken as [A, 4 + C] already."""
    if head.ndim != 2:
        raise ValueError(f"a detection head is [N, 4 + classes, anchors]; got one image of shape {list(head.shape)}")
    if classes is not None and head.shape[0] != 4 + classes:
        if head.shape[1] != 4 + classes:
            raise ValueError(f"the detection head {list(head.shape)} has no axis of 4 + {classes} (box + labels)")
        return head
    return head.T


def decode(head: np.ndarray, width: int, height: int, score_threshold: float, iou_threshold: float,
           max_detections: int, classes: int | None = None) -> Detections:
    """Boxes over ``score_threshold`` of one image's head, after per-class NMS at ``iou_threshold``."""
    rows = rows_first(np.asarray(head, dtype=np.float32), classes)
    if rows.shape[1] < 5:
        raise ValueError(f"a detection head needs 4 box values and at least one class score; got {rows.shape[1]}")
    scores_all = rows[:, 4:]
    cls = scores_all.argmax(axis=1)
    score = scores_all[np.arange(len(rows)), cls]
    keep = np.flatnonzero(np.isfinite(score) & (score >= score_threshold))
    keep = keep[np.argsort(-score[keep], kind="stable")][:MAX_CANDIDATES]
    cx, cy, w, h = (rows[keep, i] for i in range(4))
    boxes = np.stack([(cx - w / 2) / width, (cy - h / 2) / height, (cx + w / 2) / width, (cy + h / 2) / height],
                     axis=1).clip(0.0, 1.0).astype(np.float32)
    chosen = nms(boxes, score[keep], cls[keep], iou_threshold, max_detections)
    return Detections(boxes[chosen], score[keep][chosen].astype(np.float32), cls[keep][chosen].astype(np.int64))


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float, limit: int
        ) -> np.ndarray:
    """Indices of the boxes kept by greedy per-class NMS, best score first, at most ``limit``. ``boxes`` come
    sorted by score (best first); a box is dropped when it overlaps a kept box of its class by more than
    ``iou_threshold`` (intersection over union)."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    kept: list[int] = []
    alive = np.ones(len(boxes), dtype=bool)
    for i in order:  # bounded: len(boxes) <= MAX_CANDIDATES
        if not alive[i]:
            continue
        kept.append(int(i))
        if len(kept) >= limit:
            break
        x1 = np.maximum(boxes[i, 0], boxes[:, 0])
        y1 = np.maximum(boxes[i, 1], boxes[:, 1])
        x2 = np.minimum(boxes[i, 2], boxes[:, 2])
        y2 = np.minimum(boxes[i, 3], boxes[:, 3])
        inter = (x2 - x1).clip(0) * (y2 - y1).clip(0)
        iou = inter / np.maximum(area[i] + area - inter, 1e-12)
        alive &= ~((classes == classes[i]) & (iou > iou_threshold))
    return np.array(kept, dtype=np.int64)


def batch(per_image: list[Detections], labels: tuple[str, ...] | None) -> dict[str, np.ndarray]:
    """The detections of a batch as rectangular outputs: padded to the most boxes any image has (score 0,
    class -1), with detection_count telling how many of each row are real."""
    n, k = len(per_image), max((len(d.scores) for d in per_image), default=0)
    boxes = np.zeros((n, k, 4), np.float32)
    scores = np.zeros((n, k), np.float32)
    classes = np.full((n, k), -1, np.int64)
    for row, d in enumerate(per_image):
        m = len(d.scores)
        boxes[row, :m], scores[row, :m], classes[row, :m] = d.boxes, d.scores, d.classes
    out: dict[str, np.ndarray] = {OUTPUT_BOXES: boxes, OUTPUT_SCORES: scores, OUTPUT_CLASSES: classes,
                                  OUTPUT_COUNT: np.array([len(d.scores) for d in per_image], np.int64)}
    if labels is not None:
        out[OUTPUT_LABELS] = np.array([[(labels[c] if 0 <= c < len(labels) else ("" if c < 0 else str(c))).encode()
                                        for c in row] for row in classes], dtype=object).reshape(n, k)
    return out
