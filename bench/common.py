"""What the benchmarks share: the machine they ran on, and a speech-model-shaped layout."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

LAYERS = 4
VOCAB = 32


def machine_info() -> dict[str, Any]:
    """The machine a result was measured on (CPU, cores, memory, versions, load, date)."""
    import zstandard

    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "page_size": os.sysconf("SC_PAGE_SIZE"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "zstandard": zstandard.__version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_average_at_start": os.getloadavg(),
    }


def model_shapes(n_params: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a small speech encoder with exactly ``n_params`` elements.

    ``LAYERS`` blocks of attention (in: 3d x d, out: d x d), feed-forward (4d x d, d x 4d)
    and a norm (d), a CTC head (VOCAB x d); the front-end projection (rows x d) takes the
    rest, and a final norm vector the last ``< d`` elements.
    """
    d = max(8, int(math.sqrt(n_params / (12 * LAYERS + 2))) // 8 * 8)
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for layer in range(LAYERS):
        prefix = f"encoder.layers.{layer}"
        shapes += [
            (f"{prefix}.attn.in_proj.weight", (3 * d, d)),
            (f"{prefix}.attn.out_proj.weight", (d, d)),
            (f"{prefix}.ff.in.weight", (4 * d, d)),
            (f"{prefix}.ff.out.weight", (d, 4 * d)),
            (f"{prefix}.norm.weight", (d,)),
        ]
    shapes.append(("ctc_head.weight", (VOCAB, d)))
    used = sum(math.prod(s) for _, s in shapes)
    if used > n_params:
        raise ValueError(f"{n_params} parameters are too few for this model layout")
    rest = n_params - used
    if rest >= d:
        shapes.append(("encoder.frontend.weight", (rest // d, d)))
    if rest % d:
        shapes.append(("encoder.final_norm.weight", (rest % d,)))
    return shapes
