"""What a run asks of the Ray cluster, checked before it starts; on a cluster that grows, asked for.

A run holds groups of Ray actors at the same time (the training workers, the reference pool, Ray
Data's own tasks, the eval pool): a phase. A phase that does not fit makes Ray wait forever, so:

- a fixed cluster refuses it at once, in one line: what asks for how much, and what to change;
- a cluster that autoscales (an autoscaler reports to its GCS, as under KubeRay or `ray up`, or
  cluster.autoscaling=on) is asked for the bundles with `ray.autoscaler.sdk.request_resources`, and
  the driver waits, printing what is still missing, up to cluster.wait_for_resources_s. A request
  the autoscaler starts no node for (no node type offers it, or every type is at max_workers) is
  refused once the autoscaler has looked at it IDLE_LOOKS times without starting a node.

The request is withdrawn when the run ends, so the autoscaler may scale the nodes down again.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from hdpo_ray.config import RAY_BUILTIN_RESOURCES
from hdpo_ray.errors import UserError

log = logging.getLogger("hdpo_ray")

IDLE_LOOKS = 5
"""Autoscaler updates after the request with no node starting: then it starts none for it (5 s apart by default)."""
PROGRESS_EVERY_S = 10.0


class ResourceError(UserError, RuntimeError):
    """The cluster cannot hold what the run asks for; one line for the user."""


@dataclass(frozen=True)
class Group:
    """`count` Ray actors or tasks, each holding `bundle` on a node whose labels match `labels`.

    `hint` says which config keys change the request.
    """

    name: str
    count: int
    bundle: dict[str, float]
    labels: dict[str, str] = field(default_factory=dict)
    hint: str = ""

    def total(self, resource: str) -> float:
        return self.count * self.bundle.get(resource, 0.0)

    def describe(self) -> str:
        each = ", ".join(f"{amount:g} {resource}" for resource, amount in self.bundle.items() if amount)
        return f"{self.name} ({self.count} x {each})"


# Ray Data's tasks run beside the workers or the reference pool: reading and tokenizing input files asks
# for one whole CPU per task, cache reads and writes for a fraction each. One CPU must stay free for
# them, or the pipeline waits forever.
DATA_CPUS = 1.0
DATA_GROUP = Group("Ray Data", 1, {"CPU": DATA_CPUS})
CUSTOM_HINT = (
    "only nodes started with the custom resource {resource} offer it (ray start --resources, a KubeRay group's "
    "rayStartParams)"
)


@dataclass(frozen=True)
class Phase:
    """Groups that hold their resources at the same time; `note` says why they must coexist."""

    groups: tuple[Group, ...]
    note: str = ""
    hint: str = ""


def shortfall(phase: Phase, cluster: dict[str, float], node_labels: list[dict[str, str]] | None = None) -> str | None:
    """None when the phase fits the cluster's totals (and, given node_labels, each label selector matches a
    node); else one line: who asks for how much, what the cluster has, what to change."""
    for resource in dict.fromkeys(r for g in phase.groups for r, amount in g.bundle.items() if amount):
        askers = [g for g in phase.groups if g.bundle.get(resource)]
        needed, has = sum(g.total(resource) for g in askers), cluster.get(resource, 0.0)
        if needed > has + 1e-9:
            advice = (
                [*(g.hint for g in askers), phase.hint]
                if resource in RAY_BUILTIN_RESOURCES
                else [CUSTOM_HINT.format(resource=resource)]
            )
            hints = "; ".join(dict.fromkeys(h for h in advice if h))
            asks = " + ".join(g.describe() for g in askers)
            return f"{phase.note}{asks} need {needed:g} {resource}, but the cluster has {has:g}; {hints}"
    for group in phase.groups:
        if node_labels is not None and group.labels and not any(labels_match(group.labels, n) for n in node_labels):
            wanted = ", ".join(f"{k}={v}" for k, v in group.labels.items())
            return (
                f"{group.name} ask for a node labelled {wanted}, but no node of the cluster has those labels; "
                f"{group.hint}"
            )
    return None


def placement_options(resources: dict[str, float], label_selector: dict[str, str]) -> dict[str, dict]:
    """Ray actor options that steer an actor to node groups: custom resources and a label selector, where set."""
    return {k: v for k, v in (("resources", resources), ("label_selector", label_selector)) if v}


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Equality selectors are checked; Ray's operators (in(...), !value) are left to Ray."""
    return all(labels.get(k) == v for k, v in selector.items() if not v.startswith(("in(", "!")))


def first_shortfall(
    phases: Sequence[Phase], cluster: dict[str, float], node_labels: list[dict[str, str]] | None = None
) -> str | None:
    return next((reason for phase in phases if (reason := shortfall(phase, cluster, node_labels))), None)


def check_fits(
    phases: Sequence[Phase], cluster: dict[str, float], node_labels: list[dict[str, str]] | None = None
) -> None:
    reason = first_shortfall(phases, cluster, node_labels)
    if reason:
        raise ResourceError(reason)


@dataclass(frozen=True)
class AutoscalerReport:
    """The autoscaler's latest report in the GCS: when it was made and what it is starting."""

    time: float
    launching: dict[str, int]  # node type -> nodes being launched or set up
    failed: int

    def describe(self) -> str:
        starting = ", ".join(f"{count} {kind}" for kind, count in self.launching.items())
        failed = f"; {self.failed} failed to start" if self.failed else ""
        return (
            f"the autoscaler is starting {starting} node(s)" if starting else "the autoscaler is starting no node"
        ) + failed


def autoscaler_report() -> AutoscalerReport | None:
    """The report Ray's autoscaler (v1, as `ray up` and KubeRay run it) writes to the GCS on every update, or
    None when no autoscaler reports. (Autoscaler v2 does not write it; cluster.autoscaling=on covers that.)

    Starting nodes: launches not yet created, plus every node the autoscaler knows (node_type_mapping) that
    does not heartbeat yet -- a pod being scheduled, pulling its image, or running `ray start`.
    """
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return parse_autoscaler_status(json.loads(raw)) if raw else None


def parse_autoscaler_status(status: dict) -> AutoscalerReport:
    """The v1 autoscaler's status JSON (as `ray status` reads it) -> when it was made, what is starting."""
    report = status.get("autoscaler_report") or {}
    known = Counter((report.get("node_type_mapping") or {}).values())
    starting = Counter(report.get("pending_launches") or {}) + (known - Counter(report.get("active_nodes") or {}))
    return AutoscalerReport(float(status.get("time", 0.0)), dict(starting), len(report.get("failed_nodes") or []))


def alive_node_labels() -> list[dict[str, str]]:
    import ray

    return [dict(n.get("Labels") or {}) for n in ray.nodes() if n.get("Alive")]


@contextmanager
def held(phases: Sequence[Phase], autoscaling: str, wait_s: float) -> Iterator[None]:
    """Make sure the cluster holds every phase, for the duration of the block.

    autoscaling: "auto" (ask and wait when an autoscaler reports), "on" (always ask and wait), "off".
    """
    import ray

    reason = first_shortfall(phases, ray.cluster_resources(), alive_node_labels())
    if reason is None:
        yield
        return
    grows = autoscaling == "on" or (autoscaling == "auto" and autoscaler_report() is not None)
    if not grows:
        raise ResourceError(reason)
    from ray.autoscaler.sdk import request_resources

    groups = list({g.name: g for phase in phases for g in phase.groups}.values())  # a group in several phases, once
    bundles = [dict(g.bundle) for g in groups for _ in range(g.count)]
    selectors = [dict(g.labels) for g in groups for _ in range(g.count)]
    request_resources(bundles=bundles, bundle_label_selectors=selectors if any(selectors) else None)
    try:
        wait_for(phases, wait_s)
        yield
    finally:
        request_resources(bundles=[])  # withdrawn: the autoscaler may remove the nodes once they are idle


def wait_for(phases: Sequence[Phase], wait_s: float) -> None:
    """Wait until the cluster holds every phase; ResourceError when the autoscaler starts
    nothing for it, or at wait_s."""
    import ray

    started, last_line = time.monotonic(), float("-inf")
    first = autoscaler_report()  # reports newer than this one have seen the request (whatever the clocks say)
    idle_looks: set[float] = set()
    while True:
        reason = first_shortfall(phases, ray.cluster_resources(), alive_node_labels())
        if reason is None:
            log.info("the cluster holds the run after %.0f s of autoscaling", time.monotonic() - started)
            return
        waited = time.monotonic() - started
        report = autoscaler_report()
        if report is not None and (first is None or report.time > first.time):
            idle_looks = idle_looks | {report.time} if not report.launching else set()
            if len(idle_looks) >= IDLE_LOOKS:
                raise ResourceError(
                    f"the autoscaler starts no node for this run: {reason} (no node type offers it, or the node "
                    "types are at max_workers)"
                )
        starting = report.describe() if report else "no autoscaler report yet"
        if waited >= wait_s:
            raise ResourceError(
                f"waited {wait_s:g} s (cluster.wait_for_resources_s) and the cluster still cannot hold the run: "
                f"{reason}; {starting}"
            )
        if time.monotonic() - last_line >= PROGRESS_EVERY_S:
            log.info(
                "waiting for the autoscaler (%.0f s of %g): %s; %s", waited, wait_s, reason.split("; ", 1)[0], starting
            )
            last_line = time.monotonic()
        time.sleep(1.0)
