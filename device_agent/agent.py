"""The agent: enroll once, then poll -> verify -> download -> apply -> switch -> report.

The loop is a thin shell around :mod:`device_agent.install` and the state directory.
Its promises:

- the live model is always a complete, digest-verified file (``current.json``);
- an update is journaled before each phase, so after a crash at any instant
  :meth:`Agent.recover` finds a valid model (old or new), cleans up, and reports what
  happened; partial downloads are resumed, not restarted;
- a server that cannot be reached is replaced by the next of its replicas
  (``fallback_urls``); a request that never left the device is sent again there;
- a plan's options are tried in order, each at most once per cycle, so a broken
  network can never turn into a download loop; waits back off exponentially with
  jitter, and honour ``Retry-After``;
- reports are queued on disk and delivered when the server can be reached;
- a staged model goes live only after the health check (if any) and the release's
  canary check (if the plan carries one: :mod:`device_agent.canary`) pass; a model that
  fails either is refused for good, and the running model stays.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from device_agent import canary
from device_agent.config import AgentConfig
from device_agent.errors import (
    AgentError,
    CanaryFetchError,
    CanaryUnavailableError,
    DowngradeError,
    EnrollmentError,
    HealthCheckError,
    ServerError,
)
from device_agent.install import StagedModel, build
from device_agent.state import InstalledModel, StateDir, read_json, write_json
from device_agent.trust import TrustedMetadata
from diffs.digest import file_digest
from diffs.errors import DiffError
from diffs.fileio import fsync_directory
from diffs.wire import CanaryRef, EnrollRequest, EnrollResponse, UpdatePlan, UpdateReport
from diffs.wire import StepReport as StepRecord

log = logging.getLogger("diffcast.agent")

HealthCheck = Callable[[Path], None]
"""Raises :class:`HealthCheckError` if the model at the path must not go live."""


@dataclass(frozen=True)
class CycleResult:
    outcome: str
    """``current``, ``updated``, ``failed`` or ``skipped``."""
    reason: str | None = None
    retry_after: float | None = None


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        health_check: HealthCheck | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = config
        self.state = StateDir(config.state_dir)
        self.health_check = health_check
        self._client = httpx.Client(
            base_url=config.server_url,
            timeout=httpx.Timeout(config.read_timeout, connect=config.connect_timeout),
            transport=transport,
            follow_redirects=False,
        )
        self._servers = list(dict.fromkeys([config.server_url, *config.fallback_urls]))
        self._etag: str | None = None
        self._identity: dict[str, str] | None = None

    def close(self) -> None:
        self._client.close()

    # --- enrollment -------------------------------------------------------------

    def identity(self) -> dict[str, str]:
        if self._identity is None:
            stored = read_json(self.state.identity)
            self._identity = stored if stored is not None else self._enroll()
        return self._identity

    def _bundle(self) -> dict[str, Any]:
        bundle = read_json(self.state.bundle)
        if not isinstance(bundle, dict) or "trusted_root" not in bundle:
            raise EnrollmentError(f"no provisioning bundle at {self.state.bundle}")
        return bundle

    def _enroll(self) -> dict[str, str]:
        """Enroll with an id and credential chosen (and saved) before asking, so that a
        crash between the server's answer and saving it can be retried harmlessly."""
        bundle = self._bundle()
        pending_file = self.state.root / "enrollment.json"
        pending = read_json(pending_file)
        if not isinstance(pending, dict):
            pending = {
                "device_id": bundle.get("device_id") or uuid.uuid4().hex,
                "credential": "dev_" + secrets.token_urlsafe(32),
            }
            write_json(pending_file, pending)
        request = EnrollRequest(
            enrollment_secret=bundle["enrollment_secret"],
            device_id=pending["device_id"],
            tags=bundle.get("tags", {}),
            credential=pending["credential"],
        )
        response = self._request(
            "POST", "/v1/devices/enroll", json=request.model_dump(exclude_none=True)
        )
        if response.status_code != 201:
            raise EnrollmentError(
                f"enrollment refused: HTTP {response.status_code} {response.text[:200]}"
            )
        enrolled = EnrollResponse.model_validate_json(response.content)
        identity = {"device_id": enrolled.device_id, "credential": enrolled.credential}
        write_json(self.state.identity, identity)
        pending_file.unlink(missing_ok=True)
        return identity

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.identity()['credential']}"}

    # --- HTTP ---------------------------------------------------------------------

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        for tries_left in range(len(self._servers) - 1, -1, -1):
            try:
                response = self._client.request(method, url, **kwargs)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Never sent: safe to send again, whatever the method, to another replica.
                self._fail_over(exc)
                if not tries_left:
                    raise ServerError(f"cannot reach the server: {exc}") from exc
            except httpx.HTTPError as exc:
                # Perhaps sent: not repeated now, but the next request goes elsewhere.
                self._fail_over(exc)
                raise ServerError(f"cannot reach the server: {exc}") from exc
        if response.status_code in (429, 502, 503, 504):
            raise ServerError(f"server busy: HTTP {response.status_code}", _retry_after(response))
        if response.status_code >= 500:
            raise ServerError(f"server error: HTTP {response.status_code}")
        return response

    def _fail_over(self, error: Exception) -> None:
        """Use the next replica (if any) from now on: polls, metadata and downloads."""
        if len(self._servers) < 2:
            return
        index = self._servers.index(self.config.server_url)
        following = self._servers[(index + 1) % len(self._servers)]
        log.warning("%s unreachable (%s); now using %s", self.config.server_url, error, following)
        self.config = replace(self.config, server_url=following)
        self._client.base_url = httpx.URL(following)
        self._etag = None

    # --- recovery -----------------------------------------------------------------

    def recover(self) -> None:
        """Start from a valid model whatever happened before; report an interrupted update."""
        current = self.state.installed()
        if current is not None and not self._valid(current):
            previous = self.state.installed("previous")
            if previous is not None and self._valid(previous):
                log.warning("live model %s is damaged; back to %s", current.digest, previous.digest)
                self.state.set_installed(previous)
            else:
                log.error("no valid model on the device; a full download will follow")
                (self.state.root / "current.json").unlink(missing_ok=True)
        journal = read_json(self.state.journal)
        if isinstance(journal, dict):
            now = self.state.installed()
            if now is not None and now.digest == journal.get("target_digest"):
                self._queue(journal, "updated", None, "completed before a restart")
            else:
                self._queue(
                    journal, "failed", "interrupted", f"interrupted while {journal.get('phase')}"
                )
            self.state.journal.unlink(missing_ok=True)
        shutil.rmtree(self.state.staging, ignore_errors=True)
        self.state.staging.mkdir(exist_ok=True)
        for stray in self.state.root.glob(".*.tmp"):
            stray.unlink(missing_ok=True)

    def _valid(self, model: InstalledModel) -> bool:
        path = self.state.models / model.file
        try:
            return path.exists() and file_digest(path) == model.digest
        except DiffError:
            return False

    # --- one cycle ----------------------------------------------------------------

    def run_once(self) -> CycleResult:
        """Recover, poll, and carry out the plan if there is one; then send reports."""
        self.recover()
        try:
            result = self._cycle()
        except ServerError as exc:
            result = CycleResult("skipped", exc.reason, exc.retry_after)
        self.flush_reports()
        return result

    def _cycle(self) -> CycleResult:
        identity = self.identity()
        live = self.state.installed()
        params = {"model": self.config.model, "canary": "true"}
        if live is not None:
            params["digest"] = live.digest
        headers = self._auth()
        if self._etag:
            headers["If-None-Match"] = self._etag
        response = self._request(
            "GET", f"/v1/devices/{identity['device_id']}/update", params=params, headers=headers
        )
        if response.status_code == 304:
            return CycleResult("current")
        if response.status_code != 200 or len(response.content) > self.config.max_plan_bytes:
            raise ServerError(f"bad plan answer: HTTP {response.status_code}")
        try:
            plan = UpdatePlan.model_validate_json(response.content)
        except ValidationError as exc:
            raise ServerError(f"the plan is not valid: {exc.error_count()} errors") from exc
        if plan.status == "current" or plan.target is None:
            self._etag = response.headers.get("etag")
            return CycleResult("current")
        refused = read_json(self.state.refused) or []
        if plan.target.digest in refused:
            self._etag = response.headers.get("etag")
            return CycleResult("skipped", "refused_before")
        return self._update(plan, live)

    def _update(self, plan: UpdatePlan, live: InstalledModel | None) -> CycleResult:
        assert plan.target is not None
        journal: dict[str, Any] = {
            "id": uuid.uuid4().hex,
            "model": self.config.model,
            "from_version": live.version if live else None,
            "from_digest": live.digest if live else None,
            "to_version": plan.target.version,
            "target_digest": plan.target.digest,
            "release_id": plan.release_id,
            "started": time.time(),
            "phase": "planning",
        }
        trusted = TrustedMetadata(
            self.state.tuf,
            f"{self.config.server_url.rstrip('/')}/tuf/",
            self._client,
            self._trusted_root(),
        )
        scorer = None
        if plan.canary is not None:
            try:
                scorer = canary.load_scorer()  # before any download: it may be missing
            except CanaryUnavailableError as exc:
                self._refuse(plan.target.digest)
                self._finish(journal, "failed", exc.reason, str(exc), [])
                return CycleResult("failed", exc.reason)
        errors: list[AgentError] = []
        tried: list[str] = []
        message: str | None = None
        for option in plan.options:
            tried.append(option.kind)
            journal.update(option=option.kind, phase="planning")
            write_json(self.state.journal, journal)

            def phase(name: str) -> None:
                journal["phase"] = name
                write_json(self.state.journal, journal)

            try:
                trusted.refresh()
                staged = build(
                    option,
                    live,
                    client=self._client,
                    trusted=trusted,
                    state=self.state,
                    config=self.config,
                    on_phase=phase,
                )
                self._check_version(staged, live, plan)
                if self.health_check is not None:
                    phase("health_check")
                    self._health(staged)
                if plan.canary is not None:
                    assert scorer is not None
                    phase("canary")
                    message = self._canary(staged, plan.canary, trusted, scorer)
                phase("switching")
                installed = self._switch(staged, live)
            except (DowngradeError, HealthCheckError, CanaryFetchError) as exc:
                self._finish(journal, "failed", exc.reason, str(exc), tried)
                return CycleResult("failed", exc.reason)
            except AgentError as exc:
                log.warning("option %s failed: %s", option.kind, exc)
                errors.append(exc)
                continue
            self._finish(journal, "updated", None, message, tried, staged, installed)
            return CycleResult("updated")
        reason = errors[-1].reason if errors else "no_option"
        message = "; ".join(f"{k}: {e}" for k, e in zip(tried, errors, strict=False))
        self._finish(journal, "failed", reason, message, tried)
        return CycleResult("failed", reason)

    def _trusted_root(self) -> bytes:
        return json.dumps(self._bundle()["trusted_root"]).encode()

    def _check_version(
        self, staged: StagedModel, live: InstalledModel | None, plan: UpdatePlan
    ) -> None:
        if live is None or live.version is None or staged.version is None:
            return
        if staged.version < live.version and not staged.rollback:
            staged.path.unlink(missing_ok=True)
            raise DowngradeError(
                f"version {staged.version} is older than the installed {live.version}; "
                "only a signed rollback may go back"
            )

    def _health(self, staged: StagedModel) -> None:
        assert self.health_check is not None
        try:
            self.health_check(staged.path)
        except HealthCheckError:
            staged.path.unlink(missing_ok=True)
            self._refuse(staged.digest)
            raise

    def _refuse(self, digest: str) -> None:
        """Never try ``digest`` again."""
        refused = read_json(self.state.refused) or []
        if digest not in refused:
            write_json(self.state.refused, [*refused, digest])

    def _canary(
        self,
        staged: StagedModel,
        ref: CanaryRef,
        trusted: TrustedMetadata,
        scorer: canary.Scorer,
    ) -> str:
        """Fetch the canary and check the staged model on it (see :mod:`device_agent.canary`);
        returns what it found, for the report."""
        started = time.monotonic()
        try:
            fetched = canary.fetch(
                ref,
                staged.digest,
                client=self._client,
                trusted=trusted,
                state=self.state,
                config=self.config,
            )
        except AgentError as exc:
            staged.path.unlink(missing_ok=True)
            raise CanaryFetchError(f"canary: {exc}", exc.reason) from exc
        try:
            result = canary.check(staged.path, fetched.path, scorer)
        except HealthCheckError:
            staged.path.unlink(missing_ok=True)
            self._refuse(staged.digest)
            raise
        finally:
            fetched.path.unlink(missing_ok=True)
        staged.steps.append(
            StepRecord(
                kind="canary",
                sha256=ref.sha256,
                bytes_downloaded=fetched.bytes_transferred,
                seconds=round(time.monotonic() - started, 3),
            )
        )
        log.info("%s: passed", result.describe())
        return f"{result.describe()}: passed"

    def _switch(self, staged: StagedModel, live: InstalledModel | None) -> InstalledModel:
        final = self.state.model_file(staged.digest)
        staged.path.replace(final)
        fsync_directory(final.parent)
        installed = InstalledModel(self.config.model, staged.version, staged.digest, final.name)
        if live is not None and self.config.keep_previous:
            self.state.set_installed(live, "previous")
        self.state.set_installed(installed)
        keep = {installed.file} | ({live.file} if live and self.config.keep_previous else set())
        for path in self.state.models.glob("*.safetensors"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
        return installed

    # --- reports ------------------------------------------------------------------

    def _finish(
        self,
        journal: dict[str, Any],
        outcome: str,
        reason: str | None,
        message: str | None,
        tried: list[str],
        staged: StagedModel | None = None,
        installed: InstalledModel | None = None,
    ) -> None:
        journal["plan_kind"] = tried[-1] if tried else None
        if staged is not None:
            journal["steps"] = [s.model_dump() for s in staged.steps]
            journal["bytes_downloaded"] = staged.bytes_downloaded
        if installed is not None:
            journal["to_version"] = installed.version
        self._queue(journal, outcome, reason, message)
        self.state.journal.unlink(missing_ok=True)
        self._etag = None

    def _queue(
        self, journal: dict[str, Any], outcome: str, reason: str | None, message: str | None
    ) -> None:
        report = UpdateReport(
            model=journal.get("model", self.config.model),
            outcome=outcome,  # type: ignore[arg-type]
            reason=reason,
            message=message[:2000] if message else None,
            from_version=journal.get("from_version"),
            from_digest=journal.get("from_digest"),
            to_version=journal.get("to_version"),
            to_digest=journal.get("target_digest") if outcome == "updated" else None,
            plan_kind=journal.get("plan_kind"),
            bytes_downloaded=journal.get("bytes_downloaded", 0),
            seconds=round(time.time() - journal.get("started", time.time()), 3),
            steps=journal.get("steps", []),
            release_id=journal.get("release_id"),
        )
        name = f"{time.time_ns():020d}-{journal.get('id', uuid.uuid4().hex)}.json"
        write_json(self.state.outbox / name, report.model_dump(mode="json"))

    def flush_reports(self) -> int:
        """Send queued reports in order; keep those the server could not take yet."""
        sent = 0
        for path in sorted(self.state.outbox.glob("*.json")):
            body = read_json(path)
            try:
                response = self._request(
                    "POST",
                    f"/v1/devices/{self.identity()['device_id']}/reports",
                    json=body,
                    headers=self._auth(),
                )
            except ServerError:
                break
            if response.status_code >= 400 and response.status_code not in (400, 422):
                break
            if response.status_code >= 400:
                log.error("report %s rejected: %s", path.name, response.text[:200])
            else:
                with open(self.state.sent_log, "a") as history:
                    history.write(json.dumps(body, sort_keys=True) + "\n")
            path.unlink(missing_ok=True)  # delivered, or permanently rejected (logged)
            sent += 1
        return sent

    # --- the loop -----------------------------------------------------------------

    def run(
        self, *, once: bool = False, sleep: Callable[[float], None] = time.sleep
    ) -> CycleResult:
        failures = 0
        while True:
            try:
                result = self.run_once()
            except AgentError as exc:
                result = CycleResult("skipped", exc.reason)
            if once:
                return result
            failures = failures + 1 if result.outcome in ("failed", "skipped") else 0
            sleep(self.next_wait(failures, result.retry_after))

    def next_wait(self, failures: int, retry_after: float | None) -> float:
        base = (
            self.config.poll_interval
            if failures == 0
            else min(self.config.max_backoff, self.config.poll_interval * 2**failures)
        )
        if retry_after is not None:
            base = max(base, retry_after)
        return base * random.uniform(1 - self.config.jitter, 1 + self.config.jitter)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
