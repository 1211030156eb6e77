"""The transport-agnostic data plane: one request and one response type that every transport decodes into and
encodes from, and the one place that looks up the served model and runs it.

REST (``app.App`` with ``protocol``) and gRPC (``grpcserver``) are thin adapters: they parse their wire format
into an :class:`InferRequest` (checked against the model with ``tensors``), call :meth:`DataPlane.infer`, and
write the :class:`InferResponse` back in their own format. As KServe splits ``v2_endpoints`` / ``grpc_server``
from ``dataplane``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .backends import Backend, TensorSpec
from .budget import Lease, MemoryBudget
from .preprocess import Bound, ImageError
from .tensors import RequestError, charge

log = logging.getLogger("edgefleet_runtime")


# What the data plane needs of the model slot, metrics and monitor (``app.ModelSlot``, ``app.Metrics``,
# ``monitor.Monitor``), as structural types: the plane depends on no transport and on nothing that imports one.
class LoadedModel(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def backend(self) -> Backend: ...
    @property
    def inputs(self) -> Mapping[str, TensorSpec]: ...
    @property
    def outputs(self) -> Mapping[str, TensorSpec]: ...
    @property
    def model_outputs(self) -> Mapping[str, TensorSpec]: ...
    @property
    def encoded(self) -> Mapping[str, TensorSpec]: ...
    @property
    def transform(self) -> Bound | None: ...
    @property
    def body_limit(self) -> int | None: ...
    @property
    def metadata_json(self) -> bytes: ...


class ModelSlot(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def current(self) -> LoadedModel | None: ...


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class Metrics(Protocol):
    @property
    def batch(self) -> Observer: ...
    @property
    def latency(self) -> Observer: ...
    def count(self, endpoint: str, code: int) -> None: ...
    def count_refused(self, reason: str) -> None: ...


class Monitor(Protocol):
    def observe(self, model: LoadedModel, feeds: dict[str, np.ndarray], results: dict[str, np.ndarray]) -> None: ...


class Shadow(Protocol):
    def offer(self, feeds: dict[str, np.ndarray], results: dict[str, np.ndarray]) -> None: ...


class Control(Protocol):
    """``control.Control`` (serve --control-dir): its shadow candidate sees a sample of requests."""

    @property
    def shadow(self) -> Shadow | None: ...


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool = False
    """REST's binary tensor extension: send this output as raw bytes after the JSON (gRPC always does)."""


@dataclass(slots=True)
class InferRequest:
    """One inference request, decoded and checked against ``model`` (names, datatypes, shapes, finite values)."""

    model: LoadedModel
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput]
    """What to answer, in order; every output of the model when the request named none."""
    id: str | None = None


@dataclass(frozen=True, slots=True)
class OutputTensor:
    name: str
    data: np.ndarray
    binary: bool = False


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[OutputTensor] = field(default_factory=list)
    id: str | None = None


class DataPlane:
    """The served model slot, the process's memory budget, metrics and monitor, shared by every transport."""

    def __init__(self, slot: ModelSlot, metrics: Metrics, budget: MemoryBudget | None = None,
                 monitor: Monitor | None = None):
        self.slot = slot
        self.metrics = metrics
        self.budget = budget or MemoryBudget()
        self.monitor = monitor
        self.control: Control | None = None  # control.Control (serve --control-dir), or None
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.slot.current is not None and not self.draining

    def lease(self) -> Lease:
        """A hold on the memory budget for one request (a context manager that gives it all back)."""
        return Lease(self.budget)

    def model(self, name: str, version: str | None) -> LoadedModel:
        """The served model if ``name``/``version`` name it; RequestError 404 otherwise. Callers keep the
        reference for the whole request: a hot swap does not change the model under it."""
        model = self.slot.current
        if model is None or name != model.name:
            served = model.name if model else self.slot.name
            raise RequestError(404, f"unknown model '{name}'; this server serves '{served}'")
        if version not in (None, "", model.version):
            raise RequestError(
                404, f"model '{name}' has no version '{version}'; the served version is '{model.version}'"
            )
        return model

    def run(self, model: LoadedModel, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """Run the backend; RequestError 400 when it refuses inputs, 500 when it fails. Outputs of the declared
        post-processing are computed from the model's."""
        names = output_names
        transform = model.transform
        if transform is not None and transform.output is not None:
            names = [n for n in output_names if n in model.model_outputs]
            if transform.output not in names and len(names) < len(output_names):
                names.append(transform.output)
        try:
            results = model.backend.run(feeds, names)
        except Exception as e:  # the backend refused inputs that passed metadata checks
            msg = str(e).splitlines()[0][:500] if str(e) else type(e).__name__
            status = 400 if "INVALID_ARGUMENT" in msg or "InvalidArgument" in type(e).__name__ else 500
            if status == 500:
                log.error("inference failed", extra={"model": model.name, "error": msg})
            raise RequestError(status, f"inference failed: {msg}") from None
        first = next(iter(feeds.values()))
        self.metrics.batch.observe(first.shape[0] if first.ndim else 1)
        if self.monitor is not None:
            self.monitor.observe(model, feeds, results)
        shadow = self.control.shadow if self.control is not None else None
        if shadow is not None:
            shadow.offer(feeds, results)
        if transform is not None:
            results = transform.finish(results, output_names)
        return results

    def infer(self, request: InferRequest, lease: Lease | None = None) -> InferResponse:
        """Run a decoded request on its model and answer the outputs it asked for, in its order. Encoded images
        (BYTES) for an input with declared image pre-processing are decoded first, charged to ``lease``."""
        model = request.model
        decode_images(model, request.inputs, lease)
        results = self.run(model, request.inputs, [o.name for o in request.outputs])
        outputs = [OutputTensor(o.name, results[o.name], o.binary) for o in request.outputs]
        return InferResponse(model.name, model.version, outputs, request.id)


def decode_images(model: LoadedModel, feeds: dict[str, np.ndarray], lease: Lease | None) -> None:
    """Encoded images (BYTES) given for an input with declared pre-processing -> the model's tensor, in place."""
    for name in model.encoded:
        arr = feeds.get(name)
        if arr is not None and arr.dtype == object:
            feeds[name] = _decode(model, list(arr.ravel()), lease)


def _decode(model: LoadedModel, images: list[object], lease: Lease | None) -> np.ndarray:
    """Decode and transform encoded images, each one's pixels charged to the memory budget before decoding;
    RequestError 400 naming what is wrong with a refused image, 413 when they are over maxEncodedBytes."""
    if model.transform is None or model.transform.image is None:
        raise RequestError(415, f"model '{model.name}' declares no image pre-processing")
    image = model.transform.image
    if not images:
        raise RequestError(400, "no image given: send at least one encoded image")
    if sum(len(b) if isinstance(b, bytes) else 0 for b in images) > image.max_encoded_bytes:
        raise RequestError(413, f"the request's images are over maxEncodedBytes {image.max_encoded_bytes}")
    out = []
    for i, data in enumerate(images):
        if not isinstance(data, bytes):
            raise RequestError(400, f"image {i}: send encoded images as binary data (parameters.binary_data_size) "
                                    "or as an image/jpeg or image/png body, not as JSON text")
        try:
            img = image.open(data)
            charge(lease, img.size[0] * img.size[1] * 4, f"image {i} ({img.size[0]}x{img.size[1]} decoded)")
            img.load()
            out.append(image.from_image(img))
        except ImageError as e:
            raise RequestError(400, f"image {i}: {e}") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise RequestError(400, f"image {i}: corrupt image: {str(e)[:200]}") from None
    return np.stack(out)
