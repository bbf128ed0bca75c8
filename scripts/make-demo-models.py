"""Write a small speech-model-shaped float32 model and three fine-tunes of it.

Each fine-tune changes 3% of the weights by small amounts, as a sparse neural diff would.
Usage: make-demo-models.py OUTDIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from diffs.model import Tensor, save_model

SHAPES = {
    "frontend.conv.weight": (256, 80, 3),
    "encoder.0.rnn.weight_ih": (768, 256),
    "encoder.0.rnn.weight_hh": (768, 256),
    "encoder.1.rnn.weight_ih": (768, 256),
    "encoder.1.rnn.weight_hh": (768, 256),
    "head.weight": (32, 256),
    "head.bias": (32,),
}


def main() -> None:
    out = Path(sys.argv[1])
    rng = np.random.default_rng(7)
    model = {
        n: Tensor.of((rng.standard_normal(s) * 0.05).astype(np.float32)) for n, s in SHAPES.items()
    }
    save_model(out / "v0.safetensors", model)
    for version in (1, 2, 3):
        updated = {}
        for name, tensor in model.items():
            flat = tensor.array.reshape(-1).copy()
            chosen = rng.choice(flat.size, max(1, flat.size * 3 // 100), replace=False)
            flat[chosen] += (rng.standard_normal(chosen.size) * 1e-3).astype(np.float32)
            updated[name] = Tensor.of(flat.reshape(tensor.shape))
        model = updated
        save_model(out / f"v{version}.safetensors", model)


if __name__ == "__main__":
    main()
