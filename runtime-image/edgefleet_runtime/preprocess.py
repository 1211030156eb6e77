"""The declared transform of a model (EdgeModel.spec.preprocessing and spec.postprocessing, handed over as JSON
by the operator's `serve --transform`): encoded images (JPEG/PNG) -> the model's input tensor, and softmax/top-k
with labels on its answer. The same code serves requests and feeds the pipeline runner, so every class and
every path applies one transform.

The runtime may not import the operator: this module parses the JSON again, as strictly as the API model
(tests/unit/test_api_preprocess.py keeps the two in step). Images are hostile: only JPEG and PNG are opened,
their size is read from the header and refused above ``maxPixels`` before any pixel is decoded."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import detect
from .backends import TensorSpec

FORMATS = ("JPEG", "PNG")
DTYPES = {"float32": ("FP32", np.float32), "float16": ("FP16", np.float16), "uint8": ("UINT8", np.uint8),
          "int8": ("INT8", np.int8)}
IMAGE_KEYS = {"input", "width", "height", "resize", "interpolation", "color", "layout", "dtype", "scale", "mean",
              "std", "maxPixels", "maxEncodedBytes"}
POST_KEYS = {"output", "softmax", "topK", "labels", "detection"}
DETECTION_KEYS = {"format", "scoreThreshold", "iouThreshold", "maxDetections"}
OUTPUT_INDICES, OUTPUT_SCORES, OUTPUT_LABELS = "topk_indices", "topk_scores", "topk_labels"


class TransformError(ValueError):
    """A transform that cannot be applied to this model (or is malformed): names the field."""


class ImageError(ValueError):
    """An input image that is refused (corrupt, not JPEG/PNG, too large): a 400 for the client. ``reason``:
    corrupt, unsupported or too_large (the pipeline counts refused frames by it)."""

    def __init__(self, message: str, reason: str = "corrupt"):
        super().__init__(message)
        self.reason = reason


def _field(d: dict, key: str, kind, default, where: str, choices=None):
    value = d.get(key, default)
    if value is None:
        return None
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise TransformError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    if choices is not None and value not in choices:
        raise TransformError(f"{where}.{key}: {value!r} is not one of {', '.join(choices)}")
    return value


def _bounded(value, low, high, where: str):
    if value is not None and not (low <= value <= high):
        raise TransformError(f"{where}: {value} is outside [{low}, {high}]")
    return value


def _floats(d: dict, key: str, channels: int, where: str, positive: bool) -> tuple[float, ...] | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) not in (1, channels) or \
            not all(type(v) in (int, float) and math.isfinite(v) for v in value):
        raise TransformError(f"{where}.{key}: give one number, or one per channel ({channels})")
    if positive and min(value) <= 0:
        raise TransformError(f"{where}.{key}: values must be greater than 0")
    return tuple(float(v) for v in value)


def _known_fields(d: Any, keys: set[str] | frozenset[str], where: str) -> None:
    """``d`` is an object whose fields are all in ``keys``; else TransformError naming ``where``."""
    if not isinstance(d, dict):
        raise TransformError(f"{where}: expected an object")
    unknown = set(d) - keys
    if unknown:
        raise TransformError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")


@dataclass(frozen=True)
class ImageTransform:
    width: int
    height: int
    input: str | None = None
    resize: str = "stretch"
    interpolation: str = "bilinear"
    color: str = "RGB"
    layout: str = "NCHW"
    dtype: str = "float32"
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    max_pixels: int = 40_000_000
    max_encoded_bytes: int = 16 << 20

    @classmethod
    def from_dict(cls, d: Any, where: str = "preprocessing.image") -> ImageTransform:
        _known_fields(d, IMAGE_KEYS, where)
        color = _field(d, "color", str, "RGB", where, ("RGB", "BGR", "GRAY"))
        channels = 1 if color == "GRAY" else 3
        t = cls(
            width=_bounded(_field(d, "width", int, None, where), 1, 8192, f"{where}.width")
            or _missing(where, "width"),
            height=_bounded(_field(d, "height", int, None, where), 1, 8192, f"{where}.height")
            or _missing(where, "height"),
            input=_field(d, "input", str, None, where),
            resize=_field(d, "resize", str, "stretch", where, ("stretch", "centerCrop")),
            interpolation=_field(d, "interpolation", str, "bilinear", where, ("nearest", "bilinear", "bicubic")),
            color=color,
            layout=_field(d, "layout", str, "NCHW", where, ("NCHW", "NHWC")),
            dtype=_field(d, "dtype", str, "float32", where, tuple(DTYPES)),
            scale=_bounded(_field(d, "scale", float, None, where), 1e-12, 1e6, f"{where}.scale"),
            mean=_floats(d, "mean", channels, where, positive=False),
            std=_floats(d, "std", channels, where, positive=True),
            max_pixels=_bounded(_field(d, "maxPixels", int, 40_000_000, where), 1, 1 << 28, f"{where}.maxPixels"),
            max_encoded_bytes=_bounded(_field(d, "maxEncodedBytes", int, 16 << 20, where), 1024, 1 << 28,
                                       f"{where}.maxEncodedBytes"),
        )
        if t.dtype in ("uint8", "int8") and (t.scale is not None or t.mean is not None or t.std is not None):
            raise TransformError(f"{where}: dtype {t.dtype} takes the pixels as they are; remove scale, mean and std")
        return t

    @property
    def channels(self) -> int:
        return 1 if self.color == "GRAY" else 3

    def tensor_shape(self) -> tuple[int, int, int]:
        """The shape of one image's tensor, without the batch dimension."""
        c, h, w = self.channels, self.height, self.width
        return (c, h, w) if self.layout == "NCHW" else (h, w, c)

    def bind(self, inputs: list[TensorSpec]) -> str:
        """The model input this transform feeds; TransformError naming the field when it cannot."""
        names = [t.name for t in inputs]
        name = self.input
        if name is None:
            if len(inputs) != 1:
                raise TransformError(f"preprocessing.image.input: the model has inputs {', '.join(names)}; "
                                     "name the one the image feeds")
            name = names[0]
        spec = next((t for t in inputs if t.name == name), None)
        if spec is None:
            raise TransformError(f"preprocessing.image.input: the model has no input '{name}'; "
                                 f"its inputs: {', '.join(names)}")
        datatype = DTYPES[self.dtype][0]
        if spec.datatype != datatype:
            raise TransformError(f"preprocessing.image.dtype: {self.dtype} makes {datatype}, but input '{name}' "
                                 f"takes {spec.datatype}")
        want = self.tensor_shape()
        if len(spec.shape) != 4 or any(m not in (-1, d) for m, d in zip(spec.shape[1:], want, strict=True)):
            raise TransformError(
                f"preprocessing.image: makes [N,{','.join(map(str, want))}] ({self.layout}, {self.color}) but input "
                f"'{name}' has shape {list(spec.shape)}; set width, height, color and layout to match the model")
        return name

    # ------------------------------------------------------------------ applying it
    def open(self, data: bytes):
        """A PIL image of ``data`` (JPEG or PNG), its size checked from the header; no pixel decoded yet."""
        from PIL import Image, UnidentifiedImageError

        if len(data) > self.max_encoded_bytes:
            raise ImageError(f"encoded image of {len(data)} bytes is over maxEncodedBytes {self.max_encoded_bytes}",
                             "too_large")
        try:  # the size check below is ours; Pillow's own (a warning, then an error at twice its limit) is a backstop
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.DecompressionBombError as e:
            raise ImageError(f"image refused as a decompression bomb, over maxPixels {self.max_pixels}: "
                             f"{str(e)[:200]}", "too_large") from None
        except UnidentifiedImageError as e:
            raise ImageError(f"not a JPEG or PNG image the runtime can read: {str(e)[:200]}", "unsupported") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageError(f"corrupt image: {str(e)[:200]}") from None
        self.check_size(*img.size)
        return img

    def check_size(self, width: int, height: int) -> None:
        if width < 1 or height < 1 or width * height > self.max_pixels:
            raise ImageError(f"image of {width}x{height} pixels is refused: over maxPixels {self.max_pixels} "
                             "(or empty); send a smaller image", "too_large")

    def decode(self, data: bytes) -> np.ndarray:
        """One encoded image -> its tensor (without the batch dimension)."""
        from PIL import Image

        img = self.open(data)
        try:
            img.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise ImageError(f"corrupt image: {str(e)[:200]}") from None
        return self.from_image(img)

    def from_image(self, img) -> np.ndarray:
        """A decoded PIL image -> its tensor (without the batch dimension)."""
        from PIL import Image

        self.check_size(*img.size)
        img = img.convert("L" if self.color == "GRAY" else "RGB")
        resample = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                    "bicubic": Image.Resampling.BICUBIC}[self.interpolation]
        img = self._resized(img, resample)
        pixels = np.asarray(img, dtype=np.uint8)
        if self.color == "GRAY":
            pixels = pixels[:, :, None]
        elif self.color == "BGR":
            pixels = pixels[:, :, ::-1]
        out = self._values(pixels)
        if self.layout == "NCHW":
            out = out.transpose(2, 0, 1)
        return np.ascontiguousarray(out)

    def _resized(self, img, resample):
        w, h = img.size
        if (w, h) == (self.width, self.height):
            return img
        if self.resize == "stretch":
            return img.resize((self.width, self.height), resample)
        ratio = max(self.width / w, self.height / h)
        rw, rh = max(self.width, round(w * ratio)), max(self.height, round(h * ratio))
        img = img.resize((rw, rh), resample)
        left, top = (rw - self.width) // 2, (rh - self.height) // 2
        return img.crop((left, top, left + self.width, top + self.height))

    def _values(self, pixels: np.ndarray) -> np.ndarray:
        if self.dtype == "uint8":
            return pixels
        if self.dtype == "int8":
            return (pixels.astype(np.int16) - 128).astype(np.int8)
        out = pixels.astype(np.float32) * np.float32(self.scale if self.scale is not None else 1 / 255)
        if self.mean is not None:
            out -= np.asarray(self.mean, dtype=np.float32)
        if self.std is not None:
            out /= np.asarray(self.std, dtype=np.float32)
        return out.astype(DTYPES[self.dtype][1], copy=False)

    def batch(self, images: list[bytes]) -> np.ndarray:
        return np.stack([self.decode(b) for b in images])


def _missing(where: str, key: str):
    raise TransformError(f"{where}.{key}: required")


@dataclass(frozen=True)
class Detection:
    """Boxes from a detection head, after per-class NMS (edgefleet_runtime.detect)."""

    format: str = "yolov8"
    score_threshold: float = 0.25
    iou_threshold: float = 0.45
    max_detections: int = 100

    @classmethod
    def from_dict(cls, d: Any, where: str = "postprocessing.detection") -> Detection:
        _known_fields(d, DETECTION_KEYS, where)
        return cls(
            format=_field(d, "format", str, "yolov8", where, ("yolov8",)),
            score_threshold=_bounded(_field(d, "scoreThreshold", float, 0.25, where), 0.0, 1.0,
                                     f"{where}.scoreThreshold"),
            iou_threshold=_bounded(_field(d, "iouThreshold", float, 0.45, where), 0.0, 1.0, f"{where}.iouThreshold"),
            max_detections=_bounded(_field(d, "maxDetections", int, 100, where), 1, 1000, f"{where}.maxDetections"),
        )


@dataclass(frozen=True)
class Postprocess:
    output: str | None = None
    softmax: bool = False
    top_k: int = 1
    labels: tuple[str, ...] | None = None
    detection: Detection | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str = "postprocessing") -> Postprocess:
        _known_fields(d, POST_KEYS, where)
        labels = d.get("labels")
        if labels is not None and (not isinstance(labels, list) or len(labels) > 4096
                                   or not all(isinstance(v, str) and 0 < len(v) <= 128 for v in labels)):
            raise TransformError(f"{where}.labels: give at most 4096 names of 1 to 128 characters")
        return cls(
            output=_field(d, "output", str, None, where),
            softmax=_field(d, "softmax", bool, False, where),
            top_k=_bounded(_field(d, "topK", int, 1, where), 1, 100, f"{where}.topK"),
            labels=tuple(labels) if labels is not None else None,
            detection=Detection.from_dict(d["detection"], f"{where}.detection") if d.get("detection") is not None
            else None,
        )

    def bind(self, outputs: list[TensorSpec]) -> str:
        name = self.output or outputs[0].name
        spec = next((t for t in outputs if t.name == name), None)
        if spec is None:
            raise TransformError(f"postprocessing.output: the model has no output '{name}'; "
                                 f"its outputs: {', '.join(t.name for t in outputs)}")
        if self.detection is not None:
            return self._bind_detection(name, spec)
        if len(spec.shape) != 2 or spec.datatype not in ("FP32", "FP16", "FP64"):
            raise TransformError(f"postprocessing.output: output '{name}' is {spec.datatype} {list(spec.shape)}; "
                                 "top-k needs float scores of shape [N, classes]")
        return name

    def _bind_detection(self, name: str, spec: TensorSpec) -> str:
        if len(spec.shape) != 3 or spec.datatype not in ("FP32", "FP16", "FP64"):
            raise TransformError(f"postprocessing.detection: output '{name}' is {spec.datatype} {list(spec.shape)}; "
                                 "a yolov8 head is float [N, 4 + classes, anchors]")
        n = len(self.labels) if self.labels is not None else None  # [N, 4 + C, A], or [N, A, 4 + C]
        if n is not None and spec.shape[1] >= 0 and spec.shape[1] != 4 + n and spec.shape[2] != 4 + n:
            raise TransformError(f"postprocessing.labels: {n} labels, but output '{name}' {list(spec.shape)} has no "
                                 f"axis of 4 box values + {n} classes; give one label per class, in the model's order")
        return name

    def specs(self) -> list[TensorSpec]:
        """The outputs this adds to the model's."""
        if self.detection is not None:
            specs = [TensorSpec(detect.OUTPUT_BOXES, "FP32", (-1, -1, 4)),
                     TensorSpec(detect.OUTPUT_SCORES, "FP32", (-1, -1)),
                     TensorSpec(detect.OUTPUT_CLASSES, "INT64", (-1, -1)),
                     TensorSpec(detect.OUTPUT_COUNT, "INT64", (-1,))]
            if self.labels is not None:
                specs.append(TensorSpec(detect.OUTPUT_LABELS, "BYTES", (-1, -1)))
            return specs
        specs = [TensorSpec(OUTPUT_INDICES, "INT64", (-1, -1)), TensorSpec(OUTPUT_SCORES, "FP32", (-1, -1))]
        if self.labels is not None:
            specs.append(TensorSpec(OUTPUT_LABELS, "BYTES", (-1, -1)))
        return specs

    def detect(self, head: np.ndarray, width: int, height: int) -> dict[str, np.ndarray]:
        """Labelled boxes of a batch's detection head (``width`` x ``height``: the model's input)."""
        d = self.detection
        assert d is not None
        classes = len(self.labels) if self.labels is not None else None
        return detect.batch([detect.decode(image, width, height, d.score_threshold, d.iou_threshold,
                                           d.max_detections, classes) for image in head], self.labels)

    def apply(self, scores: np.ndarray) -> dict[str, np.ndarray]:
        scores = scores.astype(np.float32, copy=False).reshape(scores.shape[0], -1)
        if self.softmax:
            shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores = shifted / shifted.sum(axis=1, keepdims=True)
        k = min(self.top_k, scores.shape[1])
        idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out = {OUTPUT_INDICES: idx.astype(np.int64), OUTPUT_SCORES: np.take_along_axis(scores, idx, axis=1)}
        if self.labels is not None:
            names = self.labels
            out[OUTPUT_LABELS] = np.array([[(names[i] if i < len(names) else str(i)).encode() for i in row]
                                           for row in idx], dtype=object).reshape(idx.shape)
        return out


@dataclass(frozen=True)
class Transform:
    image: ImageTransform | None = None
    post: Postprocess | None = None

    @classmethod
    def from_json(cls, text: str | bytes) -> Transform:
        """``{"preprocessing": {"image": {...}}, "postprocessing": {...}}`` (camelCase, as in the EdgeModel)."""
        import orjson

        try:
            d = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise TransformError(f"--transform: not JSON: {e}") from None
        if not isinstance(d, dict) or set(d) - {"preprocessing", "postprocessing"}:
            raise TransformError("--transform: expected an object with preprocessing and/or postprocessing")
        pre, post = d.get("preprocessing"), d.get("postprocessing")
        if pre is not None and (not isinstance(pre, dict) or set(pre) - {"image"} or "image" not in pre):
            raise TransformError("preprocessing: expected an object with image")
        t = cls(image=ImageTransform.from_dict(pre["image"]) if pre is not None else None,
                post=Postprocess.from_dict(post) if post is not None else None)
        if t.post is not None and t.post.detection is not None and t.image is None:
            raise TransformError("postprocessing.detection: needs preprocessing.image (boxes are fractions of the "
                                 "model's input, whose size it gives); declare it on the EdgeModel")
        return t


@dataclass(frozen=True)
class Bound:
    """A transform checked against one loaded model: which input it feeds, which output it ranks."""

    image: ImageTransform | None
    input: str | None
    post: Postprocess | None
    output: str | None

    @classmethod
    def of(cls, transform: Transform, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> Bound:
        return cls(transform.image, transform.image.bind(inputs) if transform.image else None,
                   transform.post, transform.post.bind(outputs) if transform.post else None)

    def extra_outputs(self) -> list[TensorSpec]:
        return self.post.specs() if self.post is not None else []

    def finish(self, results: dict[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
        """The model's results plus the post-processing outputs among ``wanted``."""
        ours = (OUTPUT_INDICES, OUTPUT_SCORES, OUTPUT_LABELS, *detect.OUTPUTS)
        if self.post is None or self.output is None or not any(n in wanted for n in ours):
            return results
        if self.post.detection is not None:
            assert self.image is not None  # checked in of()
            return {**results, **self.post.detect(results[self.output], self.image.width, self.image.height)}
        return {**results, **self.post.apply(results[self.output])}
