"""Weight-noise injection: Gaussian noise added to a model's weights, reproducible from a seed.

Noise injection (Tice et al. 2024) probes for sandbagging: adding ``N(0, sigma^2)`` to every
weight degrades an honest model's scores, but can break a mechanism that suppresses a capability
before it breaks the capability, so a *rise* in score under noise is a warning sign. The noise is
a pure function of ``(sigma, seed)`` and the parameter order, so a noised variant never needs to
be stored: it is rebuilt from the private weights on load and the weights never leave the lab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["NoiseSpec", "add_weight_noise"]

MAX_SIGMA = 1.0


@dataclass(frozen=True)
class NoiseSpec:
    """One noised variant: the standard deviation of the added noise and the seed that draws it."""

    sigma: float
    seed: int

    def __post_init__(self) -> None:
        if not math.isfinite(self.sigma) or not 0.0 <= self.sigma <= MAX_SIGMA:
            raise ValueError(f"sigma must be a finite number in [0, {MAX_SIGMA}]")
        if not 0 <= self.seed < 2**63:
            raise ValueError("seed must be in [0, 2^63)")

    def as_dict(self) -> dict[str, Any]:
        """Return the noise parameters as recorded in provenance and attestations."""
        return {"sigma": self.sigma, "seed": self.seed, "distribution": "gaussian", "scope": "all parameters"}


def add_weight_noise(module: Any, spec: NoiseSpec) -> int:
    """Add ``N(0, sigma^2)`` noise to every floating-point parameter of a torch module in place; return the count.

    Each parameter draws from its own generator seeded by ``(seed, parameter index)``, so the
    noise does not depend on the device or on how many parameters came before on another device.
    """
    import torch

    touched = 0
    with torch.no_grad():
        for index, (_name, param) in enumerate(sorted(module.named_parameters(), key=lambda item: item[0])):
            if not param.is_floating_point() or spec.sigma == 0.0:
                continue
            generator = torch.Generator(device="cpu").manual_seed((spec.seed * 1_000_003 + index) % 2**63)
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * spec.sigma
            param.add_(noise.to(device=param.device, dtype=param.dtype))
            touched += param.numel()
    return touched
