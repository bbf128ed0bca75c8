"""Deterministic CTC training on the CPU, and the recipe that makes the base checkpoint.

Determinism: :func:`set_determinism` seeds torch, turns on
``torch.use_deterministic_algorithms`` and fixes the thread count (float sums depend on
how work is split, so the same seed gives the same weights only with the same number of
threads). Nothing else draws randomness implicitly:

- the batches of epoch ``e`` come from a generator seeded with ``(seed, e)``: utterances
  are shuffled, sorted by length within pools, cut into batches of at most
  ``batch_seconds`` of padded audio, and the batches shuffled;
- SpecAugment at step ``s`` draws from a generator seeded with ``(seed, s)``;
- replay (old data mixed into new) samples per epoch from the same epoch generator.

So a run resumed from a training state (:meth:`Trainer.save_state`) continues exactly
as if it had never stopped. SpecAugment here is: a random stretch of the mel axis (a
vocal-tract-length perturbation, which is what tells espeak voices apart), then
frequency masks and time masks on the normalized features.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from asr.corpus import (
    DEFAULT_CACHE_DIR,
    SAMPLE_RATE,
    CorpusConfig,
    CorpusStore,
    Utterance,
    generate,
)
from asr.decode import greedy_decode
from asr.metrics import error_rates
from asr.model import CTCModel, ModelConfig, log_probs, pad_batch, save_checkpoint
from diffs.fileio import atomic_output

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1
    steps: int = 6_000
    batch_seconds: float = 60.0
    """Padded audio per batch, in seconds."""
    peak_lr: float = 3e-3
    warmup_steps: int = 500
    final_lr_ratio: float = 0.02
    """The cosine decay ends at ``peak_lr * final_lr_ratio``."""
    weight_decay: float = 0.01
    grad_clip: float = 5.0
    mel_warp: float = 0.12
    """Stretch the mel axis by a factor drawn from ``[1 - w, 1 + w]`` (0 = off)."""
    freq_masks: int = 2
    freq_mask_width: int = 12
    time_masks: int = 2
    time_mask_width: int = 20
    """Feature frames (10 ms); a mask also covers at most 10% of the utterance."""
    replay_fraction: float = 0.0
    """Share of each epoch drawn from the replay set (old data), when one is given."""
    eval_every: int = 500
    eval_utterances: int = 480
    log_every: int = 50
    threads: int = 2
    norm_utterances: int = 400

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def set_determinism(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + key) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``final_lr_ratio`` of the peak."""
    if step < config.warmup_steps:
        return config.peak_lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.final_lr_ratio
    return config.peak_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def plan_epoch(
    lengths: Sequence[int],
    batch_samples: int,
    generator: torch.Generator,
    pool: int = 4096,
) -> list[list[int]]:
    """Batches of indices: shuffled, length-sorted within pools, batches shuffled."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: (lengths[i], i))
        batch: list[int] = []
        for index in chunk:
            if batch and lengths[index] * (len(batch) + 1) > batch_samples:
                batches.append(batch)
                batch = []
            batch.append(index)
        if batch:
            batches.append(batch)
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


@dataclass
class TrainData:
    """What to train on: new utterances, and optionally old ones to replay."""

    utterances: Sequence[Utterance]
    replay: Sequence[Utterance] = field(default_factory=list)

    def epoch(self, seed: int, epoch: int, config: TrainConfig) -> list[list[Utterance]]:
        generator = _generator(seed, 7919, epoch)
        pool = list(self.utterances)
        if self.replay and config.replay_fraction > 0:
            share = config.replay_fraction / (1.0 - config.replay_fraction)
            count = min(len(self.replay), round(len(pool) * share))
            picks = torch.randperm(len(self.replay), generator=generator)[:count].tolist()
            pool += [self.replay[i] for i in sorted(picks)]
        samples = int(config.batch_seconds * SAMPLE_RATE)
        batches = plan_epoch([len(u.audio) for u in pool], samples, generator)
        return [[pool[i] for i in batch] for batch in batches]


def spec_augment(
    feats: torch.Tensor, frames: torch.Tensor, config: TrainConfig, generator: torch.Generator
) -> torch.Tensor:
    """Mel-axis stretch, frequency masks and time masks on ``(B, T, n_mels)`` features."""
    batch, length, bins = feats.shape
    out = feats
    if config.mel_warp > 0:
        factor = 1 + (torch.rand(batch, 1, generator=generator) * 2 - 1) * config.mel_warp
        source = (torch.arange(bins, dtype=torch.float32)[None, :] / factor).clamp(0, bins - 1)
        low = source.floor().long()
        high = (low + 1).clamp(max=bins - 1)
        weight = (source - low)[:, None, :]
        gather_low = torch.gather(out, 2, low[:, None, :].expand(batch, length, bins))
        gather_high = torch.gather(out, 2, high[:, None, :].expand(batch, length, bins))
        out = gather_low * (1 - weight) + gather_high * weight
    keep = torch.ones_like(out)
    for row in range(batch):
        for _ in range(config.freq_masks):
            width = int(torch.randint(0, config.freq_mask_width + 1, (1,), generator=generator))
            start = int(torch.randint(0, bins - width + 1, (1,), generator=generator))
            keep[row, :, start : start + width] = 0
        valid = int(frames[row])
        for _ in range(config.time_masks):
            limit = min(config.time_mask_width, valid // 10)
            width = int(torch.randint(0, limit + 1, (1,), generator=generator))
            start = int(torch.randint(0, max(1, valid - width + 1), (1,), generator=generator))
            keep[row, start : start + width, :] = 0
    return out * keep


def ctc_loss(
    logits: torch.Tensor, lengths: torch.Tensor, texts: Sequence[str], alphabet: str
) -> torch.Tensor:
    """CTC loss of ``(batch, frames, classes)`` logits against ``texts``, per target
    character (blank = 0; impossible alignments count zero rather than infinity)."""
    targets, target_lengths = encode_texts(texts, alphabet)
    return F.ctc_loss(
        logits.log_softmax(-1).transpose(0, 1),
        targets,
        lengths,
        target_lengths,
        blank=0,
        reduction="sum",
        zero_infinity=True,
    ) / max(1, int(target_lengths.sum()))


def encode_texts(texts: Sequence[str], alphabet: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated token ids and their lengths (the CTC target format)."""
    ids = [[alphabet.index(c) + 1 for c in text] for text in texts]
    flat = torch.tensor([t for row in ids for t in row], dtype=torch.int64)
    return flat, torch.tensor([len(row) for row in ids], dtype=torch.int64)


@torch.no_grad()
def feature_statistics(model: CTCModel, clips: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bin mean and standard deviation of the log-mel features of ``clips``."""
    total = torch.zeros(model.config.features.n_mels, dtype=torch.float64)
    square = torch.zeros_like(total)
    count = 0
    for start in range(0, len(clips), 32):
        audio, lengths = pad_batch(clips[start : start + 32])
        feats = model.logmel(audio).double()
        for row, length in enumerate(lengths.tolist()):
            valid = feats[row, : model.config.features.frame_count(length)]
            total += valid.sum(0)
            square += valid.square().sum(0)
            count += valid.shape[0]
    mean = total / count
    std = (square / count - mean.square()).clamp_min(1e-6).sqrt()
    return mean.float(), std.float()


def evaluate_greedy(model: CTCModel, utterances: Sequence[Utterance]) -> tuple[float, float]:
    """Greedy WER and CER of ``model`` on ``utterances``."""
    outputs = log_probs(model, [u.audio for u in utterances])
    hypotheses = [greedy_decode(lp, model.config.alphabet) for lp in outputs]
    rates = error_rates([u.text for u in utterances], hypotheses)
    return rates.wer, rates.cer


@dataclass
class TrainResult:
    steps: int
    seconds: float
    best_step: int
    best_dev_wer: float
    best_dev_cer: float
    history: list[dict[str, float]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Trainer:
    """Trains ``model`` on ``data``; keeps the weights with the best dev WER (greedy)."""

    def __init__(
        self,
        model: CTCModel,
        data: TrainData,
        dev: Sequence[Utterance],
        config: TrainConfig,
        log: Log = print,
        parameters: Sequence[torch.nn.Parameter] | None = None,
        penalty: Callable[[], torch.Tensor] | None = None,
        after_step: Callable[[int], None] | None = None,
    ) -> None:
        """``penalty()`` is added to the loss (e.g. EWC); ``after_step(step)`` runs after
        each optimizer step (e.g. pruning)."""
        self.model, self.data, self.config, self.log = model, data, config, log
        self.penalty, self.after_step = penalty, after_step
        self.dev = list(dev)[: config.eval_utterances]
        params = list(parameters) if parameters is not None else list(model.parameters())
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.peak_lr,
            betas=(0.9, 0.98),
        )
        self.step = 0
        self.best: tuple[float, float, int, dict[str, torch.Tensor]] | None = None
        self.history: list[dict[str, float]] = []

    def batches(self) -> Iterator[list[Utterance]]:
        """The batch stream from :attr:`step` on (the same stream a fresh run sees)."""
        skip, epoch = self.step, 0
        while True:
            plan = self.data.epoch(self.config.seed, epoch, self.config)
            if skip >= len(plan):
                skip -= len(plan)
            else:
                yield from plan[skip:]
                skip = 0
            epoch += 1

    def train_step(self, batch: Sequence[Utterance]) -> float:
        model, config = self.model, self.config
        model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, config)
        audio, lengths = pad_batch([u.audio for u in batch])
        feats, frames = model.featurize(audio, lengths)
        feats = spec_augment(feats, frames, config, _generator(config.seed, 104_729, self.step))
        logits, out_lengths = model.encode(feats, frames)
        loss = ctc_loss(logits, out_lengths, [u.text for u in batch], model.config.alphabet)
        total = loss + self.penalty() if self.penalty is not None else loss
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()  # type: ignore[no-untyped-call]
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        self.optimizer.step()
        self.step += 1
        if self.after_step is not None:
            self.after_step(self.step)
        return float(loss.detach())

    def evaluate(self) -> tuple[float, float]:
        wer, cer = evaluate_greedy(self.model, self.dev)
        if self.best is None or wer < self.best[0]:
            state = copy.deepcopy(self.model.state_dict())
            self.best = (wer, cer, self.step, state)
        return wer, cer

    def run(self, state_path: Path | None = None) -> TrainResult:
        config = self.config
        started = time.monotonic()
        window: list[float] = []
        seen = 0.0
        stream = self.batches()
        while self.step < config.steps:
            batch = next(stream)
            window.append(self.train_step(batch))
            seen += sum(len(u.audio) for u in batch) / SAMPLE_RATE
            if self.step % config.log_every == 0 or self.step == config.steps:
                elapsed = time.monotonic() - started
                mean = sum(window) / len(window)
                self.log(
                    f"step {self.step:6d}  loss {mean:.3f}  lr {lr_at(self.step - 1, config):.2e}"
                    f"  {seen / elapsed:5.1f} audio-s/s  {elapsed / 60:5.1f} min"
                )
                self.history.append({"step": self.step, "loss": mean, "minutes": elapsed / 60})
                window = []
            if self.dev and (self.step % config.eval_every == 0 or self.step == config.steps):
                wer, cer = self.evaluate()
                self.log(f"step {self.step:6d}  dev WER {wer:.2%}  CER {cer:.2%} (greedy)")
                self.history.append({"step": self.step, "dev_wer": wer, "dev_cer": cer})
                if state_path is not None:
                    self.save_state(state_path)
        if self.best is not None:
            self.model.load_state_dict(self.best[3])
        best = self.best or (math.nan, math.nan, self.step, {})
        return TrainResult(
            steps=self.step,
            seconds=time.monotonic() - started,
            best_step=best[2],
            best_dev_wer=best[0],
            best_dev_cer=best[1],
            history=self.history,
        )

    def save_state(self, path: Path) -> None:
        """Everything needed to resume (torch pickle; local use only, never shipped)."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "rng": torch.get_rng_state(),
            "best": None if self.best is None else list(self.best),
            "history": self.history,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as out:
            torch.save(state, out)

    def load_state(self, path: Path) -> None:
        state = torch.load(path, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"])
        best = state["best"]
        self.best = None if best is None else (best[0], best[1], best[2], best[3])
        self.history = list(state["history"])


# --------------------------------------------------------------------------- base recipe


BASE_TRAINING_SPLITS = ("base/train", "base/dev")


@dataclass(frozen=True)
class BaseRecipe:
    """Everything that determines the base checkpoint."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_json(self) -> dict[str, Any]:
        return {
            "corpus": self.corpus.to_json(),
            "model": self.model.to_json(),
            "train": self.train.to_json(),
        }


def train_base(
    recipe: BaseRecipe,
    out: Path,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    *,
    workers: int = 2,
    resume: bool = False,
    log: Log = print,
    on_corpus_progress: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Generate the base corpus if needed, train, and write ``out`` (+ its JSON config)."""
    store = CorpusStore.open(cache_dir, recipe.corpus)
    if any(store.missing_shards(s) for s in BASE_TRAINING_SPLITS):
        log(f"synthesizing the corpus under {store.root}")
        generate(store, BASE_TRAINING_SPLITS, workers=workers, on_progress=on_corpus_progress)
    train_set, dev_set = store.load("base/train"), store.load("base/dev")
    set_determinism(recipe.train.seed, recipe.train.threads)
    model = CTCModel(recipe.model)
    norm_clips = [u.audio for u in train_set[: recipe.train.norm_utterances]]
    model.set_normalization(*feature_statistics(model, norm_clips))
    log(
        f"model: {model.parameter_count():,} parameters; "
        f"{len(train_set):,} training utterances "
        f"({sum(u.seconds for u in train_set) / 3600:.1f} h), {len(dev_set)} dev"
    )
    trainer = Trainer(model, TrainData(train_set), dev_set, recipe.train, log)
    state_path = Path(cache_dir) / "train-state" / f"{out.stem}.pt"
    if resume and state_path.exists():
        trainer.load_state(state_path)
        log(f"resumed at step {trainer.step}")
    result = trainer.run(state_path)
    digest = save_checkpoint(
        model,
        out,
        extra={
            "recipe": recipe.to_json(),
            "corpus_root": store.root.name,
            "espeak": store.espeak,
            "torch": torch.__version__,
            "result": {k: v for k, v in result.to_json().items() if k != "history"},
        },
    )
    log(f"wrote {out} ({digest})")
    return result
