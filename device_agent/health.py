"""Health checks: the last gate before a staged model goes live.

A health check is any callable ``check(path)`` that raises
:class:`~device_agent.errors.HealthCheckError` when the model at ``path`` must not go
live (see :data:`device_agent.agent.HealthCheck`). The agent then keeps the running
model, reports ``health_check_failed`` and never tries that target digest again.

:class:`MaxAbsHealthCheck` is the simple one: it refuses a model with a float element
whose magnitude exceeds a bound (or that is NaN or infinite) -- what a diverged or
corrupted fine-tune looks like. The canary check (:mod:`device_agent.canary`: decode
the clips a release ships, bound the WER) runs after it, when a plan carries a canary,
and fails the same way.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from device_agent.errors import HealthCheckError
from diffs.dtypes import to_compute
from diffs.errors import DiffError
from diffs.model import ModelFile

BLOCK = 1 << 20
"""Elements checked at a time: memory stays bounded whatever the tensor's size."""


@dataclass(frozen=True)
class MaxAbsHealthCheck:
    """Refuse a model any of whose float elements has ``|value| > bound`` or is not finite."""

    bound: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bound) and self.bound >= 0):
            raise ValueError(f"the bound must be a finite number >= 0, not {self.bound}")

    def __call__(self, path: str | os.PathLike[str]) -> None:
        try:
            with ModelFile(path) as model:
                for name, info in model.infos.items():
                    if not info.dtype.is_float:
                        continue
                    flat = model.tensor(name).array.reshape(-1)
                    for start in range(0, flat.size, BLOCK):
                        values = np.abs(to_compute(flat[start : start + BLOCK], info.dtype))
                        bad = ~(values <= self.bound)  # NaN compares false: refused too
                        if bad.any():
                            index = start + int(np.argmax(bad))
                            value = float(values[index - start])
                            raise HealthCheckError(
                                f"tensor {name!r} element {index} has |value| {value:g}, "
                                f"above the bound {self.bound:g}"
                            )
        except DiffError as exc:
            raise HealthCheckError(f"the model cannot be read: {exc}") from exc
