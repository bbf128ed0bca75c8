"""Training diffs: every method fits its byte budget and applies to the digest it records."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from asr import TrainingError
from asr.corpus import CorpusConfig, Utterance, plan_utterance
from asr.difftrain import (
    DiffTrainConfig,
    Method,
    apply_diff,
    cubic_density,
    model_bytes,
    train_diff,
)
from asr.model import CTCModel, ModelConfig, model_state_digest, save_checkpoint
from asr.train import TrainConfig, TrainData
from diffs.cli.diff_commands import app as diff_app
from diffs.container import DiffReader, write_diff
from diffs.digest import file_digest
from diffs.entries import ExactEntry, HashedEntry, SparseEntry
from diffs.patch_file import apply_to_file

TINY = ModelConfig(dim=24, blocks=2, kernel=3, expansion=2, lookahead=1)
FAST = TrainConfig(
    steps=6,
    batch_seconds=3.0,
    warmup_steps=1,
    weight_decay=0.0,
    replay_fraction=0.5,
    eval_every=10**9,
    log_every=3,
    threads=1,
)


@pytest.fixture(autouse=True)
def _restore_torch_globals() -> Iterator[None]:
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def _utterances(split: str, count: int, seed: int) -> list[Utterance]:
    rng = np.random.default_rng(seed)
    config = CorpusConfig()
    return [
        Utterance(
            plan_utterance(config, split, i),
            (rng.standard_normal(int(rng.integers(8_000, 12_000))) * 3000).astype(np.int16),
        )
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def base() -> CTCModel:
    torch.manual_seed(3)
    return CTCModel(TINY).eval()


@pytest.fixture(scope="module")
def data() -> TrainData:
    return TrainData(_utterances("swimmers/train", 8, 1), _utterances("base/train", 8, 2))


def _config(method: Method, budget: float = 0.05, **changes: object) -> DiffTrainConfig:
    return replace(DiffTrainConfig(method=method, budget=budget, train=FAST), **changes)  # type: ignore[arg-type]


def test_cubic_schedule_is_dense_then_sharpens_to_the_final_density() -> None:
    config = DiffTrainConfig(prune_start=0.2, prune_end=0.6)
    densities = [cubic_density(s, 100, 0.05, config) for s in range(101)]
    assert densities[:21] == [1.0] * 21
    assert densities[60:] == [0.05] * 41
    assert all(a >= b for a, b in itertools.pairwise(densities))
    # Cubic: the first half of the pruning window removes most of what is pruned.
    assert densities[40] < 0.05 + (1 - 0.05) * 0.15


@pytest.mark.parametrize("method", list(Method))
def test_each_method_fits_its_budget_and_reaches_its_recorded_digest(
    tmp_path: Path, base: CTCModel, data: TrainData, method: Method
) -> None:
    # A tiny model: per-tensor headers are a large share of a small budget.
    config = _config(method, budget=0.25)
    result = train_diff(base, data, config, log=lambda _: None)
    assert result.model_bytes == model_bytes(base) == 4 * base.parameter_count()
    if method is not Method.FULL:
        assert result.diff_bytes <= result.budget_bytes == int(0.25 * result.model_bytes)
    kinds = {type(e) for e in result.diff.entries}
    expected = {
        Method.FULL: ExactEntry,
        Method.SPARSE: SparseEntry,
        Method.TOPK: SparseEntry,
        Method.HASHED: HashedEntry,
    }[method]
    assert kinds == {expected}
    # The model the trainer returns is the diff applied -- what a device will run.
    assert model_state_digest(result.model) == result.diff.target_digest
    assert result.diff.base_digest == model_state_digest(base)
    # Through files, as a device applies it: the recorded target digest, bit for bit.
    base_path, diff_path = tmp_path / "base.safetensors", tmp_path / "update.diff"
    save_checkpoint(base, base_path)
    write_diff(diff_path, result.diff)
    with DiffReader(diff_path) as reader:
        apply_to_file(base_path, [reader], tmp_path / "out.safetensors")
    assert file_digest(tmp_path / "out.safetensors") == result.diff.target_digest


def test_sparse_keeps_few_entries_and_the_rest_of_the_model(
    base: CTCModel, data: TrainData
) -> None:
    result = train_diff(base, data, _config(Method.SPARSE, budget=0.02), log=lambda _: None)
    changed = sum(e.positions.size for e in result.diff.entries if isinstance(e, SparseEntry))
    assert 0 < changed < 0.05 * base.parameter_count()
    assert changed == result.kept
    before, after = base.state_dict(), result.model.state_dict()
    moved = sum(int((before[k] != after[k]).sum()) for k in before)
    assert moved <= changed


def test_hashed_values_are_shared_through_the_map(base: CTCModel, data: TrainData) -> None:
    result = train_diff(base, data, _config(Method.HASHED, budget=0.25), log=lambda _: None)
    buckets = sum(len(e.buckets) for e in result.diff.entries if isinstance(e, HashedEntry))
    assert buckets == result.kept
    assert 2 * buckets < result.budget_bytes  # f16 values: each stands for many weights
    assert buckets < base.parameter_count() / 2
    assert result.diff_bytes <= result.budget_bytes


def test_training_is_deterministic(base: CTCModel, data: TrainData) -> None:
    config = _config(Method.SPARSE)
    first = train_diff(base, data, config, log=lambda _: None)
    second = train_diff(base, data, config, log=lambda _: None)
    assert first.diff.target_digest == second.diff.target_digest


def test_ewc_and_fisher_weighting_run(base: CTCModel, data: TrainData) -> None:
    config = _config(Method.TOPK, ewc=10.0, fisher_weighted=True, fisher_batches=2)
    result = train_diff(base, data, config, log=lambda _: None)
    assert model_state_digest(apply_diff(base, result.diff)) == result.diff.target_digest


@pytest.mark.parametrize(
    "changes",
    [
        {"budget": 0.0},
        {"budget": 1.5},
        {"prune_start": 0.7},
        {"retrain": 1.0},
        {"ewc": -1.0},
        {"delta_lr": 0.0},
    ],
)
def test_bad_configurations_are_named_errors(changes: dict[str, float]) -> None:
    with pytest.raises(TrainingError):
        DiffTrainConfig(**changes)  # type: ignore[arg-type]


def test_delta_learning_rate_falls_with_the_budget_unless_given() -> None:
    rates = [DiffTrainConfig(budget=b).delta_peak_lr() for b in (0.01, 0.02, 0.05, 0.1, 0.2)]
    assert rates[0] == rates[1] == pytest.approx(3e-3)
    assert rates[3] == pytest.approx(rates[1] / 2)
    assert all(a > b for a, b in itertools.pairwise(rates[1:]))
    assert DiffTrainConfig(budget=0.1, delta_lr=5e-4).delta_peak_lr() == 5e-4
    assert DiffTrainConfig(budget=0.1).to_json()["delta_lr"] == pytest.approx(1.5e-3)


def test_ewc_needs_old_data(base: CTCModel) -> None:
    with pytest.raises(TrainingError, match="old utterances"):
        train_diff(
            base,
            TrainData(_utterances("swimmers/train", 4, 1)),
            _config(Method.SPARSE, ewc=1.0),
            log=lambda _: None,
        )


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_diff_train_command_writes_a_diff_that_applies(tmp_path: Path, base: CTCModel) -> None:
    base_path = tmp_path / "base.safetensors"
    save_checkpoint(base, base_path)
    diff_path = tmp_path / "swimmers.diff"
    args = ["train", str(base_path), "--update", "swimmers", "-o", str(diff_path)]
    args += ["--budget", "5%", "--steps", "2", "--train-limit", "3", "--replay-base", "3"]
    args += [
        "--delta-lr",
        "2e-3",
        "--test-limit",
        "2",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--workers",
        "1",
    ]
    args += ["--model-out", str(tmp_path / "updated.safetensors")]
    result = CliRunner().invoke(diff_app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "swimmers.diff.json").read_text())
    assert record["update"] == "swimmers"
    assert record["config"]["delta_lr"] == 2e-3
    assert record["diff_bytes"] == diff_path.stat().st_size
    assert file_digest(tmp_path / "updated.safetensors") == record["target"]
    applied = CliRunner().invoke(
        diff_app, ["verify", str(base_path), str(diff_path), "--expect", record["base"]]
    )
    assert applied.exit_code == 0, applied.output
    assert record["target"] in applied.output


def test_diff_train_rejects_an_unknown_update_set(tmp_path: Path, base: CTCModel) -> None:
    base_path = tmp_path / "base.safetensors"
    save_checkpoint(base, base_path)
    args = ["train", str(base_path), "--update", "curlers", "-o", str(tmp_path / "x.diff")]
    result = CliRunner().invoke(diff_app, args)
    assert result.exit_code == 2
    assert "unknown update set" in result.output
    assert not (tmp_path / "x.diff").exists()
