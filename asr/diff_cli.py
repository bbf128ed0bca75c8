"""``diffcast diff train``: teach a checkpoint an update set's words, as a diff file.

Mounted into ``diffcast diff`` through the ``diffcast.diff_commands`` entry points, so
the pure ``diffs`` package never imports ``asr``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from asr.cli import CacheDir, ExistingFile, Seed, Workers, _corpus_config, _progress, _run, err, out
from asr.corpus import UPDATE_SETS, CorpusStore, generate
from diffs.fileio import atomic_output


class MethodName(StrEnum):
    """:class:`asr.difftrain.Method`, without importing torch before a command runs."""

    full = "full"
    sparse = "sparse"
    hashed = "hashed"
    topk = "topk"


_METHOD_HELP = (
    "sparse: train a delta, pruned iteratively to the budget; hashed: train bucket values "
    "through a fixed hash map; topk: fine-tune, keep the largest deltas, retrain them; "
    "full: fine-tune every weight (an exact diff, for reference)"
)


def train(
    base: ExistingFile,
    update: Annotated[
        str, typer.Option(help="Update set to teach (`diffcast asr updates` lists them).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", dir_okay=False, help="Diff file.")],
    method: Annotated[MethodName, typer.Option(help=_METHOD_HELP)] = MethodName.sparse,
    budget: Annotated[
        str, typer.Option(help="Encoded diff size: '2%' of the fp32 model, or '120KB'.")
    ] = "2%",
    previous: Annotated[
        list[str] | None,
        typer.Option(help="Update sets the base already learned; replayed (repeatable)."),
    ] = None,
    model_out: Annotated[
        Path | None,
        typer.Option("--model-out", dir_okay=False, help="Also write the updated checkpoint."),
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Training steps.")] = None,
    replay: Annotated[
        float, typer.Option(min=0.0, max=0.9, help="Share of each epoch that is old data.")
    ] = 0.5,
    ewc: Annotated[float, typer.Option(min=0.0, help="EWC penalty weight (0: off).")] = 0.0,
    delta_lr: Annotated[
        float | None,
        typer.Option(
            min=1e-6,
            help="Peak learning rate of the trained deltas or bucket values "
            "(default: 3e-3 up to a 2% budget, halving by 10%).",
        ),
    ] = None,
    fisher: Annotated[
        bool, typer.Option(help="topk: rank deltas by |delta| x Fisher, not |delta|.")
    ] = False,
    train_limit: Annotated[
        int | None, typer.Option(min=1, help="Use at most N training utterances of the set.")
    ] = None,
    replay_base: Annotated[
        int, typer.Option(min=1, help="Base training utterances in the replay pool.")
    ] = 4_000,
    evaluate: Annotated[
        bool, typer.Option(help="Score WER before and after on the set's test clips.")
    ] = True,
    test_limit: Annotated[
        int, typer.Option(min=1, help="Score at most N clips of each test set.")
    ] = 480,
    cache_dir: CacheDir = Path(".cache/asr-corpus"),
    seed: Seed = 20_240_726,
    workers: Workers = 2,
) -> None:
    """Train an update of BASE that teaches one update set's new words; write it as a diff."""
    from asr.course import score
    from asr.difftrain import DiffTrainConfig, Method, model_bytes, train_diff
    from asr.metrics import ALL
    from asr.model import load_checkpoint, save_checkpoint
    from asr.train import TrainData
    from diffs.cli.diff_commands import parse_budget
    from diffs.container import write_diff

    known = {u.name for u in UPDATE_SETS}
    for name in [update, *(previous or [])]:
        if name not in known:
            raise typer.BadParameter(f"unknown update set {name!r}; known: {sorted(known)}")

    def action() -> None:
        model = load_checkpoint(base)
        fraction = parse_budget(budget, model_bytes(model)) / model_bytes(model)
        config = DiffTrainConfig(
            method=Method(method.value), budget=min(1.0, fraction), ewc=ewc, delta_lr=delta_lr
        )
        config = replace(
            config,
            fisher_weighted=fisher,
            train=replace(
                config.train,
                replay_fraction=replay,
                steps=steps or config.train.steps,
            ),
        )
        # Utterance i does not depend on the split sizes: synthesize only what is used.
        defaults = _corpus_config(seed)
        corpus = replace(
            defaults,
            train_size=min(replay_base, defaults.train_size),
            test_size=min(test_limit, defaults.test_size),
            update_train_size=min(
                train_limit or defaults.update_train_size, defaults.update_train_size
            ),
            update_test_size=min(test_limit, defaults.update_test_size),
        )
        splits = ["base/train", "base/test", f"{update}/train", f"{update}/test"]
        splits += [f"{p}/train" for p in previous or []]
        store = CorpusStore.open(cache_dir, corpus)
        if any(store.missing_shards(s) for s in splits):
            with _progress("synthesizing") as progress:
                generate(store, splits, workers=workers, on_progress=progress)
        old = store.load("base/train")
        for name in previous or []:
            old += store.load(f"{name}/train")
        data = TrainData(store.load(f"{update}/train"), old)
        tests = {"new words": store.load(f"{update}/test"), "old": store.load("base/test")}
        before = {k: score(model, v)[ALL].wer for k, v in tests.items()} if evaluate else {}
        result = train_diff(model, data, config, log=err.print)
        write_diff(output, result.diff)
        out.print(
            f"wrote {output}: {result.diff_bytes:,} bytes ({result.fraction:.2%} of the fp32 "
            f"model), {method.value}, {result.kept:,} kept; {result.seconds:.0f} s"
        )
        out.print(f"{result.diff.base_digest} -> {result.diff.target_digest}")
        if model_out is not None:
            save_checkpoint(result.model, model_out, extra={"diff": result.to_json()})
            out.print(f"wrote {model_out}")
        if evaluate:
            after = {k: score(result.model, v)[ALL].wer for k, v in tests.items()}
            table = Table("test set", "WER before", "WER after (greedy)")
            for key in tests:
                table.add_row(key, f"{before[key]:.2%}", f"{after[key]:.2%}")
            out.print(table)
        record = {
            "update": update,
            "previous": previous or [],
            **result.to_json(),
            "config": config.to_json(),
        }
        with atomic_output(output.with_name(output.name + ".json")) as sidecar:
            sidecar.write(json.dumps(record, indent=2).encode() + b"\n")

    _run(action)
