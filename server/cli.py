"""``diffcast server`` (run, migrate), ``diffcast keys`` (init, rotate) and the operator
commands ``diffcast model`` / ``diffcast version`` / ``diffcast token`` (over REST)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import httpx
import typer
from rich.console import Console
from rich.table import Table

from server.settings import Settings

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")

server_app = typer.Typer(
    help="Run the update server and manage its database.", no_args_is_help=True
)
keys_app = typer.Typer(help="Generate and rotate the signing keys.", no_args_is_help=True)
model_app = typer.Typer(help="Create and list models (operator, over REST).", no_args_is_help=True)
version_app = typer.Typer(help="Publish, list, inspect and retire versions.", no_args_is_help=True)
token_app = typer.Typer(help="Create, list and revoke operator API tokens.", no_args_is_help=True)

ServerUrl = Annotated[
    str, typer.Option("--server", envvar="DIFFCAST_SERVER", help="Server base URL")
]
Token = Annotated[str, typer.Option("--token", envvar="DIFFCAST_TOKEN", help="Operator API token")]


@server_app.command("run")
def run(
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8080,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes")] = 1,
    migrate: Annotated[bool, typer.Option(help="Apply migrations first")] = True,
) -> None:
    """Run the server (embedded default: SQLite + local blobs under ./var)."""
    import uvicorn

    settings = Settings()
    if migrate:
        _migrate(settings)
    uvicorn.run(
        "server.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        access_log=False,
    )


def _migrate(settings: Settings) -> None:
    from server.migrate import upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url())


@server_app.command("migrate")
def migrate_command(
    revision: Annotated[str, typer.Argument(help="Target revision")] = "head",
    downgrade: Annotated[bool, typer.Option(help="Downgrade to REVISION instead")] = False,
) -> None:
    """Apply (or revert) the database migrations."""
    from server import migrate

    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url()
    if downgrade:
        migrate.downgrade(url, revision)
    else:
        migrate.upgrade(url, revision)
    out.print(f"database at {revision}: {_redact(url)}")


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


@keys_app.command("init")
def keys_init(
    online_dir: Annotated[
        Path | None, typer.Option(help="Online keys (default <data_dir>/keys/online)")
    ] = None,
    root_dir: Annotated[
        Path | None, typer.Option(help="Offline root keys (default <data_dir>/keys/root)")
    ] = None,
    root_keys: Annotated[int, typer.Option(min=1, help="Number of root keys")] = 1,
    threshold: Annotated[int, typer.Option(min=1, help="Root signature threshold")] = 1,
) -> None:
    """Generate root (offline) and online signing keys, and root metadata v1."""
    from server.trust.keys import init_keys

    settings = Settings()
    online = online_dir or settings.resolved_keys_dir() / "online"
    root = root_dir or settings.resolved_keys_dir() / "root"
    if (online / "1.root.json").exists():
        err.print(f"[red]error:[/red] keys already exist in {online}; use 'diffcast keys rotate'")
        raise typer.Exit(2)
    init_keys(
        online, root, now=datetime.now(UTC), root_key_count=root_keys, root_threshold=threshold
    )
    out.print(f"online keys in {online}; root keys in {root} -- move the root keys offline")


@keys_app.command("rotate-root")
def keys_rotate_root(
    server: ServerUrl,
    token: Token,
    root_dir: Annotated[
        Path, typer.Option(exists=True, file_okay=False, help="The current root keys")
    ],
    new_root_dir: Annotated[
        Path, typer.Option(help="Where to write the new root keys (must not exist)")
    ],
    root_keys: Annotated[int, typer.Option(min=1, help="Number of new root keys")] = 1,
    threshold: Annotated[int, typer.Option(min=1, help="New root signature threshold")] = 1,
) -> None:
    """Replace the root keys: sign root N+1 with the old and new keys, then publish it."""
    from server.trust.keys import generate_root_keys, load_root_keys, rotate_root, write_root_keys

    if new_root_dir.exists():
        err.print(f"[red]error:[/red] {new_root_dir} exists; root keys are never overwritten")
        raise typer.Exit(2)
    if threshold > root_keys:
        err.print("[red]error:[/red] the threshold cannot exceed the number of keys")
        raise typer.Exit(2)
    with _client(server, token) as client:
        current = client.get("/tuf/root.json")
        if current.status_code != 200:
            err.print(
                f"[red]error:[/red] cannot fetch the current root: HTTP {current.status_code}"
            )
            raise typer.Exit(2)
        new_keys = generate_root_keys(root_keys, threshold)
        new_root = rotate_root(
            current.content, load_root_keys(root_dir), new_keys, now=datetime.now(UTC)
        )
        write_root_keys(new_root_dir, new_keys)
        _call(
            lambda: client.post(
                "/v1/trust/root", content=new_root, headers={"Content-Type": "application/json"}
            )
        )
    version = json.loads(new_root)["signed"]["version"]
    out.print(f"published root v{version}; new root keys in {new_root_dir} -- move them offline")


def _client(server: str, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server, headers=headers, timeout=httpx.Timeout(30.0, read=600.0))


def _call(action: Callable[[], httpx.Response]) -> Any:
    """Run a request; print the server's error message and exit 2 on failure."""
    try:
        response = action()
    except httpx.HTTPError as exc:
        err.print(f"[red]error:[/red] cannot reach the server: {exc}")
        raise typer.Exit(2) from None
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        err.print(f"[red]error:[/red] {response.status_code}: {message}")
        raise typer.Exit(2)
    return response.json() if response.content else None


@model_app.command("create")
def model_create(
    name: str, server: ServerUrl, token: Token, description: Annotated[str, typer.Option()] = ""
) -> None:
    """Create a model."""
    with _client(server, token) as client:
        _call(lambda: client.post("/v1/models", json={"name": name, "description": description}))
    out.print(f"created model {name}")


@model_app.command("list")
def model_list(server: ServerUrl, token: Token) -> None:
    """List models."""
    with _client(server, token) as client:
        rows = _call(lambda: client.get("/v1/models"))
    table = Table("model", "versions", "latest", "description")
    for row in rows:
        table.add_row(row["name"], str(row["versions"]), str(row["latest"]), row["description"])
    out.print(table)


@version_app.command("publish")
def version_publish(
    model: str,
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="A safetensors model, or a diff")
    ],
    server: ServerUrl,
    token: Token,
    parent: Annotated[int | None, typer.Option(help="Parent version (FILE is a diff)")] = None,
    notes: Annotated[str, typer.Option()] = "",
    method: Annotated[str, typer.Option()] = "",
) -> None:
    """Publish a base model, or a diff against --parent."""
    params: dict[str, Any] = {"notes": notes, "method": method}
    if parent is not None:
        params["parent"] = parent
    size = file.stat().st_size

    def send() -> httpx.Response:
        with open(file, "rb") as body, _client(server, token) as client:
            return client.post(
                f"/v1/models/{model}/versions",
                params=params,
                content=body,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            )

    with err.status(f"uploading {file.name} ({size:,} bytes)"):
        version = _call(send)
    state = "published" if version["created"] else "already published as"
    out.print(f"{state} {model} version {version['version']}: {version['digest']}")


@version_app.command("list")
def version_list(model: str, server: ServerUrl, token: Token, as_json: bool = False) -> None:
    """List a model's versions."""
    with _client(server, token) as client:
        rows = _call(lambda: client.get(f"/v1/models/{model}/versions"))
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(
        "version", "parent", "snapshot bytes", "diff bytes", "method", "retired", "digest"
    )
    for r in rows:
        table.add_row(
            str(r["version"]),
            str(r["parent"] if r["parent"] is not None else ""),
            f"{r['snapshot_size']:,}",
            f"{r['diff_size']:,}" if r["diff_size"] else "",
            r["method"],
            "yes" if r["retired"] else "",
            r["digest"][:23] + "…",
        )
    out.print(table)


@version_app.command("show")
def version_show(model: str, version: int, server: ServerUrl, token: Token) -> None:
    """Show one version as JSON."""
    with _client(server, token) as client:
        out.print_json(
            json.dumps(_call(lambda: client.get(f"/v1/models/{model}/versions/{version}")))
        )


@version_app.command("retire")
def version_retire(model: str, version: int, server: ServerUrl, token: Token) -> None:
    """Retire a version (devices stop being offered it)."""
    with _client(server, token) as client:
        _call(
            lambda: client.patch(f"/v1/models/{model}/versions/{version}", json={"retired": True})
        )
    out.print(f"retired {model} version {version}")


@token_app.command("create")
def token_create(
    name: str,
    server: ServerUrl,
    token: Token,
    scope: Annotated[list[str], typer.Option(help="read, publish or admin (repeatable)")],
) -> None:
    """Create an API token (printed once)."""
    with _client(server, token) as client:
        row = _call(lambda: client.post("/v1/tokens", json={"name": name, "scopes": scope}))
    out.print(row["token"])


release_app = typer.Typer(
    help="Create and steer releases (operator, over REST).", no_args_is_help=True
)


def _release_row(table: Table, r: dict[str, Any]) -> None:
    progress = r.get("progress") or {}
    table.add_row(
        str(r["id"]),
        r["name"],
        f"{r['model']} v{r['version']}" + (" (rollback)" if r["rollback"] else ""),
        r["state"],
        f"{r['percent']:g}%",
        f"{progress.get('applied', 0)}/{progress.get('started', 0)}",
        str(progress.get("failed", 0)),
        r.get("halt_reason") or "",
    )


def _release_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("id", "name", "target", "state", "rollout", "applied/started", "failed", "note")
    for row in rows:
        _release_row(table, row)
    return table


@release_app.command("create")
def release_create(
    model: str,
    version: int,
    server: ServerUrl,
    token: Token,
    name: Annotated[str, typer.Option()] = "",
    tag: Annotated[
        list[str] | None, typer.Option(help="Selector tag key=value (repeatable)")
    ] = None,
    device: Annotated[
        list[str] | None, typer.Option(help="Explicit device id (repeatable)")
    ] = None,
    percent: Annotated[float, typer.Option(min=0, max=100, help="Rollout percentage")] = 100.0,
    rate: Annotated[int | None, typer.Option(min=1, help="Devices starting per minute")] = None,
    failure_threshold: Annotated[float, typer.Option(help="Halt above this failure ratio")] = 0.2,
    min_attempts: Annotated[
        int, typer.Option(min=1, help="Attempts before halting may trigger")
    ] = 5,
    max_wer_regression: Annotated[
        float | None, typer.Option(help="Quality gate per cohort")
    ] = None,
    activate: Annotated[bool, typer.Option(help="Activate at once")] = False,
) -> None:
    """Create a release of MODEL VERSION for the devices the selector picks."""
    tags: dict[str, list[str]] = {}
    for item in tag or []:
        key, _, value = item.partition("=")
        tags.setdefault(key, []).append(value)
    body = {
        "model": model,
        "version": version,
        "name": name,
        "selector": {"tags": tags, "devices": device or []},
        "percent": percent,
        "rate_per_minute": rate,
        "failure_threshold": failure_threshold,
        "min_attempts": min_attempts,
        "max_wer_regression": max_wer_regression,
        "activate": activate,
    }
    with _client(server, token) as client:
        row = _call(lambda: client.post("/v1/releases", json=body))
    out.print(_release_table([row]))


@release_app.command("rollback")
def release_rollback(
    model: str,
    version: Annotated[int, typer.Option("--to", help="The earlier version to go back to")],
    server: ServerUrl,
    token: Token,
    tag: Annotated[
        list[str] | None, typer.Option(help="Selector tag key=value (repeatable)")
    ] = None,
) -> None:
    """An explicit, signed rollback of MODEL to an earlier version (activated at once)."""
    tags: dict[str, list[str]] = {}
    for item in tag or []:
        key, _, value = item.partition("=")
        tags.setdefault(key, []).append(value)
    body = {
        "model": model,
        "version": version,
        "rollback": True,
        "activate": True,
        "selector": {"tags": tags},
    }
    with _client(server, token) as client:
        row = _call(lambda: client.post("/v1/releases", json=body))
    out.print(_release_table([row]))


@release_app.command("list")
def release_list(
    server: ServerUrl,
    token: Token,
    model: Annotated[str | None, typer.Option()] = None,
    state: Annotated[str | None, typer.Option()] = None,
) -> None:
    """List releases with their progress."""
    params = {k: v for k, v in {"model": model, "state": state}.items() if v}
    with _client(server, token) as client:
        rows = _call(lambda: client.get("/v1/releases", params=params))
    out.print(_release_table(rows))


@release_app.command("show")
def release_show(release_id: int, server: ServerUrl, token: Token) -> None:
    """Show one release as JSON (with progress and failures by reason)."""
    with _client(server, token) as client:
        out.print_json(json.dumps(_call(lambda: client.get(f"/v1/releases/{release_id}"))))


def _action(action: str) -> Callable[..., None]:
    def command(
        release_id: int,
        server: ServerUrl,
        token: Token,
        reason: Annotated[str | None, typer.Option(help="Why (kept in the audit log)")] = None,
    ) -> None:
        body = {"reason": reason} if reason else None
        with _client(server, token) as client:
            row = _call(lambda: client.post(f"/v1/releases/{release_id}/{action}", json=body))
        out.print(_release_table([row]))

    command.__doc__ = f"{action.capitalize()} a release."
    return command


for _name in ("activate", "pause", "resume", "halt", "complete"):
    release_app.command(_name)(_action(_name))


@release_app.command("canary")
def release_canary(
    release_id: int,
    file: Annotated[
        Path,
        typer.Argument(
            exists=True, dir_okay=False, help="A canary bundle (diffcast asr canary makes one)"
        ),
    ],
    server: ServerUrl,
    token: Token,
) -> None:
    """Attach a canary bundle to a release: devices decode its clips with the new model
    before switching, and refuse the model if its WER is above the bundle's bound."""
    size = file.stat().st_size

    def send() -> httpx.Response:
        with open(file, "rb") as body, _client(server, token) as client:
            return client.put(
                f"/v1/releases/{release_id}/canary",
                content=body,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            )

    with err.status(f"uploading {file.name} ({size:,} bytes)"):
        row = _call(send)
    canary = row["canary"]
    out.print(
        f"release {row['id']} ({row['model']} v{row['version']}): canary {canary['sha256'][:12]} "
        f"with {canary['clips']} clips, WER bound {canary['max_wer']:g}"
    )


@release_app.command("expand")
def release_expand(release_id: int, percent: float, server: ServerUrl, token: Token) -> None:
    """Raise a release's rollout percentage (it never shrinks)."""
    with _client(server, token) as client:
        row = _call(
            lambda: client.post(f"/v1/releases/{release_id}/expand", json={"percent": percent})
        )
    out.print(_release_table([row]))
