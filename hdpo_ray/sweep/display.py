"""The sweep driver's lines: one when a trial starts, one when it ends with the numbers a user compares (the
selection metric and both entropy measures). Tune's own status tables and experiment box are shown with
`--verbose` instead."""

from __future__ import annotations

import contextlib
import math
import os

from ray.tune import Callback

SHOWN = ("entropy/teacher_forced", "entropy/sampled")


class TrialLines(Callback):
    def __init__(self, metric: str, total_trials: int):
        self.metric, self.total_trials = metric, total_trials

    @staticmethod
    def _ended(trials, trial) -> int:
        """Trials ended so far, this one included (a resumed sweep counts those an earlier invocation ended)."""
        return 1 + sum(1 for t in trials if t is not trial and t.status in ("TERMINATED", "ERROR"))

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"[hdpo-ray] trial {trial} started", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        figures = ", ".join(
            f"{key} {result[key]:.4f}"
            for key in (self.metric, *SHOWN)
            if isinstance(result.get(key), (int, float)) and math.isfinite(result[key])
        )
        print(
            f"[hdpo-ray] trial {trial} finished ({self._ended(trials, trial)}/{self.total_trials}): {figures}",
            flush=True,
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        print(
            f"[hdpo-ray] trial {trial} failed ({self._ended(trials, trial)}/{self.total_trials}); its error is in "
            f"{trial.path}/error.txt",
            flush=True,
        )


@contextlib.contextmanager
def tune_output_engine():
    """Tune's current output engine prints its experiment box and result paths whatever RunConfig.verbose says;
    its previous one (Ray's RAY_AIR_NEW_OUTPUT=0) prints nothing at verbose=0. Quiet unless --verbose, for this
    fit only."""
    from hdpo_ray.runtime import verbose

    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    if not verbose():
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before
