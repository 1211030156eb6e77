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


class Detection(Model):
    """Boxes from a detection head: the best-scoring class per anchor, over scoreThreshold, per-class non-maximum
    suppression, at most maxDetections per image. Extra outputs detection_boxes (x1, y1, x2, y2 in fractions of
    the model's input), detection_scores, detection_classes, detection_labels (with labels) and detection_count.
    Needs spec.preprocessing.image."""

    format: Literal["yolov8"] = "yolov8"
    """yolov8: one output [N, 4 + classes, anchors] (Ultralytics export): box centre x, y, width, height in input
    pixels, then a probability per class."""
    score_threshold: Annotated[float, Field(ge=0, le=1)] = 0.25
    """Boxes scoring below this are dropped."""
    iou_threshold: Annotated[float, Field(ge=0, le=1)] = 0.45
    """A box overlapping a better one of its class by more than this (intersection over union) is dropped."""
    max_detections: Annotated[int, Field(ge=1, le=1000)] = 100
    """Boxes kept per image at most."""


class Postprocessing(Model):
    """What the runtime adds to the model's answer, as extra outputs: softmax and the top-k classes with their
    labels (topk_indices, topk_scores, topk_labels), or with `detection` labelled boxes after NMS."""

    output: InputName | None = None
    """The model output holding the class scores (shape [N, classes]); omitted means the first output."""
    softmax: bool = False
    """Apply softmax to the scores before ranking (when the model outputs logits)."""
    top_k: Annotated[int, Field(ge=1, le=100)] = 1
    """How many classes to return per input."""
    labels: Annotated[list[Label], Field(max_length=4096)] | None = None
    """Class names, by index; topk_labels (or detection_labels) is returned when given."""
    detection: Detection | None = None
    """Decode a detection head into boxes instead of ranking classes (softmax and topK are then unused)."""


SinkName = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
HttpUrl = Annotated[str, Field(min_length=8, max_length=2048, pattern=r"^https?://[^\s]+$")]


class PipelineSource(Model):
    """Where frames come from, on the node."""

    name: SinkName
    """Name of the source in results and metrics (a DNS label)."""
    kind: Literal["directory", "file", "mjpeg", "video"]
    """directory or file: images (JPEG/PNG) on the node; mjpeg: an HTTP multipart JPEG stream; video: an RTSP, HTTP
    or file video decoded by FFmpeg (PyAV)."""
    url: Annotated[str, Field(min_length=1, max_length=2048)]
    """A path for directory and file, http(s):// for mjpeg, rtsp://, http(s):// or a path for video."""
    fps: Annotated[float, Field(ge=0.01, le=1000)] | None = None
    """Take at most this many frames a second (a live stream skips, a file or directory plays at this rate)."""
    every: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    """Take one frame in `every`."""
    loop: bool = False
    """directory, file, a video file: start again at the end."""
    timeout_seconds: Annotated[float, Field(ge=0.1, le=600)] = 10.0
    """Connect and read deadline of a network source."""
    max_frame_bytes: Annotated[int, Field(ge=1024, le=1 << 28)] = 16 << 20
    """An encoded frame (an image file, an MJPEG part) larger than this is refused and counted."""
    retry_max_seconds: Annotated[float, Field(ge=0.1, le=3600)] = 30.0
    """Longest wait between reconnects of an unreachable stream."""

    cel_rules = (
        Rule(
            "self.kind != 'mjpeg' || self.url.startsWith('http://') || self.url.startsWith('https://')",
            "pipeline.sources[].url: an mjpeg source needs an http:// or https:// URL",
            lambda s: s.kind != "mjpeg" or s.url.startswith(("http://", "https://")),
            ".url",
        ),
    )


class MqttSink(Model):
    """An MQTT broker; results are published with QoS 1 or 2 and count as delivered once acknowledged."""

    host: Annotated[str, Field(min_length=1, max_length=253)]
    """Broker host name or address."""
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    """Broker port."""
    topic: Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^[^+#]+$")] = "edgefleet/results"
    """Topic the results are published to (no wildcards)."""
    qos: Annotated[int, Field(ge=1, le=2)] = 1
    """MQTT quality of service: 1 (at least once) or 2 (exactly once)."""
    client_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    """MQTT client id; omitted means a random one."""
    keepalive_seconds: Annotated[int, Field(ge=5, le=3600)] = 30
    """MQTT keep-alive."""
    timeout_seconds: Annotated[float, Field(ge=0.1, le=120)] = 5.0
    """Connect and acknowledgement deadline."""


class WebhookSink(Model):
    """An HTTP endpoint; each batch is POSTed as a JSON array and counts as delivered on a 2xx answer."""

    url: HttpUrl
    """http:// or https:// URL."""
    timeout_seconds: Annotated[float, Field(ge=0.1, le=120)] = 5.0
    """Request deadline."""


class PipelineSink(Model):
    """Where results go: exactly one of mqtt or webhook."""

    name: SinkName
    """Name of the sink in metrics (a DNS label)."""
    mqtt: MqttSink | None = None
    """Publish to an MQTT broker."""
    webhook: WebhookSink | None = None
    """POST to an HTTP endpoint."""
    batch: Annotated[int, Field(ge=1, le=1000)] = 64
    """Results sent at once."""

    cel_rules = (
        Rule(
            "has(self.mqtt) != has(self.webhook)",
            "pipeline.sinks[]: set exactly one of mqtt or webhook",
            lambda s: (s.mqtt is None) != (s.webhook is None),
        ),
    )


class PipelineQueue(Model):
    """The on-disk queue in front of each sink: results wait there while the uplink is down and are delivered in
    order when it returns, also by the next pod of a rollout; when full, the oldest are dropped and counted."""

    max_items: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000
    """Results kept per sink at most."""
    max_item_bytes: Annotated[int, Field(ge=1024, le=16 << 20)] = 256 << 10
    """Largest result kept."""
    size_limit_bytes: Annotated[int, Field(ge=1 << 20, le=1 << 40)] = 1 << 30
    """Disk the queues may use on a node, all sinks together: each sink keeps at most its equal share of results
    (the oldest are dropped beyond it). The queues lie in the node cache, one folder per EdgeDeployment, and
    survive container restarts, pod replacement and rollouts."""


class PipelineSpec(Model):
    """A data pipeline beside the runtime on every node of the deployment: frames from the node's sources run
    through the served variant (with the EdgeModel's spec.preprocessing, which it needs) and the results go to
    the sinks. docs/pipeline.md."""

    sources: Annotated[list[PipelineSource], Field(min_length=1, max_length=16)]
    """Frame sources on the node."""
    sinks: Annotated[list[PipelineSink], Field(min_length=1, max_length=8)]
    """Where results go."""
    queue: PipelineQueue = Field(default_factory=PipelineQueue)
    """The on-disk queue in front of each sink."""
    max_pending_frames: Annotated[int, Field(ge=1, le=1024)] = 8
    """Frames of live sources waiting for the model; beyond it the oldest is dropped and counted."""
    metrics_port: Annotated[int, Field(ge=1, le=65535)] = 9102
    """Port of the pipeline's Prometheus /metrics."""
