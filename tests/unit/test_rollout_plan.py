"""The wave planner: replaces pods wave by wave, respects maxUnavailable and the health gate, fails on
timeout."""

from __future__ import annotations

from edgefleet.reconcile.rollout import PodView, max_unavailable_count, plan_wave, wave_targets

NOW = 1_000_000.0


def pods(updated_healthy=0, updated_unready=0, old=10, old_unready=0):
    out = []
    for i in range(updated_healthy):
        out.append(PodView(f"new-{i}", f"n{i:02d}", "new", NOW - 60))
    for i in range(updated_unready):
        out.append(PodView(f"newu-{i}", f"n{50 + i:02d}", "new", None))
    for i in range(old):
        out.append(PodView(f"old-{i}", f"o{i:02d}", "old", None if i < old_unready else NOW - 600))
    return out


def plan(view, nodes=10, waves=(10, 50, 100), max_unavailable=3, started=NOW - 5):
    return plan_wave(view, "new", nodes, list(waves), max_unavailable, 10, 120, started, NOW)


def test_targets_round_up_and_max_unavailable_rounds_down():
    assert wave_targets([10, 50, 100], 7) == [1, 4, 7]
    assert max_unavailable_count("25%", 10) == 2 and max_unavailable_count("1%", 10) == 1
    assert max_unavailable_count(3, 10) == 3


def test_first_wave_replaces_only_its_share():
    result = plan(pods(old=10))
    assert result.state == "InProgress" and result.wave == 1
    assert result.delete == ("old-0",)


def test_next_wave_waits_for_the_health_gate():
    view = pods(updated_unready=1, old=9)  # replaced, not Ready yet
    result = plan(view)
    assert result.wave == 1 and result.delete == ()
    young = [PodView("new-0", "n00", "new", NOW - 3)] + pods(old=9)  # Ready for 3 s < minReadySeconds 10
    assert plan(young).delete == ()


def test_second_wave_respects_max_unavailable():
    result = plan(pods(updated_healthy=1, old=9), max_unavailable=2)
    assert result.wave == 2 and len(result.delete) == 2  # target 5: 4 more wanted, 2 allowed at once
    # one old pod is down already: it is replaced first (free), then one serving pod (budget 2 - 1 down)
    busy = plan(pods(updated_healthy=1, old=9, old_unready=1), max_unavailable=2)
    assert busy.delete == ("old-0", "old-1")
    tight = plan(pods(updated_healthy=1, old=9, old_unready=2), max_unavailable=2)
    assert tight.delete == ("old-0", "old-1")  # both down already; no serving pod may go


def test_complete_when_every_node_is_updated_and_healthy():
    result = plan(pods(updated_healthy=10, old=0))
    assert result.state == "Complete" and result.wave == 3 and not result.delete


def test_a_wave_that_stays_unhealthy_fails_after_the_timeout():
    result = plan(pods(updated_unready=1, old=9), started=NOW - 121)
    assert result.state == "Failed" and "wave 1/3" in result.message and "0/1" in result.message


def test_canary_is_two_waves():
    result = plan(pods(updated_healthy=2, old=8), waves=(20, 100), max_unavailable=10)
    assert result.wave == 2 and len(result.delete) == 8


def test_outdated_pods_that_serve_nothing_are_replaced_without_waiting_for_the_budget():
    view = [PodView("bad-0", "n00", "bad", None), PodView("ok-1", "n01", "new", NOW - 60)]
    result = plan_wave(view, "new", 2, [100], 1, 10, 120, NOW - 5, NOW)
    assert result.delete == ("bad-0",)


def test_a_flapping_wave_keeps_its_clock():
    from edgefleet.reconcile.rollout import _wave_record

    assert _wave_record("h:2:100", "h", 1, NOW) == (2, 100.0)  # fell back from wave 2: same clock
    assert _wave_record("h:2:100", "h", 3, NOW) == (3, NOW)  # progressed: a new wave, a new clock
    assert _wave_record("old:2:100", "h", 1, NOW) == (1, NOW)  # a new template starts over
