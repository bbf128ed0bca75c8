"""A small model and successive fine-tunes of it, with the exact diffs between them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffs.container import diff_bytes
from diffs.digest import model_digest
from diffs.make import make_exact
from diffs.model import Model, Tensor, save_model


@dataclass
class Lineage:
    files: list[Path]
    digests: list[str]
    diffs: list[bytes]
    """``diffs[i]`` turns version ``i`` into version ``i + 1``."""


def make_lineage(out: Path, versions: int, *, rows: int = 64, seed: int = 11) -> Lineage:
    rng = np.random.default_rng(seed)
    first = {
        "enc.weight": Tensor.of(rng.standard_normal((rows, 48)).astype(np.float32)),
        "enc.bias": Tensor.of(rng.standard_normal(rows).astype(np.float32)),
        "head.weight": Tensor.of(rng.standard_normal((16, rows)).astype(np.float16)),
    }
    return fine_tunes(out, first, versions, rng)


def fine_tunes(out: Path, first: Model, versions: int, rng: np.random.Generator) -> Lineage:
    """``first`` and ``versions - 1`` successors, each moving ~5% of the previous one's
    weights slightly; written to ``out/v{i}.safetensors``."""
    model = first
    files, digests, diffs = [], [], []
    for number in range(versions):
        if number:
            previous = model
            model = {}
            for name, tensor in previous.items():
                flat = tensor.array.reshape(-1).copy()
                chosen = rng.choice(flat.size, max(1, flat.size // 20), replace=False)
                flat[chosen] += (rng.standard_normal(chosen.size) * 0.01).astype(flat.dtype)
                model[name] = Tensor.of(flat.reshape(tensor.shape))
            diffs.append(diff_bytes(make_exact(previous, model)))
        path = out / f"v{number}.safetensors"
        save_model(path, model)
        files.append(path)
        digests.append(model_digest(model))
    return Lineage(files, digests, diffs)
