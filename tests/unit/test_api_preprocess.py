"""EdgeModel.spec.preprocessing / postprocessing: validated with messages naming the field, parsed the same way
by the runtime (which may not import the API), and rendered into every class's runtime container."""

from __future__ import annotations

import json

import pytest
import yaml
from edgefleet.api import EdgeModel, builtin_profiles, format_errors
from edgefleet.api.preprocessing import ImagePreprocessing, Postprocessing
from edgefleet.reconcile import World, reconcile_deployment
from edgefleet.render.workload import model_transform
from edgefleet.settings import Settings
from edgefleet_runtime.preprocess import IMAGE_KEYS, POST_KEYS, Transform, TransformError
from fake_kube import FakeKube
from pydantic import ValidationError

DIGEST = "sha256:" + "ab" * 32
IMAGE = {"width": 224, "height": 224, "resize": "centerCrop", "color": "BGR", "layout": "NHWC",
         "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "maxPixels": 1_000_000}
POST = {"softmax": True, "topK": 5, "labels": ["cat", "dog"]}


def edgemodel(pre=None, post=None) -> dict:
    spec = {"source": {"uri": "https://models.local/m.onnx"}, "format": "onnx"}
    if pre is not None:
        spec["preprocessing"] = pre
    if post is not None:
        spec["postprocessing"] = post
    return {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
            "metadata": {"name": "m", "namespace": "shop"}, "spec": spec}


def errors(doc: dict) -> list[str]:
    with pytest.raises(ValidationError) as e:
        EdgeModel.model_validate(doc)
    return format_errors(e.value)


def test_preprocess_api_accepts_a_full_declaration_and_the_runtime_reads_it_back():
    em = EdgeModel.model_validate(edgemodel({"image": IMAGE}, POST))
    text = model_transform(em.to_dict()["spec"])
    assert text is not None
    t = Transform.from_json(text)
    assert (t.image.width, t.image.height, t.image.resize, t.image.color, t.image.layout) == (
        224, 224, "centerCrop", "BGR", "NHWC")
    assert t.image.mean == (0.485, 0.456, 0.406) and t.image.std == (0.229, 0.224, 0.225)
    assert t.image.max_pixels == 1_000_000 and t.image.dtype == "float32"
    assert t.post.softmax and t.post.top_k == 5 and t.post.labels == ("cat", "dog")


@pytest.mark.parametrize("image, field, hint", [
    ({**IMAGE, "mean": [0.5, 0.5]}, "spec.preprocessing.image.mean", "one per channel"),
    ({"width": 8, "height": 8, "color": "GRAY", "std": [0.2, 0.2, 0.2]}, "spec.preprocessing.image.std", "1 for GRAY"),
    ({"width": 8, "height": 8, "dtype": "uint8", "scale": 1.0}, "spec.preprocessing.image.dtype", "remove scale"),
    ({"width": 0, "height": 8}, "spec.preprocessing.image.width", "greater than or equal to 1"),
    ({"width": 8, "height": 8, "layout": "CHW"}, "spec.preprocessing.image.layout", "NCHW"),
    ({"width": 8, "height": 8, "std": [0]}, "spec.preprocessing.image.std[0]", "greater than 0"),
    ({"width": 8, "height": 8, "colour": "RGB"}, "spec.preprocessing.image.colour", "Extra inputs"),
])
def test_preprocess_api_refuses_bad_declarations_naming_the_field(image, field, hint):
    lines = errors(edgemodel({"image": image}))
    assert any(line.startswith(field) and hint in line for line in lines), lines


def test_preprocess_api_refuses_bad_postprocessing_naming_the_field():
    lines = errors(edgemodel(None, {"topK": 0}))
    assert any(line.startswith("spec.postprocessing.topK") for line in lines), lines
    lines = errors(edgemodel(None, {"labels": [""]}))
    assert any(line.startswith("spec.postprocessing.labels[0]") for line in lines), lines


@pytest.mark.parametrize("image, field", [
    ({**IMAGE, "mean": [0.5, 0.5]}, "preprocessing.image.mean"),
    ({"width": 8, "height": 8, "dtype": "uint8", "scale": 1.0}, "preprocessing.image"),
    ({"width": 0, "height": 8}, "preprocessing.image.width"),
    ({"width": 8, "height": 8, "layout": "CHW"}, "preprocessing.image.layout"),
    ({"width": 8, "height": 8, "colour": "RGB"}, "preprocessing.image: unknown field(s) colour"),
    ({"height": 8}, "preprocessing.image.width"),
])
def test_preprocess_runtime_refuses_what_the_api_refuses(image, field):
    with pytest.raises(ValidationError):
        ImagePreprocessing.model_validate(image)
    with pytest.raises(TransformError, match=field.replace("(", r"\(").replace(")", r"\)")):
        Transform.from_json(json.dumps({"preprocessing": {"image": image}}))


def test_preprocess_runtime_and_api_know_the_same_fields():
    assert IMAGE_KEYS == {f.alias for f in ImagePreprocessing.model_fields.values()}
    assert POST_KEYS == {f.alias for f in Postprocessing.model_fields.values()}


def test_preprocess_crd_carries_the_cross_field_rules():
    crd = yaml.safe_load(open("crds/edgemodels.edgefleet.io.yaml"))
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    rules = spec["preprocessing"]["properties"]["image"]["x-kubernetes-validations"]
    assert {r["fieldPath"] for r in rules} == {".mean", ".std", ".dtype"}


def test_preprocess_every_class_runtime_gets_the_same_transform():
    kube = FakeKube()
    profiles = builtin_profiles()
    model = edgemodel({"image": IMAGE}, POST)
    model["metadata"]["name"] = "digits"
    model["status"] = {"variants": [{"profile": p.metadata["name"], "state": "Ready", "format": "onnx",
                                     "digest": DIGEST, "artifact": f"oci://r.local/m@{DIGEST}"} for p in profiles]}
    kube.add(model)
    kube.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDeployment",
              "metadata": {"name": "digits", "namespace": "shop"}, "spec": {"modelRef": {"name": "digits"}}})
    nodes = {"amd": {"kubernetes.io/arch": "amd64"}, "rpi": {"kubernetes.io/arch": "arm64"}}
    reconcile_deployment(kube, Settings(), "shop", "digits", World(nodes, profiles))
    transforms = []
    for name in ("digits-cpu-amd64", "digits-cpu-arm64"):
        ds = kube.stored("DaemonSet", name, "shop")
        args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
        transforms += [a.split("=", 1)[1] for a in args if a.startswith("--transform=")]
    assert len(transforms) == 2 and transforms[0] == transforms[1]
    parsed = Transform.from_json(transforms[0])
    assert parsed.image.width == 224 and parsed.post.labels == ("cat", "dog")


def test_preprocess_model_without_a_declaration_renders_no_transform():
    assert model_transform(edgemodel()["spec"]) is None
    assert model_transform(None) is None
    assert model_transform(edgemodel({"image": {"width": 0}})["spec"]) is None  # invalid: left out


def test_pipeline_rendered_config_is_what_the_runtime_parses():
    from edgefleet.api import EdgeDeployment
    from edgefleet.api.preprocessing import MqttSink, PipelineSink, PipelineSource, WebhookSink
    from edgefleet.render.workload import pipeline_config
    from edgefleet_runtime.pipeline import config as runtime_config

    ed = EdgeDeployment.model_validate({
        "metadata": {"name": "line", "namespace": "shop", "uid": "u"},
        "spec": {"modelRef": {"name": "digits"}, "pipeline": {
            "sources": [{"name": "cam", "kind": "mjpeg", "url": "http://cam.local/video", "fps": 5, "every": 2,
                         "timeoutSeconds": 3, "maxFrameBytes": 4096, "retryMaxSeconds": 2, "loop": False}],
            "sinks": [{"name": "broker", "batch": 10, "mqtt": {"host": "mqtt.local", "port": 8883, "topic": "a/b",
                                                               "qos": 2, "clientId": "c", "keepaliveSeconds": 60,
                                                               "timeoutSeconds": 2}},
                      {"name": "hook", "webhook": {"url": "https://hooks.local/x", "timeoutSeconds": 1}}],
            "queue": {"maxItems": 7, "maxItemBytes": 2048}, "maxPendingFrames": 3}}})
    parsed = runtime_config.parse(pipeline_config(ed))
    src = parsed.sources[0]
    assert (src.kind, src.url, src.fps, src.every, src.timeout_seconds, src.max_frame_bytes) == (
        "mjpeg", "http://cam.local/video", 5.0, 2, 3.0, 4096)
    assert parsed.sinks[0].mqtt.qos == 2 and parsed.sinks[0].mqtt.client_id == "c" and parsed.sinks[0].batch == 10
    assert parsed.sinks[1].webhook.url == "https://hooks.local/x"
    assert (parsed.queue.max_items, parsed.queue.max_item_bytes, parsed.max_pending_frames) == (7, 2048, 3)
    # every API field is one the runtime reads (the runtime refuses unknown ones)
    assert {f.alias for f in PipelineSource.model_fields.values()} == {
        "name", "kind", "url", "fps", "every", "loop", "timeoutSeconds", "maxFrameBytes", "retryMaxSeconds"}
    assert {f.alias for f in PipelineSink.model_fields.values()} == {"name", "mqtt", "webhook", "batch"}
    assert {f.alias for f in MqttSink.model_fields.values()} == {
        "host", "port", "topic", "qos", "clientId", "keepaliveSeconds", "timeoutSeconds"}
    assert {f.alias for f in WebhookSink.model_fields.values()} == {"url", "timeoutSeconds"}


def test_pipeline_api_refuses_bad_sinks_and_sources_naming_the_field():
    base = {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDeployment",
            "metadata": {"name": "line", "namespace": "shop"}, "spec": {"modelRef": {"name": "digits"}}}
    from edgefleet.api import EdgeDeployment

    def refused(pipeline: dict) -> list[str]:
        with pytest.raises(ValidationError) as e:
            EdgeDeployment.model_validate({**base, "spec": {**base["spec"], "pipeline": pipeline}})
        return format_errors(e.value)

    src = {"name": "cam", "kind": "video", "url": "rtsp://x"}
    lines = refused({"sources": [src], "sinks": [{"name": "b"}]})
    assert any(line.startswith("spec.pipeline.sinks[0]") and "exactly one of mqtt or webhook" in line
               for line in lines), lines
    lines = refused({"sources": [{**src, "kind": "mjpeg"}], "sinks": [{"name": "b", "webhook": {"url": "http://h/"}}]})
    assert any(line.startswith("spec.pipeline.sources[0].url") for line in lines), lines
    lines = refused({"sources": [src], "sinks": [{"name": "b", "mqtt": {"host": "h", "topic": "a/#"}}]})
    assert any(line.startswith("spec.pipeline.sinks[0].mqtt.topic") for line in lines), lines


def test_pipeline_without_model_preprocessing_is_degraded_and_not_rendered():
    kube = FakeKube()
    profiles = builtin_profiles()
    model = edgemodel()  # no spec.preprocessing
    model["metadata"]["name"] = "digits"
    model["status"] = {"variants": [{"profile": "cpu-amd64", "state": "Ready", "format": "onnx", "digest": DIGEST,
                                     "artifact": f"oci://r.local/m@{DIGEST}"}]}
    kube.add(model)
    pipeline = {"sources": [{"name": "cam", "kind": "video", "url": "rtsp://cam.local/s"}],
                "sinks": [{"name": "b", "mqtt": {"host": "mqtt.local"}}]}
    kube.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDeployment",
              "metadata": {"name": "digits", "namespace": "shop"},
              "spec": {"modelRef": {"name": "digits"}, "pipeline": pipeline}})
    world = World({"amd": {"kubernetes.io/arch": "amd64"}}, profiles)
    reconcile_deployment(kube, Settings(), "shop", "digits", world)
    ds = kube.stored("DaemonSet", "digits-cpu-amd64", "shop")
    assert [c["name"] for c in ds["spec"]["template"]["spec"]["containers"]] == ["runtime"]  # still serving
    conditions = {c["type"]: c for c in kube.stored("EdgeDeployment", "digits", "shop")["status"]["conditions"]}
    degraded = conditions["Degraded"]
    assert degraded["status"] == "True" and degraded["reason"] == "PipelineNeedsPreprocessing"
    assert "spec.preprocessing.image" in degraded["message"]

    model["spec"]["preprocessing"] = {"image": {"width": 8, "height": 8, "color": "GRAY"}}
    kube.add(model)
    reconcile_deployment(kube, Settings(), "shop", "digits", world)
    ds = kube.stored("DaemonSet", "digits-cpu-amd64", "shop")
    assert [c["name"] for c in ds["spec"]["template"]["spec"]["containers"]] == ["runtime", "pipeline"]
    conditions = {c["type"]: c for c in kube.stored("EdgeDeployment", "digits", "shop")["status"]["conditions"]}
    assert conditions["Degraded"]["reason"] != "PipelineNeedsPreprocessing"


def test_preprocess_detection_api_and_runtime_agree_and_it_needs_an_image_transform():
    from edgefleet.api.preprocessing import Detection
    from edgefleet_runtime.preprocess import DETECTION_KEYS

    assert DETECTION_KEYS == {f.alias for f in Detection.model_fields.values()}
    post = {"labels": ["face"], "detection": {"scoreThreshold": 0.4, "iouThreshold": 0.5, "maxDetections": 20}}
    em = EdgeModel.model_validate(edgemodel({"image": {"width": 320, "height": 320}}, post))
    t = Transform.from_json(model_transform(em.to_dict()["spec"]))
    assert (t.post.detection.score_threshold, t.post.detection.iou_threshold, t.post.detection.max_detections) == (
        0.4, 0.5, 20)
    lines = errors(edgemodel(None, post))
    assert any(line.startswith("spec.postprocessing.detection") and "needs spec.preprocessing.image" in line
               for line in lines), lines
    lines = errors(edgemodel({"image": {"width": 8, "height": 8}}, {"detection": {"maxDetections": 0}}))
    assert any(line.startswith("spec.postprocessing.detection.maxDetections") for line in lines), lines


@pytest.mark.parametrize("driver", [False, True])
def test_pipeline_queue_lies_in_the_node_cache_and_outlives_a_rollout(driver):
    """The queues are a folder of the node cache per EdgeDeployment (not an emptyDir): the pod of the next variant
    finds what the last one could not deliver. The disk they may use is split between the sinks."""
    from edgefleet.render.workload import PIPELINE_QUEUE_MOUNT, pipeline_queue_path
    from edgefleet_runtime.pipeline import config as runtime_config

    kube = FakeKube()
    model = edgemodel({"image": {"width": 8, "height": 8, "color": "GRAY"}})
    model["metadata"]["name"] = "digits"
    kube.add(model)
    pipeline = {"sources": [{"name": "cam", "kind": "video", "url": "rtsp://cam.local/s"}],
                "sinks": [{"name": "b", "mqtt": {"host": "mqtt.local"}}, {"name": "h", "webhook": {"url": "http://h/"}}],
                "queue": {"sizeLimitBytes": 1 << 30}}
    kube.add({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDeployment",
              "metadata": {"name": "digits", "namespace": "shop"},
              "spec": {"modelRef": {"name": "digits"}, "pipeline": pipeline}})
    world = World({"amd": {"kubernetes.io/arch": "amd64"}}, builtin_profiles())
    seen = []
    for digest in ("sha256:" + "ab" * 32, "sha256:" + "cd" * 32):  # a new variant: the pods are replaced
        kube.set_status("EdgeModel", "digits", "shop", {"variants": [
            {"profile": "cpu-amd64", "state": "Ready", "format": "onnx", "digest": digest,
             "artifact": f"oci://r.local/m@{digest}"}]})
        reconcile_deployment(kube, Settings(node_cache_driver=driver), "shop", "digits", world)
        pod = kube.stored("DaemonSet", "digits-cpu-amd64", "shop")["spec"]["template"]
        c = next(c for c in pod["spec"]["containers"] if c["name"] == "pipeline")
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == PIPELINE_QUEUE_MOUNT)
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
        assert not mount.get("readOnly") and "emptyDir" not in volume
        if driver:  # the namespace's own part of the cache, through the cache driver
            assert volume["csi"]["volumeAttributes"]["folder"] == pipeline_queue_path(_ed(kube), True)
            assert pipeline_queue_path(_ed(kube), True) == "pipeline/digits"
        else:  # a subPath of the hostPath cache, made and handed to the runtime user by prepare-cache
            assert volume["hostPath"]["path"] == Settings().node_cache
            assert mount["subPath"] == "pipeline/shop/digits"
            prepare = next(i for i in pod["spec"]["initContainers"] if i["name"] == "prepare-cache")
            assert "--spool=pipeline/shop/digits" in prepare["args"]
        config_arg = next(a for a in c["args"] if a.startswith("--config-json="))
        queue = runtime_config.parse(config_arg.split("=", 1)[1]).queue
        assert queue.path == PIPELINE_QUEUE_MOUNT and queue.max_bytes == (1 << 30) // 2
        seen.append((pod["metadata"]["annotations"]["edgefleet.io/variant-digest"], mount, volume))
    assert seen[0][0] != seen[1][0] and seen[0][1:] == seen[1][1:]  # another variant, the same queue


def _ed(kube):
    from edgefleet.api import EdgeDeployment

    return EdgeDeployment.model_validate(kube.stored("EdgeDeployment", "digits", "shop"))
