"""Golden bytes: a tiny diff whose exact file is committed as ``golden/tiny.diff``.

Any change to the encoding -- manifest JSON, section names or order, header padding,
position coding, value or XOR codecs, the digest definition, the apply arithmetic (the
target digest is computed by applying the diff) -- changes these bytes and fails
:func:`test_encoding_matches_the_golden_file`. If the change is intended, bump the format
version where old files no longer decode, and regenerate the file::

    DIFFCAST_REGEN_GOLDEN=1 .venv/bin/pytest tests/diffs/test_golden.py

The committed file must keep decoding to the same entries whatever the encoder does
(:func:`test_golden_file_decodes_to_the_tiny_diff`), and must stay a valid safetensors
file for the ``safetensors`` package.

One section is Zstandard-compressed (the XOR patterns): a new ``zstandard`` release could
in principle compress it to other bytes at the same level; the decoding tests catch a real
break, and regenerating is then the fix.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from pathlib import Path

import numpy as np

from diffs.chain import apply_chain
from diffs.container import Diff, DiffReader, EncodeOptions, diff_bytes
from diffs.digest import model_digest
from diffs.dtypes import DType
from diffs.entries import Entry, ExactEntry, RemoveEntry, SparseEntry, apply_entry
from diffs.model import Tensor
from diffs.values import Codec, ValueFormat, Values
from tests.diffs import assert_same_diff

GOLDEN = Path(__file__).parent / "golden" / "tiny.diff"
OPTIONS = EncodeOptions(zstd_level=19, position_block_log2=12)
REGENERATE = os.environ.get("DIFFCAST_REGEN_GOLDEN") == "1"


def tiny_base() -> dict[str, Tensor]:
    """Three small tensors with values that need no random generator."""
    return {
        "a.weight": Tensor.of((np.arange(32, dtype=np.float32) / 8).reshape(4, 8)),
        "b.bias": Tensor.of(np.arange(64, dtype=np.float16) / np.float16(16)),
        "c.old": Tensor.of(np.array([1, 2, 3], dtype=np.int32)),
    }


def tiny_entries() -> list[Entry]:
    return [
        SparseEntry(
            "a.weight",
            DType.F32,
            (4, 8),
            np.array([0, 5, 17, 31], dtype=np.int64),
            Values(ValueFormat.F16, np.array([0.5, -1.25, 2.0, 0.125], dtype="<f2")),
        ),
        ExactEntry(
            "b.bias",
            DType.F16,
            (64,),
            np.arange(1, 64, 2, dtype=np.int64),  # every other element...
            np.full(32, 0x0001, dtype="<u2"),  # ...its last mantissa bit flipped
        ),
        RemoveEntry("c.old", DType.I32, (3,)),
    ]


def tiny_diff() -> Diff:
    """The golden diff: its target digest is the base's with the entries applied."""
    base = tiny_base()
    result: dict[str, Tensor] = dict(base)
    for entry in tiny_entries():
        after = apply_entry(result.get(entry.name), entry)
        if after is None:
            del result[entry.name]
        else:
            result[entry.name] = after
    return Diff(model_digest(base), model_digest(result), tiny_entries(), {"method": "golden"})


def test_encoding_matches_the_golden_file() -> None:
    encoded = diff_bytes(tiny_diff(), OPTIONS)
    if REGENERATE:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_bytes(encoded)
    assert GOLDEN.exists(), "run with DIFFCAST_REGEN_GOLDEN=1 to create the golden file"
    assert encoded == GOLDEN.read_bytes(), (
        "the diff encoding changed; if intended, regenerate with DIFFCAST_REGEN_GOLDEN=1"
    )


def test_golden_file_decodes_to_the_tiny_diff() -> None:
    with DiffReader(GOLDEN) as reader:
        got = reader.read()
        specs = reader.specs
        assert [s.kind for s in specs] == ["sparse", "exact", "remove"]
        assert specs[0].values is not None
        assert specs[0].values.codec is Codec.RAW
        assert specs[1].codec in (Codec.ZSTD, Codec.SHUFFLE)  # the compressed section
        assert reader.section_sizes(2) == {}
    assert_same_diff(got, tiny_diff())
    # the literal contents, independent of the generator above
    sparse, exact, remove = got.entries
    assert isinstance(sparse, SparseEntry)
    assert sparse.positions.tolist() == [0, 5, 17, 31]
    assert sparse.values.widened().tolist() == [0.5, -1.25, 2.0, 0.125]
    assert isinstance(exact, ExactEntry)
    assert exact.positions.tolist() == list(range(1, 64, 2))
    assert exact.xor.tolist() == [1] * 32
    assert remove == RemoveEntry("c.old", DType.I32, (3,))
    assert got.info == {"method": "golden"}


def test_golden_file_applies_to_its_base() -> None:
    base = tiny_base()
    with DiffReader(GOLDEN) as reader:
        assert reader.base_digest == model_digest(base)
        result = apply_chain(base, [reader])  # checks the declared target digest
    assert sorted(result) == ["a.weight", "b.bias"]
    weight = result["a.weight"].array.reshape(-1)
    assert weight[[0, 5, 17, 31]].tolist() == [0.5, 5 / 8 - 1.25, 17 / 8 + 2.0, 31 / 8 + 0.125]
    bias = result["b.bias"].array.view(np.uint16)
    original = base["b.bias"].array.view(np.uint16)
    np.testing.assert_array_equal(bias[1::2], original[1::2] ^ 1)
    np.testing.assert_array_equal(bias[0::2], original[0::2])


def test_golden_file_is_a_valid_safetensors_file() -> None:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    sections = load_file(str(GOLDEN))
    expected = {"e0.positions", "e0.values", "e1.positions", "e1.xor"}
    assert set(sections) == expected
    with DiffReader(GOLDEN) as reader:
        for name, array in sections.items():
            assert array.dtype == np.uint8
            assert array.ndim == 1
            index, part = name[1:].split(".")
            assert array.tobytes() == bytes(reader.section(int(index), part))
    with safe_open(str(GOLDEN), framework="numpy") as f:
        assert set(f.keys()) == expected
        metadata = f.metadata()
    assert metadata["format"] == "diffcast.diff"
    assert metadata["format_version"] == "1"
    diff = tiny_diff()
    assert metadata["base_digest"] == diff.base_digest
    assert metadata["target_digest"] == diff.target_digest
    assert [e["tensor"] for e in json.loads(metadata["entries"])] == ["a.weight", "b.bias", "c.old"]
    assert json.loads(metadata["info"]) == {"method": "golden"}


def test_golden_file_header_is_canonical() -> None:
    raw = GOLDEN.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert (8 + length) % 8 == 0  # padded to a multiple of 8 bytes
    header = raw[8 : 8 + length]
    assert header.rstrip(b" ").endswith(b"}")
    parsed = json.loads(header)
    names = [k for k in parsed if k != "__metadata__"]
    assert names == sorted(names, key=lambda n: n.encode())
    offsets = [parsed[n]["data_offsets"] for n in names]
    assert offsets[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(offsets))
    assert offsets[-1][1] == len(raw) - 8 - length  # the sections tile the buffer
