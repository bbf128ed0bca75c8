"""Training neural diffs: the paper's methods, compared at equal transmitted bytes.

Every method starts from a base checkpoint and ends in a diff file of the
:mod:`diffs` format, plus the model a device gets by applying it:

- ``full``: fine-tune every weight (the reference); shipped as an exact diff.
- ``sparse``: freeze the base and train an additive delta. From ``prune_start`` to
  ``prune_end`` (fractions of the steps) the delta is pruned by magnitude every
  ``prune_every`` steps to a density that falls on a cubic schedule -- gently at first,
  sharper and sharper -- down to what the byte budget holds; the survivors are then
  fine-tuned with the mask fixed.
- ``hashed``: train ``K`` bucket values per tensor through the fixed position ->
  (bucket, sign) map of :mod:`diffs.hashing` (HashedNets); ``K`` is as many values as
  the budget holds.
- ``topk``: fine-tune every weight for ``1 - retrain`` of the steps, keep the largest
  deltas (by magnitude, or magnitude times a Fisher estimate), then retrain the
  survivors with the mask fixed.

Old skills are kept by replay (old utterances mixed into every epoch,
:attr:`asr.train.TrainConfig.replay_fraction`) and an optional EWC penalty
``ewc / 2 * sum(F * (w - w_base)^2)`` with a diagonal Fisher ``F`` estimated on old data
and normalized to mean 1.

The budget is in bytes of the encoded diff, as a fraction of the fp32 model (4 bytes per
parameter), so methods are compared at the same download size. The diff's target digest
is the base with the diff applied by the arithmetic a device uses, and the model
returned is that applied model -- what a device will run -- not the trainer's float
weights.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from asr import TrainingError
from asr.corpus import Utterance
from asr.model import CTCModel, pad_batch
from asr.train import Log, TrainConfig, TrainData, Trainer, ctc_loss, set_determinism
from diffs.chain import apply_chain
from diffs.container import Diff, diff_bytes
from diffs.digest import model_digest
from diffs.entries import Entry, HashedEntry
from diffs.hashing import bucket_and_sign
from diffs.make import diff_from_entries, hashed_layout, make_exact, make_sparse, sparse_capacity
from diffs.model import Tensor
from diffs.torch_bridge import from_state_dict, to_state_dict
from diffs.values import ValueFormat, Values


class Method(enum.StrEnum):
    FULL = "full"
    SPARSE = "sparse"
    HASHED = "hashed"
    TOPK = "topk"


def _update_train_config() -> TrainConfig:
    return TrainConfig(
        steps=160,
        batch_seconds=30.0,
        peak_lr=1e-3,
        warmup_steps=16,
        final_lr_ratio=0.05,
        weight_decay=0.0,
        replay_fraction=0.5,
        eval_every=10**9,
        log_every=40,
    )


SMALL_BUDGET, LARGE_BUDGET = 0.02, 0.10
SMALL_BUDGET_DELTA_LR = 3e-3
"""The delta learning rate up to ``SMALL_BUDGET``; it is half that at ``LARGE_BUDGET``."""


@dataclass(frozen=True)
class DiffTrainConfig:
    """One update's training: the method, its byte budget and its schedule."""

    method: Method = Method.SPARSE
    budget: float = 0.02
    """Encoded diff bytes as a fraction of the fp32 model (ignored by ``full``)."""
    train: TrainConfig = field(default_factory=_update_train_config)
    value_format: ValueFormat = ValueFormat.F16
    prune_start: float = 0.1
    prune_end: float = 0.6
    prune_every: int = 5
    delta_lr: float | None = None
    """Peak learning rate of trained deltas and bucket values (``train.peak_lr`` is that of
    whole weights, in ``full`` and the first phase of ``topk``); ``None``: by budget, see
    :meth:`delta_peak_lr`."""
    overshoot: float = 1.15
    """``sparse``/``topk`` prune toward this many times the entries the budget is
    planned to hold; the encoder then keeps the largest that really fit."""
    retrain: float = 0.3
    """``topk``: the share of the steps spent retraining the kept deltas."""
    fisher_weighted: bool = False
    """``topk``: rank deltas by ``|delta| * Fisher`` instead of ``|delta|``."""
    ewc: float = 0.0
    fisher_batches: int = 8
    hash_seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise TrainingError(f"budget must be in (0, 100%], not {self.budget:.4%}")
        if not 0.0 <= self.prune_start < self.prune_end <= 1.0:
            raise TrainingError("need 0 <= prune_start < prune_end <= 1")
        if self.overshoot < 1.0:
            raise TrainingError("overshoot must be >= 1")
        if not 0.0 < self.retrain < 1.0:
            raise TrainingError("retrain must be a fraction in (0, 1)")
        if self.ewc < 0:
            raise TrainingError("ewc must be >= 0")
        if self.delta_lr is not None and not self.delta_lr > 0:
            raise TrainingError("delta_lr must be > 0")

    def delta_peak_lr(self) -> float:
        """``delta_lr``, or by budget: 3e-3 up to 2% of the model, halving by 10%.

        Deltas start from zero and pruning removes most of what they learn, so they take
        larger steps than whole weights -- the smaller the budget, the larger. At 10%, steps
        as large as at 2% made sparse updates forget 2.5 WER points more of the original
        test set than full fine-tuning after five updates; half as large, about one point
        less (``make bench-quality``). Between the two the rate falls log-linearly.
        """
        if self.delta_lr is not None:
            return self.delta_lr
        if self.budget <= SMALL_BUDGET:
            return SMALL_BUDGET_DELTA_LR
        halvings = math.log(self.budget / SMALL_BUDGET) / math.log(LARGE_BUDGET / SMALL_BUDGET)
        return float(SMALL_BUDGET_DELTA_LR * 0.5**halvings)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["delta_lr"] = self.delta_peak_lr()
        data["method"] = self.method.value
        data["value_format"] = self.value_format.value
        data["train"] = self.train.to_json()
        return data


@dataclass
class DiffResult:
    """A trained update: the diff, the applied model and what it cost."""

    diff: Diff
    model: CTCModel
    method: Method
    budget_bytes: int
    diff_bytes: int
    model_bytes: int
    kept: int
    """Entries (sparse, topk), bucket values (hashed) or changed weights (full)."""
    seconds: float
    steps: int

    @property
    def fraction(self) -> float:
        return self.diff_bytes / self.model_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method.value,
            "base": self.diff.base_digest,
            "target": self.diff.target_digest,
            "budget_bytes": self.budget_bytes,
            "diff_bytes": self.diff_bytes,
            "model_bytes": self.model_bytes,
            "fraction": self.fraction,
            "kept": self.kept,
            "seconds": self.seconds,
            "steps": self.steps,
        }


# --------------------------------------------------------------------------- parametrizations


class _SparseDelta(nn.Module):
    """``w = base + delta * mask`` (the base is the frozen original weight)."""

    mask: torch.Tensor

    def __init__(self, base: torch.Tensor) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros_like(base))
        self.register_buffer("mask", torch.ones_like(base))

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base + self.delta * self.mask


class _HashedDelta(nn.Module):
    """``w[i] = base[i] + sign(i) * values[bucket(i)]``."""

    bucket: torch.Tensor
    sign: torch.Tensor

    def __init__(self, base: torch.Tensor, seed: int, buckets: int) -> None:
        super().__init__()
        index, negative = bucket_and_sign(seed, 0, base.numel(), buckets)
        self.values = nn.Parameter(torch.zeros(buckets, dtype=base.dtype))
        self.register_buffer("bucket", torch.from_numpy(index).reshape(base.shape))
        sign = np.where(negative, -1.0, 1.0).astype(np.float32)
        self.register_buffer("sign", torch.from_numpy(sign).reshape(base.shape))

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base + self.sign * self.values[self.bucket]


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def _weight_names(model: CTCModel) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def _attach(model: CTCModel, make: Callable[[str, torch.Tensor], nn.Module]) -> list[nn.Module]:
    """Put a parametrization on every weight; the originals are frozen."""
    attached = []
    for name in _weight_names(model):
        module, leaf = _owner(model, name)
        original = getattr(module, leaf).detach()
        delta = make(name, original)
        parametrize.register_parametrization(module, leaf, delta)
        container: Any = module.parametrizations
        container[leaf].original.requires_grad_(False)
        attached.append(delta)
    return attached


def _detach_all(model: CTCModel) -> None:
    """Bake the parametrizations into plain weights."""
    for name in list(_parametrized_names(model)):
        module, leaf = _owner(model, name)
        parametrize.remove_parametrizations(module, leaf, leave_parametrized=True)


def _parametrized_names(model: CTCModel) -> Iterator[str]:
    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            container: Any = module.parametrizations
            for leaf in list(container.keys()):
                yield f"{path}.{leaf}" if path else leaf


# --------------------------------------------------------------------------- the trainer


def model_bytes(model: CTCModel) -> int:
    """The fp32 size of the model's weights: what a budget is a fraction of."""
    return 4 * model.parameter_count()


def fisher_diagonal(
    model: CTCModel, utterances: Sequence[Utterance], config: DiffTrainConfig
) -> dict[str, torch.Tensor]:
    """Mean squared CTC gradient per weight over a few batches of ``utterances``.

    Normalized so the mean over all weights is 1 (``ewc`` is then scale-free).
    """
    if not utterances:
        raise TrainingError("a Fisher estimate needs old utterances (replay data)")
    data = TrainData(utterances)
    plan = data.epoch(config.train.seed, 10_007, config.train)[: config.fisher_batches]
    squares = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    model.eval()
    for batch in plan:
        model.zero_grad(set_to_none=True)
        _ctc_loss(model, batch).backward()  # type: ignore[no-untyped-call]
        for name, p in model.named_parameters():
            if p.grad is not None:
                squares[name] += p.grad.detach().square()
    model.zero_grad(set_to_none=True)
    total = sum(float(s.sum()) for s in squares.values())
    count = sum(s.numel() for s in squares.values())
    scale = count / total if total > 0 else 1.0
    return {name: s * scale for name, s in squares.items()}


def _ctc_loss(model: CTCModel, batch: Sequence[Utterance]) -> torch.Tensor:
    audio, lengths = pad_batch([u.audio for u in batch])
    logits, out_lengths = model(audio, lengths)
    return ctc_loss(logits, out_lengths, [u.text for u in batch], model.config.alphabet)


def _ewc_penalty(
    model: CTCModel, base: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], weight: float
) -> Callable[[], torch.Tensor]:
    def penalty() -> torch.Tensor:
        total = torch.zeros(())
        for name, reference in base.items():
            module, leaf = _owner(model, name)
            total = total + (fisher[name] * (getattr(module, leaf) - reference).square()).sum()
        return 0.5 * weight * total

    return penalty


def cubic_density(step: int, steps: int, final: float, config: DiffTrainConfig) -> float:
    """The sparse schedule: density 1 until ``prune_start``, ``final`` from ``prune_end``."""
    start, end = config.prune_start * steps, config.prune_end * steps
    if step <= start:
        return 1.0
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final + (1.0 - final) * (1.0 - progress) ** 3


def _prune(deltas: Sequence[_SparseDelta], keep: int) -> None:
    """Keep the ``keep`` largest ``|delta * mask|`` over all tensors; zero the rest."""
    with torch.no_grad():
        scores = torch.cat([(d.delta * d.mask).abs().reshape(-1) for d in deltas])
        if keep >= scores.numel():
            return
        threshold = torch.kthvalue(scores, scores.numel() - keep).values if keep > 0 else None
        for d in deltas:
            if threshold is None:
                d.mask.zero_()
            else:
                d.mask.mul_(((d.delta * d.mask).abs() > threshold).to(d.mask.dtype))
            d.delta.mul_(d.mask)


def _run_trainer(
    model: CTCModel,
    data: TrainData,
    config: TrainConfig,
    log: Log,
    parameters: Sequence[nn.Parameter],
    penalty: Callable[[], torch.Tensor] | None,
    after_step: Callable[[int], None] | None = None,
) -> int:
    trainer = Trainer(model, data, [], config, log, parameters, penalty, after_step)
    return trainer.run().steps


class _Context:
    """What every method needs: the base weights (numpy and torch), Fisher, budget."""

    def __init__(self, base: CTCModel, data: TrainData, config: DiffTrainConfig, log: Log) -> None:
        self.config, self.data, self.log = config, data, log
        self.base_weights: dict[str, Tensor] = from_state_dict(base.state_dict())
        self.base_torch = {n: p.detach().clone() for n, p in base.named_parameters()}
        self.model_bytes = model_bytes(base)
        self.budget_bytes = int(config.budget * self.model_bytes)
        needs_fisher = config.ewc > 0 or (config.method is Method.TOPK and config.fisher_weighted)
        self.fisher = fisher_diagonal(base, data.replay, config) if needs_fisher else {}

    def penalty(self, model: CTCModel) -> Callable[[], torch.Tensor] | None:
        if self.config.ewc <= 0:
            return None
        return _ewc_penalty(model, self.base_torch, self.fisher, self.config.ewc)

    def capacity(self) -> int:
        names = list(self.base_torch)
        planned = sparse_capacity(
            self.base_weights, names, self.budget_bytes, self.config.value_format
        )
        total = sum(p.numel() for p in self.base_torch.values())
        return min(total, round(planned * self.config.overshoot))


def train_diff(
    base: CTCModel, data: TrainData, config: DiffTrainConfig, log: Log = print
) -> DiffResult:
    """Train one update of ``base`` on ``data`` with ``config.method``; see the module doc."""
    if not data.utterances:
        raise TrainingError("no training utterances for the update")
    set_determinism(config.train.seed, config.train.threads)
    started = time.monotonic()
    context = _Context(base, data, config, log)
    model = CTCModel(base.config)
    model.load_state_dict(base.state_dict())
    method = config.method
    if method is Method.FULL:
        steps = _train_full(model, context, config.train)
        diff = make_exact(context.base_weights, from_state_dict(model.state_dict()))
        kept = sum(e.positions.size for e in diff.entries if hasattr(e, "positions"))
    elif method is Method.SPARSE:
        steps, diff, kept = _train_sparse(model, context)
    elif method is Method.HASHED:
        steps, diff, kept = _train_hashed(model, context)
    else:
        steps, diff, kept = _train_topk(model, context)
    applied = apply_diff(base, diff)
    size = len(diff_bytes(diff))
    return DiffResult(
        diff=diff,
        model=applied,
        method=method,
        budget_bytes=context.model_bytes if method is Method.FULL else context.budget_bytes,
        diff_bytes=size,
        model_bytes=context.model_bytes,
        kept=kept,
        seconds=time.monotonic() - started,
        steps=steps,
    )


def _train_full(model: CTCModel, context: _Context, train: TrainConfig) -> int:
    return _run_trainer(
        model, context.data, train, context.log, list(model.parameters()), context.penalty(model)
    )


def _sparse_phase(
    model: CTCModel,
    context: _Context,
    train: TrainConfig,
    keep: int,
    initial: dict[str, torch.Tensor] | None,
    prune: bool,
) -> int:
    """Train additive deltas; prune on the schedule (or keep ``initial``'s support)."""
    deltas: list[_SparseDelta] = []
    names: list[str] = []

    def make(name: str, original: torch.Tensor) -> nn.Module:
        delta = _SparseDelta(original)
        names.append(name)
        if initial is not None:
            with torch.no_grad():
                delta.delta.copy_(initial[name])
                delta.mask.copy_((initial[name] != 0).to(delta.mask.dtype))
        deltas.append(delta)
        return delta

    _attach(model, make)
    total = sum(d.delta.numel() for d in deltas)
    final = keep / total
    config = context.config

    def after_step(step: int) -> None:
        nonlocal keep
        if step % config.prune_every == 0 or step >= config.prune_end * train.steps:
            target = cubic_density(step, train.steps, final, config)
            current = sum(int(d.mask.sum()) for d in deltas)
            if current <= REFIT_WITHIN * keep and current > keep:
                refitted = _refit(context, names, deltas, keep, current)
                if refitted != keep:
                    context.log(f"sparse: the budget holds more; pruning toward {refitted:,}")
                keep = refitted
            wanted = max(keep, round(target * total))
            if wanted < current:
                _prune(deltas, wanted)

    parameters = [d.delta for d in deltas]
    steps = _run_trainer(
        model,
        context.data,
        replace(train, peak_lr=config.delta_peak_lr()),
        context.log,
        parameters,
        context.penalty(model),
        after_step if prune else None,
    )
    if prune:
        _prune(deltas, keep)
    _detach_all(model)
    return steps


REFIT_WITHIN = 2.0
"""Once pruning is within this factor of its goal, the goal is re-fitted to the budget
with the deltas as trained so far (see :func:`_refit`)."""


def _refit(
    context: _Context, names: Sequence[str], deltas: Sequence[_SparseDelta], keep: int, current: int
) -> int:
    """The entry goal, re-planned from the real deltas: the planner assumes positions
    spread uniformly and incompressible values, but trained deltas cluster (and code
    smaller), so the budget holds more of them than planned. Encoding the current deltas
    shows how many of the largest really fit; the goal never drops and never exceeds what
    survives."""
    weights = dict(context.base_weights)
    with torch.no_grad():
        for name, delta in zip(names, deltas, strict=True):
            base = weights[name].array
            moved = base + (delta.delta * delta.mask).numpy().reshape(base.shape)
            weights[name] = Tensor.of(moved.astype(base.dtype))
    _, report = make_sparse(
        context.base_weights, weights, context.budget_bytes, context.config.value_format
    )
    return max(keep, min(current, round(report.kept * context.config.overshoot)))


def _train_sparse(model: CTCModel, context: _Context) -> tuple[int, Diff, int]:
    keep = context.capacity()
    context.log(f"sparse: pruning toward {keep:,} entries ({context.budget_bytes:,} bytes)")
    steps = _sparse_phase(model, context, context.config.train, keep, None, prune=True)
    return steps, *_encode_sparse(model, context)


def _encode_sparse(model: CTCModel, context: _Context) -> tuple[Diff, int]:
    diff, report = make_sparse(
        context.base_weights,
        from_state_dict(model.state_dict()),
        context.budget_bytes,
        context.config.value_format,
    )
    return replace(diff, info={**diff.info, "trained": context.config.method.value}), report.kept


def _train_topk(model: CTCModel, context: _Context) -> tuple[int, Diff, int]:
    config = context.config
    retrain_steps = max(1, round(config.train.steps * config.retrain))
    first = replace(config.train, steps=config.train.steps - retrain_steps)
    steps = _train_full(model, context, first)
    keep = context.capacity()
    deltas = {n: p.detach() - context.base_torch[n] for n, p in model.named_parameters()}
    scores = {
        n: d.abs() * (context.fisher[n] if config.fisher_weighted else 1.0)
        for n, d in deltas.items()
    }
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    if keep < flat.numel():
        threshold = torch.kthvalue(flat, flat.numel() - keep).values
        deltas = {n: torch.where(scores[n] > threshold, d, 0.0) for n, d in deltas.items()}
    context.log(f"topk: kept {keep:,} deltas; retraining them for {retrain_steps} steps")
    model.load_state_dict(context.base_torch, strict=False)
    again = replace(config.train, steps=retrain_steps, warmup_steps=0)
    steps += _sparse_phase(model, context, again, keep, deltas, prune=False)
    return steps, *_encode_sparse(model, context)


def _train_hashed(model: CTCModel, context: _Context) -> tuple[int, Diff, int]:
    config = context.config
    names = _weight_names(model)
    counts = hashed_layout(
        context.base_weights, names, context.budget_bytes, config.value_format, config.hash_seed
    )
    context.log(f"hashed: {sum(counts.values()):,} bucket values ({context.budget_bytes:,} bytes)")
    hashed: dict[str, _HashedDelta] = {}

    def make(name: str, original: torch.Tensor) -> nn.Module:
        hashed[name] = _HashedDelta(original, config.hash_seed, counts[name])
        return hashed[name]

    _attach(model, make)
    parameters = [h.values for h in hashed.values()]
    train = replace(config.train, peak_lr=config.delta_peak_lr())
    steps = _run_trainer(
        model, context.data, train, context.log, parameters, context.penalty(model)
    )
    entries: list[Entry] = []
    for name, h in hashed.items():
        tensor = context.base_weights[name]
        values = Values.quantize(h.values.detach().double().numpy(), config.value_format)
        entries.append(HashedEntry(name, tensor.dtype, tensor.shape, config.hash_seed, values))
    _detach_all(model)
    diff = diff_from_entries(
        context.base_weights,
        entries,
        {"method": "hashed", "trained": "hashed", "budget_bytes": context.budget_bytes},
    )
    return steps, diff, sum(counts.values())


def apply_diff(base: CTCModel, diff: Diff) -> CTCModel:
    """``base`` with ``diff`` applied by :mod:`diffs` (digests checked)."""
    weights = apply_chain(from_state_dict(base.state_dict()), [diff])
    if model_digest(weights) != diff.target_digest:
        raise TrainingError("the applied diff does not give its target digest")
    model = CTCModel(base.config)
    model.load_state_dict(to_state_dict(weights))
    return model.eval()
