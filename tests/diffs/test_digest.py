"""The canonical model digest: its definition, its invariances and its sensitivity.

The digest is recomputed here from the definition in :mod:`diffs.digest` with nothing but
``hashlib`` and ``struct``; it must not depend on file layout, tensor order, metadata,
memory layout or the process; and it must change when any name, dtype, shape or byte does.
The torch bridge (:mod:`diffs.torch_bridge`) must carry every bit across, bfloat16 included.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffs.digest import file_digest, model_digest
from diffs.dtypes import DType
from diffs.errors import ModelFormatError
from diffs.model import Model, ModelFile, Tensor, load_model, save_model
from tests.diffs import ALL_DTYPES, assert_same_model, random_bits_tensor, random_tensor


def spec_digest(model: Model) -> str:
    """The digest, version 1, written from its definition."""
    h = hashlib.sha256(b"diffcast-model-v1\x00\x00\x00" + struct.pack("<Q", len(model)))
    for name in sorted(model, key=lambda n: n.encode("utf-8")):
        tensor = model[name]
        raw_name = name.encode("utf-8")
        dtype_name = tensor.dtype.value.encode("ascii")
        data = np.ascontiguousarray(tensor.array).astype(tensor.dtype.storage).tobytes()
        h.update(struct.pack("<I", len(raw_name)) + raw_name)
        h.update(struct.pack("<B", len(dtype_name)) + dtype_name)
        h.update(struct.pack("<B", len(tensor.shape)))
        for dim in tensor.shape:
            h.update(struct.pack("<Q", dim))
        h.update(struct.pack("<Q", len(data)) + data)
    return "sha256:" + h.hexdigest()


def sample_model(seed: int = 0) -> dict[str, Tensor]:
    rng = np.random.default_rng(seed)
    return {
        "encoder.layers.0.weight": random_tensor(rng, DType.F32, (6, 4)),
        "encoder.layers.0.bias": random_tensor(rng, DType.BF16, (4,)),
        "decoder.embed": random_tensor(rng, DType.F16, (5, 3)),
        "decoder.scale": random_tensor(rng, DType.F64, ()),
        "decoder.steps": random_tensor(rng, DType.I64, (3,)),
        "mask": random_tensor(rng, DType.BOOL, (2, 2)),
        "empty": random_tensor(rng, DType.U8, (0, 5)),
        "é.ünïcode": random_tensor(rng, DType.I8, (2,)),
    }


def write_raw_safetensors(
    path: Path, model: Model, order: list[str], metadata: dict[str, str] | None
) -> None:
    """A safetensors file with tensors in ``order`` (data and header alike), unsorted JSON
    with spaces, and optional metadata: a different file holding the same model."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    blobs = []
    offset = 0
    for name in order:
        data = model[name].layout_bytes
        header[name] = {
            "data_offsets": [offset, offset + len(data)],
            "shape": list(model[name].shape),
            "dtype": model[name].dtype.value,
        }
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, indent=2, ensure_ascii=True).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


# ---------------------------------------------------------------------------------------
# definition


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    names=st.lists(
        st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=10),
        unique=True,
        max_size=6,
    ),
)
def test_model_digest_is_the_documented_sha256(seed: int, names: list[str]) -> None:
    rng = np.random.default_rng(seed)
    model = {}
    for name in names:
        dtype = ALL_DTYPES[int(rng.integers(0, len(ALL_DTYPES)))]
        shape = tuple(int(d) for d in rng.integers(0, 4, int(rng.integers(0, 4))))
        model[name] = random_bits_tensor(rng, dtype, shape)
    assert model_digest(model) == spec_digest(model)


def test_digest_of_the_empty_model() -> None:
    expected = hashlib.sha256(b"diffcast-model-v1\x00\x00\x00" + bytes(8)).hexdigest()
    assert model_digest({}) == "sha256:" + expected


def test_digest_orders_names_by_utf8_bytes() -> None:
    one = Tensor.of(np.zeros(1, np.uint8))
    names = ["b", "a", "B", "\u00e9", "\U0001f600", "a.b", "a0", "\uffff"]
    model = {name: one for name in names}
    assert model_digest(model) == spec_digest(model)
    assert model_digest(dict(reversed(model.items()))) == model_digest(model)


# ---------------------------------------------------------------------------------------
# what the digest does not depend on


def test_same_model_in_different_files_has_the_same_digest(tmp_path: Path) -> None:
    model = sample_model()
    canonical = tmp_path / "canonical.safetensors"
    save_model(canonical, model)
    with_metadata = tmp_path / "meta.safetensors"
    save_model(with_metadata, model, {"producer": "someone else", "epoch": "7"})
    reordered = tmp_path / "reordered.safetensors"
    write_raw_safetensors(reordered, model, sorted(model, reverse=True), {"x": "y"})
    shuffled = tmp_path / "shuffled.safetensors"
    order = list(model)
    np.random.default_rng(1).shuffle(order)
    write_raw_safetensors(shuffled, model, order, None)

    files = [canonical, with_metadata, reordered, shuffled]
    assert len({p.read_bytes() for p in files}) == 4  # four different files...
    digests = {file_digest(p) for p in files}
    assert digests == {model_digest(model)}  # ...one model
    for path in files:
        assert model_digest(load_model(path)) == file_digest(path)
        assert_same_model(load_model(path), model)


def test_file_written_by_the_safetensors_library_has_the_same_digest(tmp_path: Path) -> None:
    from safetensors.numpy import save_file as save_numpy
    from safetensors.torch import save_file as save_torch

    # numpy has no bfloat16, and safetensors.numpy cannot save 0-d arrays
    model = {n: t for n, t in sample_model(2).items() if t.dtype is not DType.BF16 and t.shape}
    path = tmp_path / "np.safetensors"
    save_numpy({n: t.array.copy() for n, t in model.items()}, str(path))
    assert file_digest(path) == model_digest(model)

    weights = torch.randn(4, 3).to(torch.bfloat16)
    tpath = tmp_path / "torch.safetensors"
    save_torch({"w": weights}, str(tpath), metadata={"format": "pt"})
    bits = weights.view(torch.int16).numpy().view(np.uint16)
    assert file_digest(tpath) == model_digest({"w": Tensor(DType.BF16, bits)})


def test_digest_ignores_memory_layout_and_byte_order() -> None:
    rng = np.random.default_rng(3)
    array = rng.standard_normal((5, 7)).astype(np.float32)
    transposed = array.T  # a non-contiguous view
    assert not transposed.flags.c_contiguous
    fortran = np.asfortranarray(array)
    base = model_digest({"w": Tensor.of(np.ascontiguousarray(transposed))})
    assert model_digest({"w": Tensor.of(transposed)}) == base
    assert model_digest({"w": Tensor.of(array)}) == model_digest({"w": Tensor.of(fortran)})
    assert model_digest({"w": Tensor.of(array.astype(">f4"))}) == model_digest(
        {"w": Tensor.of(array)}
    )


def test_big_endian_arrays_never_reach_a_file_as_big_endian(tmp_path: Path) -> None:
    """A tensor's bytes are little-endian in the digest and in the file alike."""
    array = np.arange(6, dtype=">f4").reshape(2, 3)
    try:
        tensor = Tensor(DType.F32, array)
    except ModelFormatError:
        return  # refusing a big-endian array is fine too
    path = tmp_path / "be.safetensors"
    save_model(path, {"w": tensor})
    assert file_digest(path) == model_digest({"w": tensor})
    np.testing.assert_array_equal(load_model(path)["w"].array, array)


_CHILD = """
import sys
from diffs.digest import file_digest, model_digest
from diffs.model import load_model
print(file_digest(sys.argv[1]))
print(model_digest(load_model(sys.argv[1])))
"""


def test_digest_is_the_same_in_other_processes(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    model = sample_model(4)
    save_model(path, model)
    here = model_digest(model)
    for hash_seed in ("0", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, str(path)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            timeout=120,
        )
        assert result.stdout.split() == [here, here]


# ---------------------------------------------------------------------------------------
# what it does depend on


def _variants() -> dict[str, dict[str, Tensor]]:
    model = {
        "a": Tensor.of(np.arange(8, dtype=np.uint16).reshape(2, 4)),
        "b": Tensor.of(np.array([1.5, -0.0], dtype=np.float32)),
    }
    a = model["a"].array
    flipped = a.copy()
    flipped.reshape(-1).view(np.uint8)[5] ^= 0x10
    zero = model["b"].array.copy()
    zero[1] = 0.0  # +0.0 and -0.0 differ in their bytes
    return {
        "original": model,
        "renamed": {"a2": model["a"], "b": model["b"]},
        "reordered names": {"b": model["a"], "a": model["b"]},
        "as F16": {"a": Tensor(DType.F16, a.view(np.float16)), "b": model["b"]},
        "as BF16": {"a": Tensor(DType.BF16, a), "b": model["b"]},
        "as I16": {"a": Tensor(DType.I16, a.view(np.int16)), "b": model["b"]},
        "reshaped 4x2": {"a": Tensor.of(a.reshape(4, 2)), "b": model["b"]},
        "reshaped 8": {"a": Tensor.of(a.reshape(8)), "b": model["b"]},
        "reshaped 1x2x4": {"a": Tensor.of(a.reshape(1, 2, 4)), "b": model["b"]},
        "one bit": {"a": Tensor.of(flipped), "b": model["b"]},
        "+0.0": {"a": model["a"], "b": Tensor.of(zero)},
        "removed": {"a": model["a"]},
        "added empty": {**model, "c": Tensor.of(np.zeros(0, np.uint8))},
        "added scalar": {**model, "c": Tensor.of(np.zeros((), np.uint8))},
        "added [1]": {**model, "c": Tensor.of(np.zeros(1, np.uint8))},
        "added [0, 1]": {**model, "c": Tensor.of(np.zeros((0, 1), np.uint8))},
    }


def test_any_change_of_name_dtype_shape_or_byte_changes_the_digest() -> None:
    variants = _variants()
    digests = {label: model_digest(model) for label, model in variants.items()}
    assert len(set(digests.values())) == len(variants), digests
    for label, model in variants.items():
        assert digests[label] == spec_digest(model), label


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), byte=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_every_single_bit_flip_changes_the_digest(seed: int, byte: int, bit: int) -> None:
    model = sample_model(seed % 1000)
    names = [n for n, t in model.items() if t.array.nbytes]
    name = names[byte % len(names)]
    raw = np.array(model[name].array, copy=True)
    flat = raw.reshape(-1).view(np.uint8)
    flat[(byte // len(names)) % flat.size] ^= 1 << bit
    changed = {**model, name: Tensor(model[name].dtype, raw)}
    assert model_digest(changed) != model_digest(model)


def test_file_digest_equals_model_digest_of_the_loaded_file(tmp_path: Path) -> None:
    for seed in range(5):
        model = sample_model(seed)
        path = tmp_path / f"{seed}.safetensors"
        save_model(path, model)
        assert file_digest(path) == model_digest(load_model(path)) == model_digest(model)
        with ModelFile(path) as mf:
            assert model_digest(mf) == file_digest(path)


# ---------------------------------------------------------------------------------------
# torch state_dicts


@pytest.fixture
def bridge() -> ModuleType:
    return pytest.importorskip("diffs.torch_bridge")


def _state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    specials = np.array([0x7FC1, 0xFF81, 0x7F81, 0x0001, 0x8000], np.uint16)  # NaNs, tiny, -0
    nan_payloads = torch.from_numpy(specials.view(np.int16).copy())
    return {
        "w32": torch.randn(4, 5, generator=gen),
        "w16": torch.randn(3, generator=gen).to(torch.float16),
        "wbf16": torch.randn(2, 3, generator=gen).to(torch.bfloat16),
        "bf16_specials": nan_payloads.view(torch.bfloat16),
        "w64": torch.randn(2, generator=gen, dtype=torch.float64),
        "steps": torch.tensor([1, -2, 3], dtype=torch.int64),
        "i32": torch.tensor([[7]], dtype=torch.int32),
        "i16": torch.tensor([-1], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "transposed": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
        "param": torch.nn.Parameter(torch.ones(2)),
    }


def _torch_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def test_from_state_dict_keeps_every_bit_and_dtype(bridge: ModuleType) -> None:
    sd = _state_dict()
    model = bridge.from_state_dict(sd)
    assert sorted(model) == sorted(sd)
    expected_dtypes = {
        torch.float32: DType.F32,
        torch.float16: DType.F16,
        torch.bfloat16: DType.BF16,
        torch.float64: DType.F64,
        torch.int64: DType.I64,
        torch.int32: DType.I32,
        torch.int16: DType.I16,
        torch.int8: DType.I8,
        torch.uint8: DType.U8,
        torch.bool: DType.BOOL,
    }
    for name, t in sd.items():
        got = model[name]
        assert got.dtype is expected_dtypes[t.dtype], name
        assert got.shape == tuple(t.shape), name
        assert got.array.dtype == got.dtype.storage, name
        assert got.layout_bytes == _torch_bytes(t), name
    np.testing.assert_array_equal(
        model["bf16_specials"].array, np.array([0x7FC1, 0xFF81, 0x7F81, 0x0001, 0x8000], np.uint16)
    )
    np.testing.assert_array_equal(model["transposed"].array, np.arange(12).reshape(3, 4).T)


def test_state_dict_round_trip_is_bit_exact(bridge: ModuleType) -> None:
    sd = _state_dict()
    back = bridge.to_state_dict(bridge.from_state_dict(sd))
    assert sorted(back) == sorted(sd)
    for name, t in sd.items():
        assert back[name].dtype == t.dtype, name
        assert tuple(back[name].shape) == tuple(t.shape), name
        assert _torch_bytes(back[name]) == _torch_bytes(t), name
    model = sample_model(5)
    model.pop("é.ünïcode")
    assert_same_model(bridge.from_state_dict(bridge.to_state_dict(model)), model)


def test_state_dict_digest_equals_the_digest_of_its_safetensors_file(
    tmp_path: Path, bridge: ModuleType
) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in _state_dict().items()}
    path = tmp_path / "sd.safetensors"
    save_file(sd, str(path))
    assert model_digest(bridge.from_state_dict(sd)) == file_digest(path)
    assert_same_model(load_model(path), bridge.from_state_dict(sd))


def test_to_state_dict_does_not_share_memory_with_the_model(bridge: ModuleType) -> None:
    model = {"w": Tensor.of(np.zeros(3, np.float32))}
    sd = bridge.to_state_dict(model)
    sd["w"].add_(1.0)
    np.testing.assert_array_equal(model["w"].array, np.zeros(3, np.float32))


def test_bridge_refuses_what_it_cannot_carry(bridge: ModuleType) -> None:
    with pytest.raises(ModelFormatError):
        bridge.from_state_dict({"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ModelFormatError):
        bridge.from_state_dict({"x": [1, 2, 3]})  # type: ignore[dict-item]
