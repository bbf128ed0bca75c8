"""Canary bundles: the round trip, and every hostile bundle refused with a named error
(never a crash, never an allocation beyond the caps)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffs.canary import (
    FORMAT,
    CanaryClip,
    CanaryLimits,
    read_canary,
    write_canary,
)
from diffs.errors import CanaryFormatError
from diffs.model import Tensor, save_model

RNG = np.random.default_rng(5)
AUDIO = {
    "clip-0000": (RNG.standard_normal(1600) * 3000).astype(np.int16),
    "clip-0001": (RNG.standard_normal(800) * 3000).astype(np.int16),
}
TRANSCRIPTS = {"clip-0000": "turn on the lights", "clip-0001": "call mom"}


def clips() -> list[CanaryClip]:
    return [CanaryClip(name, TRANSCRIPTS[name], AUDIO[name]) for name in AUDIO]


def metadata(**changes: str | None) -> dict[str, str]:
    base: dict[str, str | None] = {
        "format": FORMAT,
        "sample_rate": "16000",
        "max_wer": "0.3",
        "transcripts": json.dumps(TRANSCRIPTS),
        "decoder": json.dumps({"kind": "test"}),
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def raw_file(path: Path, header: dict[str, Any], data: bytes = b"") -> Path:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def test_round_trip(tmp_path: Path) -> None:
    written = write_canary(tmp_path / "c.safetensors", clips(), 0.25, {"kind": "x", "n": [1]})
    bundle = read_canary(tmp_path / "c.safetensors")
    assert [c.name for c in written.clips] == [c.name for c in bundle.clips]
    assert bundle.max_wer == 0.25
    assert bundle.decoder == {"kind": "x", "n": [1]}
    assert [c.name for c in bundle.clips] == ["clip-0000", "clip-0001"]
    for clip in bundle.clips:
        assert clip.transcript == TRANSCRIPTS[clip.name]
        assert clip.audio.dtype == np.int16
        np.testing.assert_array_equal(clip.audio, AUDIO[clip.name])
    assert bundle.words == 6
    assert bundle.seconds == pytest.approx(2400 / 16000)


@pytest.mark.parametrize("bound", [0.0, 1e-5, 0.1, 1.5, 12.0])
def test_bounds_round_trip_exactly(tmp_path: Path, bound: float) -> None:
    path = tmp_path / "c.safetensors"
    write_canary(path, clips(), bound)
    bundle = read_canary(path)
    assert bundle.max_wer == bound and bundle.decoder is None


def test_it_is_a_plain_safetensors_file(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    write_canary(tmp_path / "c.safetensors", clips(), 0.3)
    loaded = load_file(str(tmp_path / "c.safetensors"))
    np.testing.assert_array_equal(loaded["clip-0001"], AUDIO["clip-0001"])


WRITE_ERRORS: dict[str, tuple[Callable[[], list[CanaryClip]], float, str]] = {
    "float audio": (
        lambda: [CanaryClip("a", "x y", np.zeros(10, np.float32))],
        0.3,
        "int16",
    ),
    "2-D audio": (lambda: [CanaryClip("a", "x", np.zeros((2, 5), np.int16))], 0.3, "1-D"),
    "empty audio": (lambda: [CanaryClip("a", "x", np.zeros(0, np.int16))], 0.3, "samples"),
    "twice": (lambda: clips() + clips()[:1], 0.3, "twice"),
    "none": (list, 0.3, "at least one clip"),
    "bad name": (lambda: [CanaryClip("../a", "x", np.ones(4, np.int16))], 0.3, "name"),
    "empty transcript": (lambda: [CanaryClip("a", "  ", np.ones(4, np.int16))], 0.3, "empty"),
    "control": (lambda: [CanaryClip("a", "x\x00y", np.ones(4, np.int16))], 0.3, "control"),
    "nan bound": (clips, float("nan"), "finite"),
    "negative bound": (clips, -0.1, "finite"),
    "inf bound": (clips, float("inf"), "finite"),
}


@pytest.mark.parametrize("case", sorted(WRITE_ERRORS))
def test_what_the_format_cannot_hold_is_not_written(tmp_path: Path, case: str) -> None:
    make, bound, message = WRITE_ERRORS[case]
    path = tmp_path / "c.safetensors"
    with pytest.raises(CanaryFormatError, match=message):
        write_canary(path, make(), bound)
    assert not path.exists()


def test_over_the_caps_on_write_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    with pytest.raises(CanaryFormatError, match="above the cap"):
        write_canary(path, clips(), 0.3, limits=CanaryLimits(max_file_bytes=1000))
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def _model(**arrays: np.ndarray[Any, Any]) -> dict[str, Tensor]:
    return {name: Tensor.of(array) for name, array in arrays.items()}


def _good_model() -> dict[str, Tensor]:
    return _model(**{k: v for k, v in AUDIO.items()})


HOSTILE_METADATA: dict[str, tuple[dict[str, str], str]] = {
    "no metadata": ({}, "format"),
    "wrong format": (metadata(format="diffcast-canary-v9"), "format"),
    "wrong rate": (metadata(sample_rate="8000"), "sample_rate"),
    "unknown key": (metadata(extra="1"), "unknown metadata"),
    "no bound": (metadata(max_wer=None), "max_wer"),
    "nan bound": (metadata(max_wer="nan"), "max_wer"),
    "inf bound": (metadata(max_wer="inf"), "max_wer"),
    "huge bound": (metadata(max_wer="1e999"), "finite"),
    "negative bound": (metadata(max_wer="-1"), "max_wer"),
    "spaced bound": (metadata(max_wer=" 0.3"), "max_wer"),
    "long bound": (metadata(max_wer="1" * 5000), "max_wer"),
    "no transcripts": (metadata(transcripts=None), "transcripts"),
    "transcripts not json": (metadata(transcripts="{nope"), "not valid JSON"),
    "transcripts a list": (metadata(transcripts='["a"]'), "JSON object"),
    "transcript a number": (
        metadata(transcripts=json.dumps({"clip-0000": 1, "clip-0001": "x"})),
        "string",
    ),
    "duplicate transcript": (
        metadata(transcripts='{"clip-0000": "a", "clip-0000": "b", "clip-0001": "c"}'),
        "duplicate",
    ),
    "nested deeply": (metadata(transcripts="[" * 100_000 + "]" * 100_000), "JSON"),
    "big int": (metadata(transcripts='{"a": ' + "9" * 5000 + "}"), "JSON"),
    "missing transcript": (
        metadata(transcripts=json.dumps({"clip-0000": "a"})),
        "do not match",
    ),
    "extra transcript": (
        metadata(transcripts=json.dumps({**TRANSCRIPTS, "clip-0009": "z"})),
        "do not match",
    ),
    "empty transcript": (
        metadata(transcripts=json.dumps({**TRANSCRIPTS, "clip-0001": " "})),
        "empty",
    ),
    "control characters": (
        metadata(transcripts=json.dumps({**TRANSCRIPTS, "clip-0001": "a\u0007b"})),
        "control",
    ),
    "lone surrogate": (
        metadata(transcripts='{"clip-0000": "a\\ud800", "clip-0001": "b"}'),
        "control",
    ),
    "long transcript": (
        metadata(transcripts=json.dumps({**TRANSCRIPTS, "clip-0001": "a" * 1001})),
        "1000 characters",
    ),
    "decoder a string": (metadata(decoder='"x"'), "JSON object"),
    "decoder too big": (metadata(decoder=json.dumps({"x": "y" * 70_000})), "decoder"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_METADATA))
def test_hostile_metadata(tmp_path: Path, case: str) -> None:
    meta, message = HOSTILE_METADATA[case]
    path = tmp_path / "c.safetensors"
    save_model(path, _good_model(), meta)
    with pytest.raises(CanaryFormatError, match=message):
        read_canary(path)


HOSTILE_CLIPS: dict[str, tuple[dict[str, np.ndarray[Any, Any]], str]] = {
    "float clip": (
        {"clip-0000": AUDIO["clip-0000"].astype(np.float32), "clip-0001": AUDIO["clip-0001"]},
        "1-D I16",
    ),
    "2-D clip": (
        {"clip-0000": AUDIO["clip-0000"].reshape(40, 40), "clip-0001": AUDIO["clip-0001"]},
        "dimensions|1-D",
    ),
    "empty clip": (
        {"clip-0000": np.zeros(0, np.int16), "clip-0001": AUDIO["clip-0001"]},
        "samples",
    ),
    "bad name": ({"clip 0": AUDIO["clip-0000"]}, "name"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CLIPS))
def test_hostile_clips(tmp_path: Path, case: str) -> None:
    arrays, message = HOSTILE_CLIPS[case]
    path = tmp_path / "c.safetensors"
    names = {name: f"words of {name}" for name in arrays}
    save_model(path, _model(**arrays), metadata(transcripts=json.dumps(names)))
    with pytest.raises(CanaryFormatError, match=message):
        read_canary(path)


def test_no_clip_at_all(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_model(path, {}, metadata(transcripts="{}"))
    with pytest.raises(CanaryFormatError, match="no clip"):
        read_canary(path)


def test_caps_are_checked_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    write_canary(path, clips(), 0.3)
    size = path.stat().st_size
    for limits, message in [
        (CanaryLimits(max_file_bytes=size - 1), "above the cap"),
        (CanaryLimits(max_clips=1), "tensors"),
        (CanaryLimits(max_clip_samples=1000), "element|samples"),
        (CanaryLimits(max_header_bytes=64), "header"),
    ]:
        with pytest.raises(CanaryFormatError, match=message):
            read_canary(path, limits)


def test_declared_sizes_past_the_file_are_refused(tmp_path: Path) -> None:
    # a header that claims 2**60 bytes, and a clip that claims more samples than exist
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(CanaryFormatError, match="header"):
        read_canary(huge)
    lying = raw_file(
        tmp_path / "lying.safetensors",
        {
            "__metadata__": metadata(transcripts=json.dumps({"a": "x"})),
            "a": {"dtype": "I16", "shape": [400_000], "data_offsets": [0, 800_000]},
        },
        b"\0" * 16,
    )
    with pytest.raises(CanaryFormatError, match="buffer"):
        read_canary(lying)


def test_garbage_and_truncation(tmp_path: Path) -> None:
    good = tmp_path / "c.safetensors"
    write_canary(good, clips(), 0.3)
    data = good.read_bytes()
    for name, body in {
        "empty": b"",
        "short": b"\x01\x02",
        "text": b"this is not a canary bundle at all",
        "truncated": data[: len(data) - 7],
        "header only": data[:40],
    }.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(body)
        with pytest.raises(CanaryFormatError):
            read_canary(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_bundles_are_read_or_refused_by_name(
    data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = tmp_path_factory.mktemp("fuzz")
    good = directory / "good.safetensors"
    write_canary(good, clips(), 0.3, {"kind": "test"})
    raw = bytearray(good.read_bytes())
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    for _ in range(data.draw(st.integers(1, 4))):
        # mostly in the header, where the structure is
        position = data.draw(
            st.integers(0, header_end - 1 if data.draw(st.booleans()) else len(raw) - 1)
        )
        raw[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    bad = directory / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    try:
        bundle = read_canary(bad)
    except CanaryFormatError:
        return
    assert bundle.clips and bundle.max_wer >= 0
