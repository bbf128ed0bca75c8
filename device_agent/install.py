"""Executing one option of an update plan: verify, download, apply to staging, check.

Every step is checked against its *signed* target (length, SHA-256, and the signed
source/target model digests) before its first byte is downloaded. All downloads come
first (a broken network wastes no apply work), then the steps are applied to a copy of
the live model in ``staging/`` -- never to the live model -- with the digest after each
diff checked. The staged model is returned only if its digest is the signed target's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from device_agent.config import AgentConfig
from device_agent.download import download
from device_agent.errors import (
    ApplyError,
    DigestError,
    DowngradeError,
    DownloadError,
    TrustError,
)
from device_agent.state import InstalledModel, StateDir
from device_agent.trust import SignedTarget, TrustedMetadata
from diffs.digest import file_digest
from diffs.errors import DiffError, DigestMismatchError
from diffs.patch_file import apply_to_file, open_chain
from diffs.wire import PlanOption, PlanStep
from diffs.wire import StepReport as StepRecord

Phase = Callable[[str], None]
"""Called with the phase name (``downloading``, ``applying``) as the work advances."""


@dataclass
class StagedModel:
    path: Path
    digest: str
    version: int | None
    steps: list[StepRecord] = field(default_factory=list)
    rollback: bool = False
    """The target is signed as an explicit rollback (it may be older than the live one)."""

    @property
    def bytes_downloaded(self) -> int:
        return sum(s.bytes_downloaded for s in self.steps)


def check_step(step: PlanStep, signed: SignedTarget, config: AgentConfig) -> None:
    """The plan's claims about a step must be exactly what is signed."""
    if signed.length != step.size or signed.sha256 != step.sha256:
        raise TrustError(f"{step.target_path}: the plan's size/hash differ from the signed ones")
    if signed.custom.get("digest") != step.target_digest:
        raise TrustError(f"{step.target_path}: the plan's target digest is not the signed one")
    if step.source_digest is not None and signed.custom.get("source_digest") not in (
        None,
        step.source_digest,
    ):
        raise TrustError(f"{step.target_path}: the plan's source digest is not the signed one")
    if step.kind != "snapshot" and signed.custom.get("source_digest") is None:
        raise TrustError(f"{step.target_path}: a diff must be signed with its source digest")
    if signed.length > config.max_blob_bytes:
        raise DownloadError(f"{step.target_path} is {signed.length} bytes, above the cap")


def build(
    option: PlanOption,
    live: InstalledModel | None,
    *,
    client: httpx.Client,
    trusted: TrustedMetadata,
    state: StateDir,
    config: AgentConfig,
    on_phase: Phase = lambda _: None,
) -> StagedModel:
    """Download and apply ``option``; return the verified staged model."""
    if not option.steps:
        raise ApplyError("the plan option has no steps")
    signed = [trusted.target(step.target_path) for step in option.steps]
    for step, facts in zip(option.steps, signed, strict=True):
        check_step(step, facts, config)
    version = signed[-1].custom.get("version")
    signed_rollback = signed[-1].custom.get("rollback_release") is not None
    if (
        live is not None
        and isinstance(live.version, int)
        and isinstance(version, int)
        and version < live.version
        and not signed_rollback
    ):
        # refused before a byte is downloaded: otherwise every poll would fetch it again
        raise DowngradeError(
            f"version {version} is older than the installed {live.version}; "
            "only a signed rollback may go back"
        )
    if option.kind != "full":
        if live is None or option.steps[0].source_digest != live.digest:
            raise ApplyError("the plan's first diff does not apply to the live model")
        for before, after in zip(option.steps, option.steps[1:], strict=False):
            if after.source_digest != before.target_digest:
                raise ApplyError("the plan's diffs do not form a chain")
    on_phase("downloading")
    files: list[Path] = []
    records: list[StepRecord] = []
    for step, facts in zip(option.steps, signed, strict=True):
        started = time.monotonic()
        url = httpx.URL(config.server_url).join(step.url)
        result = download(
            client,
            str(url),
            state.downloads / facts.sha256,
            length=facts.length,
            sha256=facts.sha256,
            max_attempts=config.download_attempts,
        )
        files.append(result.path)
        records.append(
            StepRecord(
                kind=step.kind,
                sha256=facts.sha256,
                bytes_downloaded=result.bytes_transferred,
                seconds=round(time.monotonic() - started, 3),
            )
        )
    on_phase("applying")
    target_digest = option.steps[-1].target_digest
    staged = state.staging / f"{target_digest.removeprefix('sha256:')}.safetensors"
    try:
        if option.kind == "full":
            os.replace(files[0], staged)
            actual = file_digest(staged)
            if actual != target_digest:
                raise DigestError(f"the snapshot is {actual}, the signed digest is {target_digest}")
        else:
            assert live is not None
            readers = open_chain(files)
            try:
                for step, reader in zip(option.steps, readers, strict=True):
                    if (reader.base_digest, reader.target_digest) != (
                        step.source_digest,
                        step.target_digest,
                    ):
                        raise DigestError(
                            f"{step.target_path}: the diff's digests are not the signed ones"
                        )
                actual = apply_to_file(
                    state.model_file(live.digest), readers, staged, base_digest=live.digest
                )
            finally:
                for reader in readers:
                    reader.close()
            if actual != target_digest:
                raise DigestError(f"the result is {actual}, the signed digest is {target_digest}")
    except DigestMismatchError as exc:
        staged.unlink(missing_ok=True)
        raise DigestError(str(exc)) from exc
    except DiffError as exc:
        staged.unlink(missing_ok=True)
        raise ApplyError(str(exc)) from exc
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    for path in files:
        path.unlink(missing_ok=True)
    return StagedModel(
        staged,
        target_digest,
        version if isinstance(version, int) else None,
        records,
        rollback=signed_rollback,
    )
