"""``diffcast asr``: synthesize the corpus, train the base model, transcribe, evaluate."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

# With more threads than free cores, OpenMP's busy-waiting makes torch several times
# slower; waiting passively costs nothing when the cores are free. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from asr import ASRError
from asr.corpus import (
    DEFAULT_CACHE_DIR,
    SAMPLE_RATE,
    UPDATE_SETS,
    CorpusConfig,
    CorpusStore,
    generate,
    lexicon_for,
    read_wav,
    resample,
    speakers,
    split_variants,
)

app = typer.Typer(
    help="The reference ASR model: corpus, base training, transcription, evaluation.",
    no_args_is_help=True,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")

DEFAULT_CHECKPOINT = Path("asr/checkpoints/base.safetensors")
ExistingFile = Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)]
CacheDir = Annotated[
    Path, typer.Option("--cache-dir", help="Corpus cache directory.", file_okay=False)
]
Seed = Annotated[int, typer.Option(help="Corpus seed.")]
Workers = Annotated[int, typer.Option(min=1, help="Synthesis processes.")]
Words = Annotated[
    list[str] | None,
    typer.Option("--words", help="Add an update set's new words to the lexicon (repeatable)."),
]


class Decoder(StrEnum):
    greedy = "greedy"
    lexicon = "lexicon"
    both = "both"


def _run(action: Callable[[], T]) -> T:
    """Run ``action``; turn the package's errors into a message and exit code 2."""
    try:
        return action()
    except ASRError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    except OSError as exc:
        err.print(f"[red]error:[/red] {exc.filename or ''}: {exc.strerror}")
        raise typer.Exit(2) from None


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int], None]]:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def _corpus_config(seed: int, train_size: int = CorpusConfig.train_size) -> CorpusConfig:
    return CorpusConfig(seed=seed, train_size=train_size)


@app.command()
def corpus(
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    seed: Seed = CorpusConfig.seed,
    train_size: Annotated[int, typer.Option(min=1)] = CorpusConfig.train_size,
    split: Annotated[
        list[str] | None, typer.Option(help="Only this split, e.g. base/test (repeatable).")
    ] = None,
    workers: Workers = 2,
) -> None:
    """Synthesize (or finish synthesizing) the corpus; what is cached is kept."""
    config = _corpus_config(seed, train_size)

    def action() -> None:
        store = CorpusStore.open(cache_dir, config)
        splits = split or config.splits()
        with _progress("synthesizing") as update:
            made = generate(store, splits, workers=workers, on_progress=update)
        out.print(f"{made} utterances synthesized; corpus at {store.root}")
        table = Table("split", "utterances", "voices (accent x variant)")
        for name in splits:
            table.add_row(name, str(config.size(name)), str(len(speakers(split_variants(name)))))
        out.print(table)

    _run(action)


@app.command("train-base")
def train_base_command(
    out_path: Annotated[Path, typer.Option("--out", dir_okay=False)] = DEFAULT_CHECKPOINT,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    seed: Seed = CorpusConfig.seed,
    train_size: Annotated[int, typer.Option(min=1)] = CorpusConfig.train_size,
    steps: Annotated[int | None, typer.Option(min=1, help="Training steps.")] = None,
    train_seed: Annotated[int | None, typer.Option(help="Training seed.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the saved training state.")] = False,
    workers: Workers = 2,
) -> None:
    """Train the base checkpoint deterministically (2 threads) and write it with its JSON."""
    from asr.train import BASE_TRAINING_SPLITS, BaseRecipe, TrainConfig, train_base

    train = TrainConfig()
    if steps is not None:
        train = replace(train, steps=steps)
    if train_seed is not None:
        train = replace(train, seed=train_seed)
    recipe = BaseRecipe(corpus=_corpus_config(seed, train_size), train=train)

    def action() -> None:
        store = CorpusStore.open(cache_dir, recipe.corpus)
        if any(store.missing_shards(s) for s in BASE_TRAINING_SPLITS):
            with _progress("synthesizing") as update:
                generate(store, BASE_TRAINING_SPLITS, workers=workers, on_progress=update)
        result = train_base(
            recipe, out_path, cache_dir, workers=workers, resume=resume, log=err.print
        )
        out.print(
            f"best dev WER {result.best_dev_wer:.2%} (greedy) at step {result.best_step}; "
            f"{result.seconds / 60:.1f} min"
        )

    _run(action)


def _load_clip(path: Path) -> np.ndarray[Any, np.dtype[np.int16]]:
    rate, pcm = read_wav(path)
    if rate == SAMPLE_RATE:
        return pcm
    audio = resample(pcm.astype(np.float64) / 32768.0, rate, SAMPLE_RATE)
    return np.asarray(np.clip(np.round(audio * 32767), -32768, 32767), dtype=np.int16)


@app.command()
def transcribe(
    model_path: ExistingFile,
    clips: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, readable=True)],
    decoder: Annotated[Decoder, typer.Option(help="Decoding.")] = Decoder.lexicon,
    words: Words = None,
) -> None:
    """Print the transcript of each WAV clip (mono 16-bit; other rates are resampled)."""
    from asr.decode import Lexicon, greedy_decode, lexicon_decode
    from asr.model import load_checkpoint, log_probs

    def action() -> None:
        model = load_checkpoint(model_path)
        lexicon = Lexicon(lexicon_for(words or []))
        outputs = log_probs(model, [_load_clip(c) for c in clips])
        for clip, lp in zip(clips, outputs, strict=True):
            texts = []
            if decoder in (Decoder.greedy, Decoder.both):
                texts.append(greedy_decode(lp, model.config.alphabet))
            if decoder in (Decoder.lexicon, Decoder.both):
                texts.append(lexicon_decode(lp, model.config.alphabet, lexicon))
            prefix = f"{clip}\t" if len(clips) > 1 else ""
            for text in texts:
                out.print(f"{prefix}{text}", markup=False)

    _run(action)


def _evaluate_split(
    model: Any,
    store: CorpusStore,
    split: str,
    decoders: Sequence[str],
    words: Sequence[str],
    limit: int | None,
) -> dict[str, Any]:
    from asr.corpus import update_set
    from asr.decode import Lexicon, greedy_decode, lexicon_decode
    from asr.metrics import error_rates_by, word_recall
    from asr.model import log_probs

    utterances = store.load(split)[:limit]
    group = split.split("/", maxsplit=1)[0]
    names = list(words) + ([group] if group != "base" and group not in words else [])
    lexicon = Lexicon(lexicon_for(names))
    outputs = log_probs(model, [u.audio for u in utterances])
    references = [u.text for u in utterances]
    cohorts = [u.spec.cohort for u in utterances]
    report: dict[str, Any] = {
        "split": split,
        "utterances": len(utterances),
        "lexicon_updates": names,
    }
    for decoder in decoders:
        if decoder == "greedy":
            hyps = [greedy_decode(lp, model.config.alphabet) for lp in outputs]
        else:
            hyps = [lexicon_decode(lp, model.config.alphabet, lexicon) for lp in outputs]
        rates = error_rates_by(references, hyps, cohorts)
        entry: dict[str, Any] = {"cohorts": {k: v.to_json() for k, v in rates.items()}}
        if group != "base":
            entry["new_word_recall"] = word_recall(references, hyps, update_set(group).new_words)
        report[decoder] = entry
    return report


@app.command("eval")
def evaluate(
    model_path: ExistingFile,
    split: Annotated[
        list[str] | None, typer.Option(help="Split to score, e.g. base/test (repeatable).")
    ] = None,
    decoder: Annotated[Decoder, typer.Option(help="Decoding.")] = Decoder.both,
    words: Words = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Score the first N only.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", dir_okay=False)] = None,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    seed: Seed = CorpusConfig.seed,
    workers: Workers = 2,
) -> None:
    """WER and CER per cohort on held-out voices (synthesizing the split if needed).

    For an update split (``swimmers/test``) the lexicon also holds that update's words.
    """
    from asr.metrics import ALL
    from asr.model import load_checkpoint

    splits = split or ["base/test"]
    decoders = ["greedy", "lexicon"] if decoder is Decoder.both else [decoder.value]

    config = _corpus_config(seed)
    if limit is not None:
        # Utterance i does not depend on the split sizes: synthesize only what is scored.
        config = replace(
            config,
            dev_size=min(limit, config.dev_size),
            test_size=min(limit, config.test_size),
            train_size=min(limit, config.train_size),
            update_train_size=min(limit, config.update_train_size),
            update_test_size=min(limit, config.update_test_size),
        )

    def action() -> None:
        model = load_checkpoint(model_path)
        store = CorpusStore.open(cache_dir, config)
        if any(store.missing_shards(s) for s in splits):
            with _progress("synthesizing") as update:
                generate(store, splits, workers=workers, on_progress=update)
        reports = []
        for name in splits:
            report = _evaluate_split(model, store, name, decoders, words or [], limit)
            reports.append(report)
            table = Table(title=f"{name}: {report['utterances']} utterances")
            table.add_column("cohort")
            for d in decoders:
                table.add_column(f"WER {d}", justify="right")
                table.add_column(f"CER {d}", justify="right")
            for cohort in report[decoders[0]]["cohorts"]:
                cells = []
                for d in decoders:
                    rates = report[d]["cohorts"][cohort]
                    cells += [f"{rates['wer']:.2%}", f"{rates['cer']:.2%}"]
                style = "bold" if cohort == ALL else None
                table.add_row(cohort, *cells, style=style)
            out.print(table)
            for d in decoders:
                if "new_word_recall" in report[d]:
                    out.print(f"new-word recall ({d}): {report[d]['new_word_recall']:.2%}")
        if json_out is not None:
            json_out.write_text(json.dumps(reports, indent=2) + "\n")

    _run(action)


@app.command("canary")
def canary(
    out_path: Annotated[Path, typer.Option("--out", "-o", dir_okay=False, help="Bundle to write.")],
    max_wer: Annotated[
        float, typer.Option(min=0.0, help="Refuse a model whose WER on the clips is above this.")
    ],
    split: Annotated[str, typer.Option(help="Corpus split the clips come from.")] = "base/test",
    count: Annotated[int, typer.Option(min=1, help="Number of clips (the split's first N).")] = 8,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="A checkpoint of the model family the canary is for (its JSON config is "
            "read); default: the reference model's configuration.",
        ),
    ] = None,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    seed: Seed = CorpusConfig.seed,
    workers: Workers = 2,
) -> None:
    """Write a canary bundle: corpus clips, their transcripts and a WER bound, for a
    release (`diffcast release canary`); devices refuse a model that does worse."""
    from asr.canary import build_canary, corpus_clips
    from asr.model import ModelConfig, read_config
    from diffs.errors import CanaryFormatError

    config = _corpus_config(seed)
    # Utterance i does not depend on the split sizes: synthesize only the clips taken.
    config = replace(
        config,
        dev_size=min(count, config.dev_size),
        test_size=min(count, config.test_size),
        train_size=min(count, config.train_size),
        update_train_size=min(count, config.update_train_size),
        update_test_size=min(count, config.update_test_size),
    )

    def action() -> None:
        model_config = read_config(checkpoint) if checkpoint is not None else ModelConfig()
        store = CorpusStore.open(cache_dir, config)
        if store.missing_shards(split):
            with _progress("synthesizing") as update:
                generate(store, [split], workers=workers, on_progress=update)
        try:
            bundle = build_canary(
                out_path, corpus_clips(store, split, count), max_wer, model_config
            )
        except CanaryFormatError as exc:
            raise ASRError(str(exc)) from None
        out.print(
            f"{out_path}: {len(bundle.clips)} clips of {split} ({bundle.seconds:.1f} s, "
            f"{bundle.words} words), WER bound {bundle.max_wer:g}"
        )

    _run(action)


@app.command("updates")
def list_updates() -> None:
    """List the update sets and their new words."""
    table = Table("update set", "description", "new words")
    for update in UPDATE_SETS:
        table.add_row(update.name, update.description, " ".join(update.new_words))
    out.print(table)
