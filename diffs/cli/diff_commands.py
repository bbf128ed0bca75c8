"""``diffcast diff``: make, apply, compose, inspect and verify model diffs (and say
which kernels run)."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape  # names and messages may hold "[/x]", which rich would parse
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from diffs.compose import compose as compose_chain
from diffs.container import DiffReader, EncodeOptions, write_diff
from diffs.describe import summarize
from diffs.digest import file_digest
from diffs.errors import DiffError, DigestMismatchError
from diffs.kernels import describe
from diffs.make import ApproxReport, make_exact, make_hashed, make_sparse
from diffs.model import ModelFile
from diffs.patch_file import apply_to_file, open_chain
from diffs.values import ValueFormat

app = typer.Typer(
    help="Make, apply, compose, inspect and verify model diffs.", no_args_is_help=True
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")

ExistingFile = Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)]


class Method(StrEnum):
    exact = "exact"
    sparse = "sparse"
    hashed = "hashed"


class Values(StrEnum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    i8 = "i8"


def _run(action: Callable[[], T]) -> T:
    """Run ``action``; turn the package's errors into a message and exit code 2."""
    try:
        return action()
    except DigestMismatchError as exc:
        err.print(f"[red]digest mismatch:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    except DiffError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    except OSError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc.filename or ''))}: {exc.strerror}")
        raise typer.Exit(2) from None


_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(%|b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 10**6, "mib": 2**20, "gb": 10**9, "gib": 2**30}


def parse_budget(text: str, model_fp32_bytes: int) -> int:
    """``"2%"`` of the model's fp32 size, or a byte count such as ``"1.5MB"``."""
    match = _BUDGET.match(text)
    if not match:
        raise typer.BadParameter(f"{text!r}: give a percentage (2%) or a size (150KB, 1.5MB)")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower()
    if unit == "%":
        if not 0 < number <= 100:
            raise typer.BadParameter("a percentage budget must be in (0, 100]")
        return int(model_fp32_bytes * number / 100)
    return int(number * _UNITS[unit])


@contextmanager
def _progress(description: str) -> Iterator[Callable[[int, int], None]]:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@app.command()
def make(
    base: ExistingFile,
    target: ExistingFile,
    output: Annotated[Path, typer.Option("--output", "-o", help="Diff file to write")],
    method: Annotated[
        Method, typer.Option(help="exact (lossless) or an approximation")
    ] = Method.exact,
    budget: Annotated[
        str | None,
        typer.Option(help="Size budget for sparse/hashed: '2%' of the fp32 model, or '150KB'"),
    ] = None,
    values: Annotated[
        Values, typer.Option(help="Value format of sparse/hashed deltas")
    ] = Values.f16,
    seed: Annotated[int, typer.Option(help="Hash seed (hashed method)")] = 0,
    level: Annotated[int, typer.Option(min=1, max=22, help="Zstandard level")] = 19,
) -> None:
    """Make a diff that turns BASE into TARGET (exactly, or approximately within a budget)."""
    if method is not Method.exact and budget is None:
        raise typer.BadParameter("--budget is required with --method sparse or hashed")
    options = EncodeOptions(zstd_level=level)

    def action() -> ApproxReport | None:
        with ModelFile(base) as b, ModelFile(target) as t:
            if method is Method.exact:
                write_diff(output, make_exact(b, t), options)
                return None
            fp32_bytes = sum(info.numel * 4 for info in t.infos.values())
            size = parse_budget(budget or "", fp32_bytes)
            fmt = ValueFormat(values.value)
            if method is Method.sparse:
                diff, report = make_sparse(b, t, size, fmt, options=options)
            else:
                diff, report = make_hashed(b, t, size, fmt, seed=seed, options=options)
            write_diff(output, diff, options)
            return report

    with err.status(f"making {method.value} diff"):
        report = _run(action)
    out.print(f"wrote {escape(str(output))} ({output.stat().st_size:,} bytes)")
    if report is not None:
        out.print(
            f"kept {report.kept:,} of {report.changed:,} changed elements"
            f" ({report.method}); relative L2 error {report.rel_l2_error:.4f},"
            f" max abs error {report.max_abs_error:.3g}"
        )
        if report.encoded_bytes > report.budget_bytes:
            err.print(
                f"[yellow]warning:[/yellow] the smallest diff this method can make is "
                f"{report.encoded_bytes:,} bytes, above the budget of {report.budget_bytes:,}"
            )


@app.command()
def apply(
    base: ExistingFile,
    diffs: Annotated[
        list[Path], typer.Argument(exists=True, dir_okay=False, help="Diffs, in order")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Model file to write")],
) -> None:
    """Apply one diff or a chain to BASE, checking every digest, and write the result."""

    def action() -> str:
        readers = open_chain(diffs)
        try:
            with _progress("applying") as progress:
                return apply_to_file(base, readers, output, progress=progress)
        finally:
            for reader in readers:
                reader.close()

    digest = _run(action)
    out.print(f"wrote {escape(str(output))}: {digest}")


@app.command()
def compose(
    base: ExistingFile,
    diffs: Annotated[
        list[Path], typer.Argument(exists=True, dir_okay=False, help="Diffs, in order")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Composed diff to write")],
    level: Annotated[int, typer.Option(min=1, max=22, help="Zstandard level")] = 19,
) -> None:
    """Compose a chain BASE -> ... into one exact diff, bit-identical to the chain."""

    def action() -> None:
        readers = open_chain(diffs)
        try:
            with ModelFile(base) as model:
                write_diff(output, compose_chain(model, readers), EncodeOptions(zstd_level=level))
        finally:
            for reader in readers:
                reader.close()

    with err.status("composing"):
        _run(action)
    out.print(f"wrote {escape(str(output))} ({output.stat().st_size:,} bytes)")


@app.command()
def inspect(
    diff: ExistingFile,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
) -> None:
    """Summarize a diff: kinds, densities, bytes per tensor, position bytes vs the bound."""

    def action() -> None:
        with DiffReader(diff) as reader:
            summary = summarize(reader, diff.stat().st_size)
        if as_json:
            out.print_json(json.dumps(summary.to_json()))
            return
        out.print(f"[bold]{escape(diff.name)}[/bold]  {summary.file_bytes:,} bytes")
        out.print(f"base   {summary.base_digest}\ntarget {summary.target_digest}")
        if summary.info:
            out.print("info   " + escape(json.dumps(summary.info, sort_keys=True)))
        table = Table(
            "tensor", "kind", "dtype", "shape", "changed", "density", "bytes", "pos/bound"
        )
        for e in summary.entries:
            ratio = e.position_ratio
            table.add_row(
                escape(e.tensor),
                e.kind,
                e.dtype,
                "x".join(map(str, e.shape)) or "scalar",
                f"{e.changed:,}",
                f"{e.density:.2%}",
                f"{e.bytes:,}",
                "" if ratio is None else f"{ratio:.3f}",
            )
        out.print(table)

    _run(action)


@app.command()
def verify(
    model: ExistingFile,
    diffs: Annotated[
        list[Path] | None,
        typer.Argument(exists=True, dir_okay=False, help="Diffs to check against MODEL"),
    ] = None,
    expect: Annotated[str | None, typer.Option(help="The digest MODEL must have")] = None,
) -> None:
    """Print MODEL's canonical digest; check it against --expect, and check that the
    DIFFS apply to it in order, reaching each declared target."""

    def action() -> None:
        digest = file_digest(model)
        out.print(f"{escape(str(model))}: {digest}")
        if expect is not None and digest != expect:
            raise DigestMismatchError(
                f"{model} is {digest}, expected {expect}", expected=expect, actual=digest
            )
        if diffs:
            readers = open_chain(diffs)
            try:
                with tempfile.TemporaryDirectory(dir=model.parent) as tmp:
                    apply_to_file(
                        model, readers, Path(tmp) / "result.safetensors", base_digest=digest
                    )
            finally:
                for reader in readers:
                    reader.close()
            for path, reader in zip(diffs, readers, strict=True):
                out.print(f"{escape(str(path))}: reaches {reader.target_digest} [green]ok[/green]")

    _run(action)


@app.command()
def kernels() -> None:
    """Say which code decodes and applies diffs here: the compiled kernels or numpy."""
    out.print(describe())


def _mount_extensions() -> None:
    """Commands that other packages add to ``diffcast diff`` (``train``, from ``asr``).

    They register under the ``diffcast.diff_commands`` entry-point group, so this module
    never imports them by name.
    """
    for ep in sorted(entry_points(group="diffcast.diff_commands"), key=lambda e: e.name):
        app.command(ep.name)(ep.load())


_mount_extensions()
