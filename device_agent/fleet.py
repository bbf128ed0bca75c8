"""A simulated fleet: N agents (own state directory, own credential each) in one process.

Agents run in a thread pool, so hundreds fit on a small machine; each is the same
:class:`~device_agent.agent.Agent` that ``diffcast agent run`` runs. Devices start at
the versions given, installed from the published snapshots, and poll until every one
runs the model's latest version (or the time runs out). Given several replicas of the
server, the devices are spread over them in turn, each knowing the others as fallbacks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from device_agent.agent import Agent, HealthCheck
from device_agent.config import AgentConfig
from device_agent.download import download
from device_agent.provision import provision
from device_agent.state import read_json


@dataclass
class DeviceResult:
    device_id: str
    start_version: int | None
    final_version: int | None = None
    final_digest: str | None = None
    converged: bool = False
    plan_kinds: list[str] = field(default_factory=list)
    bytes_downloaded: int = 0
    cycles: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass
class FleetResult:
    model: str
    target_version: int
    target_digest: str
    full_model_bytes: int
    devices: list[DeviceResult]
    seconds: float

    @property
    def converged(self) -> int:
        return sum(d.converged for d in self.devices)

    @property
    def bytes_downloaded(self) -> int:
        return sum(d.bytes_downloaded for d in self.devices)

    @property
    def bytes_full(self) -> int:
        """What the same updates would cost as full-model downloads."""
        return sum(
            self.full_model_bytes for d in self.devices if d.start_version != self.target_version
        )

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "converged": self.converged,
            "bytes_downloaded": self.bytes_downloaded,
            "bytes_full": self.bytes_full,
        }


def simulate(
    server: str,
    token: str,
    model: str,
    work_dir: Path,
    start_versions: Sequence[int | None],
    *,
    concurrency: int = 8,
    timeout: float = 300.0,
    poll_interval: float = 0.5,
    prefix: str = "sim",
    tags: Callable[[int], dict[str, str]] = lambda i: {"cohort": f"c{i % 4}"},
    on_progress: Callable[[int, int], None] | None = None,
    health_check: Callable[[int], HealthCheck | None] = lambda i: None,
    fallback_servers: Sequence[str] = (),
) -> FleetResult:
    """Provision one device per entry of ``start_versions`` and run them to convergence."""
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=server, headers=headers, timeout=60.0) as client:
        bundle = _ok(client.get("/v1/provisioning")).json()
        versions = {v["version"]: v for v in _ok(client.get(f"/v1/models/{model}/versions")).json()}
        live = [v for v in versions.values() if not v["retired"]]
        target = max(live, key=lambda v: v["version"])
        snapshots: dict[int, Path] = {}
        cache = work_dir / "snapshots"
        cache.mkdir(parents=True, exist_ok=True)
        for number in sorted({v for v in start_versions if v is not None}):
            info = versions[number]
            snapshots[number] = download(
                client,
                f"/v1/blobs/{info['snapshot_sha256']}",
                cache / f"v{number}.safetensors",
                length=info["snapshot_size"],
                sha256=info["snapshot_sha256"],
            ).path
    servers = list(dict.fromkeys([server, *fallback_servers]))
    results = []
    agents = []
    for index, start in enumerate(start_versions):
        device_id = f"{prefix}-{index:04d}"
        state_dir = work_dir / device_id
        provision(
            state_dir,
            bundle,
            device_id=device_id,
            tags=tags(index),
            initial_model=snapshots.get(start) if start is not None else None,
            model_name=model,
            initial_version=start,
        )
        first = index % len(servers)
        config = AgentConfig(
            server_url=servers[first],
            state_dir=state_dir,
            model=model,
            fallback_urls=tuple(servers[first + 1 :] + servers[:first]),
        )
        agents.append(Agent(config, health_check=health_check(index)))
        results.append(DeviceResult(device_id, start))

    def step(i: int) -> None:
        agent, result = agents[i], results[i]
        result.cycles += 1
        outbox_before = set(agent.state.outbox.glob("*.json"))
        cycle = agent.run_once()
        for path in set(agent.state.outbox.glob("*.json")) - outbox_before:
            report = read_json(path) or {}
            result.failures.append(str(report.get("reason")))
        if cycle.outcome == "failed":
            result.failures.append(cycle.reason or "failed")
        current = agent.state.installed()
        result.final_digest = current.digest if current else None
        result.final_version = current.version if current else None
        result.converged = result.final_digest == target["digest"]

    deadline = started + timeout
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        while time.monotonic() < deadline:
            pending = [i for i, r in enumerate(results) if not r.converged]
            if on_progress is not None:
                on_progress(len(results) - len(pending), len(results))
            if not pending:
                break
            list(pool.map(step, pending))
            if any(not r.converged for r in results):
                time.sleep(poll_interval)
    for agent, result in zip(agents, results, strict=True):
        reports = _reports(agent)
        result.plan_kinds = [r["plan_kind"] for r in reports if r.get("plan_kind")]
        result.bytes_downloaded = sum(r.get("bytes_downloaded", 0) for r in reports)
        agent.close()
    return FleetResult(
        model,
        target["version"],
        target["digest"],
        target["snapshot_size"],
        results,
        round(time.monotonic() - started, 3),
    )


def _reports(agent: Agent) -> list[dict[str, Any]]:
    """The reports the device delivered."""
    log = agent.state.sent_log
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _ok(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise RuntimeError(
            f"{response.request.url}: HTTP {response.status_code} {response.text[:300]}"
        )
    return response
