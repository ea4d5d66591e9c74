"""Joining the Ray cluster, and where work that needs weights may run: a custom resource per weights, and GPUs.

A node that holds a model's weights is started with the resource ``weights-<name>`` (``ray start
--resources '{"weights-smollm2-135m": 1}'``); model workers and jobs on those weights ask for a
small share of it, so Ray places them only there, and for ``num_gpus`` when they run on CUDA.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

from airlock.config import Settings

__all__ = ["Placement", "connect", "placement_of", "weights_resource"]

#: The share of a node's ``weights-*`` resource one worker or job takes: a label, not a count.
WEIGHTS_SHARE = 0.001
_connect_lock = threading.Lock()


def weights_resource(model: str) -> str:
    """Return the Ray resource naming the weights ``model`` (a weights spec: ``smollm2-135m``, a path)."""
    name = model.rstrip("/").rsplit("/", 1)[-1] if "/" in model else model
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower()
    return "weights-" + (slug or "model")


@dataclass(frozen=True)
class Placement:
    """What a Ray actor or task on some weights asks for: the weights' resource, GPUs, CPUs."""

    resource: str
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    extra: dict[str, float] = field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        """Return the keyword arguments of ``.options(...)`` for this placement."""
        return {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "resources": {self.resource: WEIGHTS_SHARE, **self.extra},
        }


def placement_of(config: dict[str, Any], *, num_cpus: float = 1.0) -> Placement:
    """Return the placement of work on a local backend's ``config`` (its ``model``, ``device``, ``num_gpus``)."""
    from airlock.backends.weights import DEFAULT_MODEL_SPEC

    model = str(config.get("model") or DEFAULT_MODEL_SPEC)
    device = str(config.get("device") or "cpu")
    gpus = config.get("num_gpus")
    if gpus is None:
        gpus = 1 if device.startswith("cuda") else 0
    return Placement(resource=weights_resource(model), num_gpus=float(gpus), num_cpus=num_cpus)


def connect(settings: Settings) -> None:
    """Join the Ray cluster at ``AIRLOCK_RAY_ADDRESS`` once per process (a local one when unset)."""
    import ray

    with _connect_lock:
        if ray.is_initialized():
            return
        ray.init(
            address=settings.ray_address,
            namespace=settings.ray_namespace,
            log_to_driver=False,
            configure_logging=False,
        )
