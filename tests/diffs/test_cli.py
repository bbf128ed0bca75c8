"""``diffcast diff make|apply|compose|inspect|verify``, run as a user runs it.

Exit codes: 0 success, 1 a digest mismatch, 2 bad input. A failure prints one line
(``error: ...`` or ``digest mismatch: ...``) and never a Python traceback, and writes no
output file. The terminal is made narrow (``COLUMNS=60``) so that wrapped messages show.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from diffs.container import Diff, DiffReader, write_diff
from diffs.digest import file_digest, model_digest
from diffs.dtypes import DType
from diffs.entries import RemoveEntry
from diffs.model import Tensor, load_model, save_model
from tests.diffs import perturb, random_tensor

DIFFCAST = Path(sys.executable).parent / "diffcast"
pytestmark = pytest.mark.skipif(not DIFFCAST.exists(), reason="diffcast is not installed")


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def diffcast(*args: str | Path, cwd: Path) -> Result:
    env = {**os.environ, "COLUMNS": "60", "TERM": "dumb", "NO_COLOR": "1"}
    proc = subprocess.run(
        [str(DIFFCAST), "diff", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_one_line_failure(result: Result, code: int, prefix: str) -> str:
    assert result.code == code, result
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


@dataclass
class Workspace:
    root: Path
    base: Path
    middle: Path
    target: Path
    other: Path


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    base = {
        "enc.weight": random_tensor(rng, DType.F32, (32, 24)),
        "enc.bias": random_tensor(rng, DType.F16, (64,)),
        "dec.weight": random_tensor(rng, DType.BF16, (16, 16)),
        "steps": random_tensor(rng, DType.I64, (5,)),
        "old": random_tensor(rng, DType.F32, (4,)),
    }
    middle = {name: perturb(rng, t, 0.2) for name, t in base.items()}
    target = {name: perturb(rng, t, 0.5) for name, t in middle.items() if name != "old"}
    target["new"] = random_tensor(rng, DType.F16, (3, 3))
    other = {name: perturb(rng, t, 0.5) for name, t in base.items()}
    paths = {}
    for label, model in (("base", base), ("middle", middle), ("target", target), ("other", other)):
        paths[label] = root / f"{label}.safetensors"
        save_model(paths[label], model)
    return Workspace(root, paths["base"], paths["middle"], paths["target"], paths["other"])


# ---------------------------------------------------------------------------------------
# the happy paths


@pytest.fixture(scope="module")
def exact_diff(ws: Workspace) -> Path:
    path = ws.root / "base-target.diff"
    made = diffcast("make", ws.base, ws.target, "-o", path, cwd=ws.root)
    assert made.code == 0, made
    assert "wrote" in made.stdout
    return path


def test_make_exact_apply_and_verify(ws: Workspace, exact_diff: Path, tmp_path: Path) -> None:
    diff = exact_diff
    out = tmp_path / "out.safetensors"
    applied = diffcast("apply", ws.base, diff, "-o", out, cwd=tmp_path)
    assert applied.code == 0, applied
    digest = file_digest(ws.target)
    assert file_digest(out) == digest
    assert any(line.endswith(digest) for line in applied.stdout.splitlines())  # one line
    verified = diffcast("verify", out, "--expect", digest, cwd=tmp_path)
    assert verified.code == 0, verified
    assert digest in verified.stdout
    chained = diffcast("verify", ws.base, diff, cwd=tmp_path)
    assert chained.code == 0, chained
    assert "ok" in chained.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


@pytest.mark.parametrize(("method", "values"), [("sparse", "f16"), ("hashed", "i8")])
def test_make_approximate_within_budget(
    ws: Workspace, tmp_path: Path, method: str, values: str
) -> None:
    diff = tmp_path / f"{method}.diff"
    made = diffcast(
        "make",
        ws.middle,
        ws.target,
        "-o",
        diff,
        "--method",
        method,
        "--budget",
        "50%",
        "--values",
        values,
        "--level",
        "3",
        cwd=tmp_path,
    )
    assert made.code == 0, made
    assert "relative L2 error" in made.stdout
    fp32_bytes = sum(t.array.size * 4 for t in load_model(ws.target).values())
    assert diff.stat().st_size <= int(fp32_bytes * 0.50)
    out = tmp_path / "out.safetensors"
    applied = diffcast("apply", ws.middle, diff, "-o", out, cwd=tmp_path)
    assert applied.code == 0, applied
    with DiffReader(diff) as reader:
        assert reader.base_digest == file_digest(ws.middle)
        assert file_digest(out) == reader.target_digest


def test_compose_equals_the_chain(ws: Workspace, tmp_path: Path) -> None:
    d1, d2, composed = tmp_path / "1.diff", tmp_path / "2.diff", tmp_path / "c.diff"
    assert diffcast("make", ws.base, ws.middle, "-o", d1, cwd=tmp_path).code == 0
    made = diffcast(
        "make", ws.middle, ws.target, "-o", d2, "--method", "sparse", "--budget", "20%",
        cwd=tmp_path,
    )  # fmt: skip
    assert made.code == 0, made
    result = diffcast("compose", ws.base, d1, d2, "-o", composed, cwd=tmp_path)
    assert result.code == 0, result
    chain_out, composed_out = tmp_path / "chain.safetensors", tmp_path / "comp.safetensors"
    assert diffcast("apply", ws.base, d1, d2, "-o", chain_out, cwd=tmp_path).code == 0
    assert diffcast("apply", ws.base, composed, "-o", composed_out, cwd=tmp_path).code == 0
    assert chain_out.read_bytes() == composed_out.read_bytes()
    with DiffReader(d2) as r2, DiffReader(composed) as rc:
        assert rc.target_digest == r2.target_digest == file_digest(chain_out)
        assert rc.base_digest == file_digest(ws.base)


def test_inspect_json_parses(ws: Workspace, exact_diff: Path, tmp_path: Path) -> None:
    diff = exact_diff
    result = diffcast("inspect", "--json", diff, cwd=tmp_path)
    assert result.code == 0, result
    summary = json.loads(result.stdout)
    with DiffReader(diff) as reader:
        assert summary["base_digest"] == reader.base_digest
        assert summary["target_digest"] == reader.target_digest
        assert [e["tensor"] for e in summary["entries"]] == [s.name for s in reader.specs]
    assert summary["file_bytes"] == diff.stat().st_size
    kinds = {e["tensor"]: e["kind"] for e in summary["entries"]}
    assert kinds["old"] == "remove"
    assert kinds["new"] == "add"
    assert kinds["enc.weight"] == "exact"
    for entry in summary["entries"]:
        assert 0.0 <= entry["density"] <= 1.0
    table = diffcast("inspect", diff, cwd=tmp_path)
    assert table.code == 0, table
    assert "exact" in table.stdout
    assert file_digest(ws.base) in table.stdout


# ---------------------------------------------------------------------------------------
# failures: exit code, one line, no traceback, no output


def _bad_diff(ws: Workspace, exact_diff: Path, kind: str) -> Path:
    path = ws.root / f"bad-{kind}.diff"
    if kind == "model-file":
        path.write_bytes(ws.base.read_bytes())
    elif kind == "random-bytes":
        path.write_bytes(np.random.default_rng(1).bytes(500))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        raw = exact_diff.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "truncated-header":
        path.write_bytes(exact_diff.read_bytes()[:100])
    return path


BAD_DIFFS = ["model-file", "random-bytes", "empty", "truncated", "truncated-header"]
# Every kind of bad diff through apply; a truncated one through every other command too.
BAD_CASES = [(kind, "apply") for kind in BAD_DIFFS] + [
    ("truncated", command) for command in ("verify", "inspect", "compose")
]


@pytest.mark.parametrize(("kind", "command"), BAD_CASES)
def test_bad_diff_is_a_one_line_error(
    ws: Workspace, exact_diff: Path, tmp_path: Path, kind: str, command: str
) -> None:
    bad = _bad_diff(ws, exact_diff, kind)
    out = tmp_path / "out"
    if command == "apply":
        result = diffcast("apply", ws.base, bad, "-o", out, cwd=tmp_path)
    elif command == "compose":
        result = diffcast("compose", ws.base, bad, "-o", out, cwd=tmp_path)
    elif command == "verify":
        result = diffcast("verify", ws.base, bad, cwd=tmp_path)
    else:
        result = diffcast("inspect", bad, cwd=tmp_path)
    assert_one_line_failure(result, 2, "error:")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["apply", "compose", "verify"])
def test_wrong_base_is_a_digest_mismatch(
    ws: Workspace, exact_diff: Path, tmp_path: Path, command: str
) -> None:
    out = tmp_path / "out"
    if command == "verify":
        result = diffcast("verify", ws.other, exact_diff, cwd=tmp_path)
    else:
        result = diffcast(command, ws.other, exact_diff, "-o", out, cwd=tmp_path)
    line = assert_one_line_failure(result, 1, "digest mismatch:")
    assert file_digest(ws.other) in line
    assert list(tmp_path.iterdir()) == []


def test_wrong_expected_digest(ws: Workspace, tmp_path: Path) -> None:
    wrong = "sha256:" + "0" * 64
    result = diffcast("verify", ws.base, "--expect", wrong, cwd=tmp_path)
    line = assert_one_line_failure(result, 1, "digest mismatch:")
    assert wrong in line


def test_wrong_declared_target(ws: Workspace, tmp_path: Path) -> None:
    model = load_model(ws.base)
    lying = tmp_path / "lying.diff"
    entry = RemoveEntry("old", DType.F32, (4,))
    write_diff(lying, Diff(model_digest(model), "sha256:" + "2" * 64, [entry]))
    out = tmp_path / "out.safetensors"
    result = diffcast("apply", ws.base, lying, "-o", out, cwd=tmp_path)
    assert_one_line_failure(result, 1, "digest mismatch:")
    assert not out.exists()


@pytest.mark.parametrize("command", ["make", "apply"])
def test_bad_model_file_is_a_one_line_error(
    ws: Workspace, exact_diff: Path, tmp_path: Path, command: str
) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    out = tmp_path / "out"
    if command == "make":
        result = diffcast("make", junk, ws.target, "-o", out, cwd=tmp_path)
    else:
        result = diffcast("apply", junk, exact_diff, "-o", out, cwd=tmp_path)
    assert_one_line_failure(result, 2, "error:")
    assert not out.exists()


def test_names_that_look_like_markup_are_printed_verbatim(tmp_path: Path) -> None:
    """A diff's tensor names are arbitrary text: rich markup in them must not break output."""
    model = {"w": Tensor.of(np.zeros(3, np.float32))}
    base = tmp_path / "base.safetensors"
    save_model(base, model)
    odd = "x[/bold] [red]y"
    diff = tmp_path / "odd.diff"
    write_diff(
        diff, Diff(model_digest(model), model_digest({}), [RemoveEntry(odd, DType.F32, (3,))])
    )
    inspected = diffcast("inspect", diff, cwd=tmp_path)
    assert inspected.code == 0, inspected
    as_json = diffcast("inspect", "--json", diff, cwd=tmp_path)
    assert json.loads(as_json.stdout)["entries"][0]["tensor"] == odd
    out = tmp_path / "out.safetensors"
    result = diffcast("apply", base, diff, "-o", out, cwd=tmp_path)
    line = assert_one_line_failure(result, 2, "error:")
    assert odd in line  # the missing tensor's name, as it is
    assert not out.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["make", "{base}", "{target}", "-o", "{out}", "--method", "sparse"],  # no budget
        ["make", "{base}", "{target}", "-o", "{out}", "--method", "hashed", "--budget", "0%"],
        ["apply", "{base}", "missing.diff", "-o", "{out}"],
        ["inspect", "{root}"],  # a directory
    ],
)
def test_usage_errors_exit_2_without_traceback(
    ws: Workspace, tmp_path: Path, args: list[str]
) -> None:
    fields = {"base": ws.base, "target": ws.target, "out": tmp_path / "out", "root": ws.root}
    result = diffcast(*(a.format(**fields) for a in args), cwd=tmp_path)
    assert result.code == 2, result
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()
