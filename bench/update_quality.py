"""Update quality: five consecutive updates per method, at equal transmitted bytes.

Starting from the committed base checkpoint, each configuration teaches the five update
sets in turn (:mod:`asr.course`: every update's base is the model the previous *diff*
produced, with replay of old data):

- ``full``: full fine-tuning, the reference (shipped as an exact diff);
- ``sparse`` (iterative pruning), ``hashed`` and ``topk`` at ``--sizes`` percent of the
  fp32 model (default 1, 2, 5, 10), all with the same steps and data.

After every update it scores, with greedy decoding, the cumulative new-word test sets
and a slice of the original test set; after the last one, per cohort. It prints a table
per measure, the gap of every configuration to full fine-tuning after the last update,
and writes the figures with the machine they came from to JSON, with a PNG plot beside
it (``bench/results/update_quality.{json,png}``).

Run: ``make bench-quality`` (under an hour on 2 cores), or with ``--quick`` for a smoke
run of a few steps on a few utterances (what the tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(ROOT))

from bench.common import machine_info  # noqa: E402

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "update_quality.json"
DEFAULT_BASE = ROOT / "asr" / "checkpoints" / "base.safetensors"
DEFAULT_SIZES = (1.0, 2.0, 5.0, 10.0)
APPROXIMATE = ("sparse", "hashed", "topk")


def configurations(sizes: Sequence[float], methods: Sequence[str]) -> list[tuple[str, float]]:
    runs: list[tuple[str, float]] = [("full", 100.0)] if "full" in methods else []
    runs += [(m, s) for m in APPROXIMATE if m in methods for s in sizes]
    return runs


def label(method: str, size: float) -> str:
    return "full fine-tune" if method == "full" else f"{method} {size:g}%"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from asr.corpus import CorpusConfig, CorpusStore, generate
    from asr.course import Course, CourseConfig
    from asr.difftrain import DiffTrainConfig, Method
    from asr.model import load_checkpoint

    course_config = CourseConfig()
    corpus = CorpusConfig()
    train = DiffTrainConfig().train
    if args.quick:
        course_config = CourseConfig(
            updates=course_config.updates[:2],
            replay_base=24,
            train_limit=24,
            old_test=16,
            new_test=16,
        )
        corpus = replace(
            corpus, train_size=24, test_size=16, update_train_size=24, update_test_size=16
        )
        train = replace(train, steps=4, batch_seconds=6.0, warmup_steps=1, log_every=2)
    if args.steps:
        train = replace(train, steps=args.steps)
    store = CorpusStore.open(args.cache_dir, corpus)
    splits = course_config.splits()
    if any(store.missing_shards(s) for s in splits):
        print(f"synthesizing {', '.join(splits)} ...", flush=True)
        generate(store, splits, workers=2)
    base = load_checkpoint(args.base)
    course = Course(store, course_config)
    report: dict[str, Any] = {
        "benchmark": "update_quality",
        "machine": machine_info(),
        "base": str(args.base.relative_to(ROOT) if args.base.is_relative_to(ROOT) else args.base),
        "course": {
            "updates": list(course_config.updates),
            "replay_base": course_config.replay_base,
            "old_test_utterances": len(course.old_test),
            "new_test_utterances": {k: len(v) for k, v in course.test.items()},
            "train_utterances": {k: len(v) for k, v in course.train.items()},
        },
        "train": train.to_json(),
        "decoding": "greedy",
        "quick": bool(args.quick),
        "runs": [],
    }
    for method, size in configurations(args.sizes, args.methods):
        config = DiffTrainConfig(method=Method(method), budget=size / 100, train=train)
        name = label(method, size)
        print(f"== {name}", flush=True)
        started = time.monotonic()
        records = course.run(base, config, log=lambda line: print(f"   {line}", flush=True))
        report["runs"].append(
            {
                "label": name,
                "method": method,
                "size_percent": size,
                "seconds": time.monotonic() - started,
                "updates": [r.to_json() for r in records],
            }
        )
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")  # partial results
    return report


def summarize(report: dict[str, Any]) -> str:
    runs = report["runs"]
    n = len(report["course"]["updates"])
    head = "".join(f"{'u' + str(i + 1):>8}" for i in range(n))
    lines = []
    for title, key in (
        ("diff bytes, % of the fp32 model", "fraction"),
        ("WER on the new-word test sets so far (cumulative)", "new_word_wer"),
        ("WER on the original test set", "old_wer"),
    ):
        lines += ["", title, f"{'configuration':<18}{head}"]
        for r in runs:
            cells = "".join(f"{100 * u[key]:8.2f}" for u in r["updates"])
            lines.append(f"{r['label']:<18}{cells}")
    full = next((r for r in runs if r["method"] == "full"), None)
    lines += [
        "",
        f"after update {n}: WER (and gap to full fine-tuning, points) and wall time",
        f"{'configuration':<18}{'new words':>18}{'original':>18}{'minutes':>9}",
    ]
    for r in runs:
        last = r["updates"][-1]
        cells = ""
        for key in ("new_word_wer", "old_wer"):
            gap = "" if full is None else f" ({100 * (last[key] - full['updates'][-1][key]):+.2f})"
            cells += f"{100 * last[key]:>9.2f}{gap:>9}"
        lines.append(f"{r['label']:<18}{cells}{r['seconds'] / 60:9.1f}")
    if runs:
        cohorts = sorted(runs[0]["updates"][-1]["new_word_cohorts"])
        lines += ["", f"per cohort after update {n}: new-word WER / original WER"]
        lines.append(f"{'configuration':<18}" + "".join(f"{c[:13]:>14}" for c in cohorts))
        for r in runs:
            last = r["updates"][-1]
            new, old = last["new_word_cohorts"], last["old_cohorts"]
            cells = "".join(f"{100 * new[c]:6.1f}/{100 * old.get(c, 0):<6.1f}  " for c in cohorts)
            lines.append(f"{r['label']:<18}{cells}")
    machine = report["machine"]
    lines += ["", f"machine: {machine['cpu_model']}, {machine['cpus_allowed']} cores"]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    styles = {"full": "-", "sparse": "-", "hashed": "--", "topk": ":"}
    for r in report["runs"]:
        xs = [u["index"] for u in r["updates"]]
        for ax, key in zip(axes, ("new_word_wer", "old_wer"), strict=True):
            ax.plot(
                xs,
                [100 * u[key] for u in r["updates"]],
                styles[r["method"]],
                marker="o",
                markersize=3,
                linewidth=2.5 if r["method"] == "full" else 1.2,
                color="black" if r["method"] == "full" else None,
                label=r["label"],
            )
    axes[0].set_title("new words (cumulative test sets)")
    axes[1].set_title("original test set")
    updates = range(1, len(report["course"]["updates"]) + 1)
    for ax in axes:
        ax.set_xticks(list(updates))
        ax.set_xlabel("update")
        ax.set_ylabel("WER % (greedy)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("Five consecutive updates at equal diff sizes (% of the fp32 model)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="base checkpoint")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON to write")
    parser.add_argument(
        "--sizes", type=float, nargs="+", default=DEFAULT_SIZES, help="diff sizes, % of model"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["full", *APPROXIMATE],
        choices=["full", *APPROXIMATE],
        help="methods to run",
    )
    parser.add_argument("--steps", type=int, help="training steps per update")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "asr-corpus")
    parser.add_argument("--quick", action="store_true", help="a smoke run (tests)")
    args = parser.parse_args(argv)
    if not args.base.exists():
        parser.error(f"{args.base} does not exist: run `make train-base` first")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.output.with_suffix(".png"))
    print(summarize(report))
    print(f"\nwrote {args.output} and {args.output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
