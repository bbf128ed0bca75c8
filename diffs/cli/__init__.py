"""The ``diffcast`` command: a root that mounts each package's sub-commands.

Sub-command groups register under the ``diffcast.commands`` entry-point group (see
``pyproject.toml``), so this root never imports the packages that provide them.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import typer

app = typer.Typer(
    name="diffcast",
    help="Over-the-air updates of on-device speech models as small neural diffs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _mount() -> None:
    for ep in sorted(entry_points(group="diffcast.commands"), key=lambda e: e.name):
        sub = ep.load()
        app.add_typer(sub, name=ep.name)


def main() -> None:
    _mount()
    app()
