"""The sweep driver's own lines (TrialLines) and Tune's output switch, on plain trial records."""

from __future__ import annotations

import os
from types import SimpleNamespace

from hdpo_ray.sweep.display import TrialLines, tune_output_engine


class _Trial(SimpleNamespace):
    def __str__(self) -> str:
        return self.name


def test_a_resumed_sweep_counts_the_trials_an_earlier_invocation_ended(capsys):
    lines = TrialLines("eval/policy_accuracy", total_trials=3)
    earlier = [_Trial(name=f"t{i}", status="TERMINATED", last_result={}, path="") for i in (1, 2)]
    last = _Trial(name="t3", status="RUNNING", path="/sweep/t3")
    last.last_result = {"eval/policy_accuracy": 0.5, "entropy/sampled": 2.0, "entropy/teacher_forced": float("nan")}
    lines.on_trial_start(0, [*earlier, last], last)
    lines.on_trial_complete(0, [*earlier, last], last)
    assert capsys.readouterr().out.splitlines() == [
        "[hdpo-ray] trial t3 started",
        "[hdpo-ray] trial t3 finished (3/3): eval/policy_accuracy 0.5000, entropy/sampled 2.0000",
    ]
    lines.on_trial_error(0, [earlier[0], last], last)
    assert capsys.readouterr().out.startswith("[hdpo-ray] trial t3 failed (2/3); its error is in /sweep/t3/")


def test_tunes_output_engine_is_switched_for_the_fit_only(monkeypatch):
    monkeypatch.delenv("HDPO_RAY_VERBOSE", raising=False)
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    with tune_output_engine():
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ
    monkeypatch.setenv("HDPO_RAY_VERBOSE", "1")
    with tune_output_engine():
        assert "RAY_AIR_NEW_OUTPUT" not in os.environ
