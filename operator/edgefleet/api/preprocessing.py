"""EdgeModel.spec.preprocessing and spec.postprocessing: how an encoded input becomes the model's tensor, and
what the runtime adds to the model's answer. The operator hands both, as JSON, to every class's runtime
(`--transform`), which parses them again with `edgefleet_runtime.preprocess` (it may not import this package;
tests/unit/test_api_preprocess.py keeps the two in step)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .base import Model, Rule

Label = Annotated[str, Field(min_length=1, max_length=128)]
InputName = Annotated[str, Field(min_length=1, max_length=256)]


def _channels(color: str) -> int:
    return 1 if color == "GRAY" else 3


class ImagePreprocessing(Model):
    """Decode a JPEG or PNG image and turn it into the model's input tensor:
    value = (pixel * scale - mean) / std, per channel, in the declared colour order, layout and dtype."""

    input: InputName | None = None
    """The model input the image feeds; omitted means the model's only input."""
    width: Annotated[int, Field(ge=1, le=8192)]
    """Width, in pixels, of the tensor the model takes."""
    height: Annotated[int, Field(ge=1, le=8192)]
    """Height, in pixels, of the tensor the model takes."""
    resize: Literal["stretch", "centerCrop"] = "stretch"
    """stretch: resize to width x height, ignoring the aspect ratio; centerCrop: resize the shorter side to fit,
    then cut the centre."""
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    """Resampling filter of the resize."""
    color: Literal["RGB", "BGR", "GRAY"] = "RGB"
    """Channel order the model expects (GRAY: one channel)."""
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    """Tensor layout: channels first (NCHW) or last (NHWC)."""
    dtype: Literal["float32", "float16", "uint8", "int8"] = "float32"
    """Element type of the tensor. uint8 passes the pixels as they are; int8 subtracts 128."""
    scale: Annotated[float, Field(gt=0, le=1e6)] | None = None
    """Factor applied to the 0..255 pixels first; omitted means 1/255 for float dtypes."""
    mean: Annotated[list[Annotated[float, Field(ge=-1e6, le=1e6)]], Field(min_length=1, max_length=3)] | None = None
    """Subtracted after scaling: one value, or one per channel in the declared colour order."""
    std: Annotated[list[Annotated[float, Field(gt=0, le=1e6)]], Field(min_length=1, max_length=3)] | None = None
    """Divided by after the mean: one value, or one per channel in the declared colour order."""
    max_pixels: Annotated[int, Field(ge=1, le=1 << 28)] = 40_000_000
    """Largest decoded image (width x height) the runtime accepts; a larger one (a decompression bomb) is
    refused with 400 before it is decoded."""
    max_encoded_bytes: Annotated[int, Field(ge=1024, le=1 << 28)] = 16 << 20
    """Largest encoded image (bytes) the runtime accepts in one request."""

    cel_rules = (
        Rule(
            "!has(self.mean) || size(self.mean) == 1 || size(self.mean) == (self.color == 'GRAY' ? 1 : 3)",
            "preprocessing.image.mean: give one value, or one per channel (3 for RGB/BGR, 1 for GRAY)",
            lambda s: s.mean is None or len(s.mean) in (1, _channels(s.color)),
            ".mean",
        ),
        Rule(
            "!has(self.std) || size(self.std) == 1 || size(self.std) == (self.color == 'GRAY' ? 1 : 3)",
            "preprocessing.image.std: give one value, or one per channel (3 for RGB/BGR, 1 for GRAY)",
            lambda s: s.std is None or len(s.std) in (1, _channels(s.color)),
            ".std",
        ),
        Rule(
            "!(self.dtype in ['uint8', 'int8']) || (!has(self.scale) && !has(self.mean) && !has(self.std))",
            "preprocessing.image: dtype uint8/int8 takes the pixels as they are; remove scale, mean and std "
            "or use dtype float32",
            lambda s: s.dtype not in ("uint8", "int8") or (s.scale is None and s.mean is None and s.std is None),
            ".dtype",
        ),
    )


class Preprocessing(Model):
    """Pre-processing the runtime applies to encoded inputs (JPEG/PNG bytes as an Open Inference Protocol BYTES
    tensor, or an image/jpeg or image/png request body). Plain tensors are served as before."""

    image: ImagePreprocessing
    """Image decode, resize, colour order, layout, normalisation and dtype."""


class Postprocessing(Model):
    """What the runtime adds to the model's answer: softmax and the top-k classes with their labels, as extra
    outputs (topk_indices, topk_scores, topk_labels)."""

    output: InputName | None = None
    """The model output holding the class scores (shape [N, classes]); omitted means the first output."""
    softmax: bool = False
    """Apply softmax to the scores before ranking (when the model outputs logits)."""
    top_k: Annotated[int, Field(ge=1, le=100)] = 1
    """How many classes to return per input."""
    labels: Annotated[list[Label], Field(max_length=4096)] | None = None
    """Class names, by index; topk_labels is returned when given."""
