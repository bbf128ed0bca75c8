"""``diffcast agent`` (provision, run) and ``diffcast fleet`` (simulate, status)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from device_agent.agent import Agent
from device_agent.config import AgentConfig
from device_agent.errors import AgentError
from device_agent.fleet import simulate
from device_agent.health import MaxAbsHealthCheck
from device_agent.provision import provision as provision_state

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
agent_app = typer.Typer(help="Run the device agent.", no_args_is_help=True)
fleet_app = typer.Typer(help="Simulate a fleet of devices.", no_args_is_help=True)

ServerUrl = Annotated[
    str, typer.Option("--server", envvar="DIFFCAST_SERVER", help="Server base URL")
]
StateDirOpt = Annotated[Path, typer.Option("--state-dir", help="The device's state directory")]
FallbackServers = Annotated[
    list[str] | None,
    typer.Option(
        "--fallback-server",
        help="Another replica of the server, used when the current one cannot be reached "
        "(repeatable)",
    ),
]


@agent_app.command("provision")
def provision(
    state_dir: StateDirOpt,
    bundle: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, help="Provisioning bundle JSON")
    ],
    device_id: Annotated[
        str | None, typer.Option(help="Device id (default: the server assigns one)")
    ] = None,
    tag: Annotated[list[str] | None, typer.Option(help="Tag key=value (repeatable)")] = None,
    initial_model: Annotated[Path | None, typer.Option(exists=True, dir_okay=False)] = None,
    model: Annotated[str | None, typer.Option(help="Model name of --initial-model")] = None,
    version: Annotated[int | None, typer.Option(help="Version of --initial-model")] = None,
) -> None:
    """Prepare a state directory from a provisioning bundle (and a factory model)."""
    tags = dict(t.split("=", 1) for t in tag or [] if "=" in t)
    provision_state(
        state_dir,
        json.loads(bundle.read_text()),
        device_id=device_id,
        tags=tags,
        initial_model=initial_model,
        model_name=model,
        initial_version=version,
    )
    out.print(f"provisioned {state_dir}")


@agent_app.command("run")
def run(
    server: ServerUrl,
    state_dir: StateDirOpt,
    model: Annotated[str, typer.Option(help="The model this device runs")],
    once: Annotated[bool, typer.Option(help="One poll cycle, then exit")] = False,
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between polls")] = 30.0,
    health_check_max_abs: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Refuse a model with a float element whose |value| exceeds this bound "
            "(or that is NaN/inf); it is never tried again",
        ),
    ] = None,
    fallback_server: FallbackServers = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Enroll (first time), then poll, download, verify, apply and report."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(message)s"
    )
    health_check = None
    if health_check_max_abs is not None:
        try:
            health_check = MaxAbsHealthCheck(health_check_max_abs)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--health-check-max-abs") from None
    agent = Agent(
        AgentConfig(
            server_url=server,
            state_dir=state_dir,
            model=model,
            poll_interval=interval,
            fallback_urls=tuple(fallback_server or ()),
        ),
        health_check=health_check,
    )
    try:
        result = agent.run(once=once)
    except AgentError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    finally:
        agent.close()
    current = agent.state.installed()
    out.print(
        f"{result.outcome}{' (' + result.reason + ')' if result.reason else ''}; "
        f"running {current.digest if current else 'no model'}"
    )
    if result.outcome == "failed":
        raise typer.Exit(1)


@fleet_app.command("simulate")
def fleet_simulate(
    server: ServerUrl,
    token: Annotated[str, typer.Option("--token", envvar="DIFFCAST_TOKEN", help="Admin API token")],
    model: Annotated[str, typer.Option()],
    devices: Annotated[int, typer.Option(min=1, help="Number of devices")] = 20,
    start_versions: Annotated[
        str, typer.Option(help="Comma-separated start versions, cycled")
    ] = "0",
    work_dir: Annotated[Path, typer.Option(help="Where the devices' state lives")] = Path("fleet"),
    concurrency: Annotated[int, typer.Option(min=1)] = 8,
    timeout: Annotated[float, typer.Option(help="Seconds before giving up")] = 300.0,
    report: Annotated[Path | None, typer.Option(help="Write the result as JSON")] = None,
    fallback_server: Annotated[
        list[str] | None,
        typer.Option(
            "--fallback-server",
            help="Another replica of the server (repeatable): devices are spread over all "
            "replicas, each falling back to the others",
        ),
    ] = None,
) -> None:
    """Run N simulated devices (each its own credential and state) until all converge."""
    starts = [None if s.strip() in ("", "none") else int(s) for s in start_versions.split(",")]
    versions = [starts[i % len(starts)] for i in range(devices)]
    with Progress(
        TextColumn("devices converged"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
    ) as bar:
        task = bar.add_task("fleet", total=devices)
        try:
            result = simulate(
                server,
                token,
                model,
                work_dir,
                versions,
                concurrency=concurrency,
                timeout=timeout,
                on_progress=lambda done, total: bar.update(task, completed=done, total=total),
                fallback_servers=fallback_server or (),
            )
        except (httpx.HTTPError, RuntimeError) as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
    table = Table("device", "start", "final", "plans", "downloaded", "vs full", "ok")
    for d in result.devices:
        full = result.full_model_bytes if d.start_version != result.target_version else 0
        table.add_row(
            d.device_id,
            str(d.start_version),
            str(d.final_version),
            ",".join(d.plan_kinds),
            f"{d.bytes_downloaded:,}",
            f"{d.bytes_downloaded / full:.1%}" if full else "-",
            "yes" if d.converged else "NO",
        )
    out.print(table)
    saved = 1 - result.bytes_downloaded / result.bytes_full if result.bytes_full else 0.0
    out.print(
        f"{result.converged}/{len(result.devices)} devices at version {result.target_version} "
        f"in {result.seconds:.1f}s; downloaded {result.bytes_downloaded:,} bytes vs "
        f"{result.bytes_full:,} as full models ({saved:.1%} saved)"
    )
    if report is not None:
        report.write_text(json.dumps(result.to_json(), indent=2))
    if result.converged != len(result.devices):
        raise typer.Exit(1)


def _fleet_tables(server: str, token: str) -> Group:
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=server, headers=headers, timeout=30.0) as client:
        summary = client.get("/v1/fleet/summary")
        releases = client.get("/v1/releases", params={"state": "active"})
    for response in (summary, releases):
        if response.status_code >= 400:
            raise RuntimeError(
                f"{response.request.url.path}: HTTP {response.status_code} {response.text[:200]}"
            )
    data = summary.json()
    versions = Table("model", "version", "devices", "share", title="fleet versions")
    for model in data["models"]:
        for count in model["versions"]:
            share = count["devices"] / model["devices"] if model["devices"] else 0.0
            latest = " (latest)" if count["version"] == model["latest"] else ""
            label = "unknown" if count["version"] is None else f"v{count['version']}{latest}"
            versions.add_row(model["model"], label, str(count["devices"]), f"{share:.0%}")
    active = Table(
        "release",
        "target",
        "rollout",
        "applied",
        "failed",
        "failures by reason",
        title="active releases",
    )
    for r in releases.json():
        progress = r["progress"] or {}
        reasons = ", ".join(f"{k} {v}" for k, v in progress.get("failures_by_reason", {}).items())
        active.add_row(
            f"#{r['id']} {r['name']}",
            f"{r['model']} v{r['version']}",
            f"{r['percent']:g}%",
            f"{progress.get('applied', 0)}/{progress.get('started', 0)}",
            str(progress.get("failed", 0)),
            reasons,
        )
    full = data["bytes_full_equivalent"]
    saved = 1 - data["bytes_downloaded"] / full if full else 0.0
    footer = (
        f"{data['devices']} devices ({data['unreported']} not yet reported); downloaded "
        f"{data['bytes_downloaded']:,} bytes vs {full:,} as full models ({saved:.1%} saved)"
    )
    return Group(versions, active, footer)


@fleet_app.command("status")
def fleet_status(
    server: ServerUrl,
    token: Annotated[
        str, typer.Option("--token", envvar="DIFFCAST_TOKEN", help="API token (read)")
    ],
    watch: Annotated[
        float | None, typer.Option(help="Refresh every N seconds until Ctrl-C")
    ] = None,
) -> None:
    """The fleet's version distribution, active releases and bytes saved."""
    try:
        if watch is None:
            out.print(_fleet_tables(server, token))
            return
        with Live(_fleet_tables(server, token), console=out, refresh_per_second=4) as live:
            while True:
                time.sleep(watch)
                live.update(_fleet_tables(server, token))
    except (httpx.HTTPError, RuntimeError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        pass
