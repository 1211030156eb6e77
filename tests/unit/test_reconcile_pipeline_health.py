"""The operator's reading of pipeline /metrics (reconcile.pipeline_health), pure: which part is down, for how long,
on which pods, and what the message tells the user; hostile or unreadable answers say nothing."""

from __future__ import annotations

from edgefleet.api import EdgeDeployment
from edgefleet.reconcile import pipeline_health
from edgefleet.reconcile.pipeline_health import problem, read_pods

ED = EdgeDeployment.model_validate({
    "metadata": {"name": "line", "namespace": "shop"},
    "spec": {"modelRef": {"name": "digits"}, "pipeline": {
        "sources": [{"name": "cam", "kind": "video", "url": "rtsp://cam.local/s"},
                    {"name": "shots", "kind": "directory", "url": "/data/shots"}],
        "sinks": [{"name": "hook", "webhook": {"url": "https://hooks.local/x"}}]}}})


def pod(name: str, node: str, profile: str = "cpu-arm64", ready: bool = True) -> dict:
    return {"metadata": {"name": name, "labels": {"edgefleet.io/profile": profile}}, "spec": {"nodeName": node},
            "status": {"podIP": f"10.0.0.{len(name)}",
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def metrics(source_down: dict[str, float], sink_down: dict[str, float], queued: int = 0, dropped: int = 0) -> str:
    lines = ["# TYPE edgefleet_pipeline_source_up gauge"]
    lines += [f'edgefleet_pipeline_source_up{{source="{n}"}} {0 if s else 1}' for n, s in source_down.items()]
    lines += ["# TYPE edgefleet_pipeline_source_down_seconds gauge"]
    lines += [f'edgefleet_pipeline_source_down_seconds{{source="{n}"}} {s}' for n, s in source_down.items()]
    lines += ["# TYPE edgefleet_pipeline_sink_up gauge"]
    lines += [f'edgefleet_pipeline_sink_up{{sink="{n}"}} {0 if s else 1}' for n, s in sink_down.items()]
    lines += ["# TYPE edgefleet_pipeline_sink_down_seconds gauge"]
    lines += [f'edgefleet_pipeline_sink_down_seconds{{sink="{n}"}} {s}' for n, s in sink_down.items()]
    lines += ["# TYPE edgefleet_pipeline_queue_depth gauge", f'edgefleet_pipeline_queue_depth{{sink="hook"}} {queued}',
              "# TYPE edgefleet_pipeline_queue_dropped counter",
              f'edgefleet_pipeline_queue_dropped_total{{sink="hook"}} {dropped}']
    return "\n".join(lines) + "\n"


def test_pipeline_health_sink_down_past_the_grace_names_the_endpoint_and_the_queue():
    texts = {"10.0.0.2": metrics({"cam": 0}, {"hook": 45}, queued=900, dropped=3)}
    read = read_pods([pod("p1", "rpi-0")], ED, lambda ip, port: texts["10.0.0.2"])
    reason, message = problem(ED, read)
    assert reason == "PipelineSinkUnreachable"
    assert "sink 'hook' (webhook https://hooks.local/x) unreachable" in message and "p1 on rpi-0" in message
    assert "up to 900 results wait" in message and "3 oldest dropped" in message
    assert "spec.pipeline.sinks[0].webhook.url" in message


def test_pipeline_health_a_short_blip_is_no_problem_and_sources_come_first():
    short = metrics({"cam": pipeline_health.DOWN_GRACE_SECONDS - 1}, {"hook": 0})
    assert problem(ED, read_pods([pod("p1", "rpi-0")], ED, lambda ip, port: short)) is None
    both = metrics({"cam": 0, "shots": 300}, {"hook": 60})
    reason, message = problem(ED, read_pods([pod("p1", "rpi-0")], ED, lambda ip, port: both))
    assert reason == "PipelineSourceUnreachable"
    assert message.index("source 'shots'") < message.index("sink 'hook'")
    assert "the path '/data/shots' does not exist in the pipeline container" in message  # the directory's own fix


def test_pipeline_health_names_a_few_pods_and_counts_the_rest():
    pods = [pod(f"p{i}", f"rpi-{i}") for i in range(6)]
    down = metrics({"cam": 100}, {})
    reason, message = problem(ED, read_pods(pods, ED, lambda ip, port: down))
    assert reason == "PipelineSourceUnreachable" and "on 6/6 pods read" in message and "and 3 more" in message


def test_pipeline_health_unreadable_or_hostile_answers_say_nothing_and_only_ready_pods_are_read():
    asked: list[str] = []

    def fetch(ip: str, port: int) -> str:
        asked.append(ip)
        if ip.endswith(".2"):
            raise OSError("[Errno 111] Connection refused")
        return "<html>edgefleet_pipeline_source_up{source=\"cam\"} 0 </html>\n{{{"

    pods = [pod("p1", "rpi-0"), pod("p2x", "rpi-1"), pod("p3xyz", "rpi-2", ready=False)]
    read = read_pods(pods, ED, fetch)
    assert [p.pod for p in read] == ["p1", "p2x"] and all(p.error for p in read)
    assert "<html>" not in " ".join(p.error or "" for p in read)  # nothing of the answer is quoted
    assert problem(ED, read) is None
    assert len(asked) == 2
