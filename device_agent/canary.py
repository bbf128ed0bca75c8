"""The canary check: decode a release's canary clips with the staged model, bound the WER.

When a plan names a canary (:class:`~diffs.wire.CanaryRef`), the agent, once the staged
model's digests check out and before it switches:

1. checks that the bundle is a signed target of the model's role, with the plan's
   length and SHA-256, signed as a ``canary`` for exactly the digest being installed;
2. downloads it like a plan step (resumable, length-capped, hash-checked);
3. reads it (:func:`diffs.canary.read_canary`, under its caps) and decodes every clip
   with the staged model (:mod:`asr.canary`, greedy CTC), pooling the WER;
4. refuses the model if the WER is above the bound held in the signed bundle
   (:class:`CanaryFailedError`, the health-check failure path: the old model stays,
   the failure is reported, the digest is never tried again).

The decoder needs ``asr`` and torch, imported only here and only when a canary check
runs (:func:`load_scorer`), so the agent runs on a device without them; such a device
refuses a release that carries a canary with :class:`CanaryUnavailableError`, before
downloading anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from device_agent.config import AgentConfig
from device_agent.download import DownloadResult, download
from device_agent.errors import (
    CanaryFailedError,
    CanaryUnavailableError,
    DownloadError,
    TrustError,
)
from device_agent.state import StateDir
from device_agent.trust import TrustedMetadata
from diffs.canary import DEFAULT_LIMITS, CanaryBundle, read_canary
from diffs.errors import CanaryFormatError
from diffs.wire import CanaryRef


@dataclass(frozen=True)
class CanaryResult:
    wer: float
    words: int
    word_errors: int
    clips: int
    max_wer: float
    """The bound the bundle holds."""

    def describe(self) -> str:
        return (
            f"canary WER {self.wer:.4f} ({self.word_errors} of {self.words} words wrong on "
            f"{self.clips} clips), bound {self.max_wer:g}"
        )


Scorer = Callable[[Path, CanaryBundle], CanaryResult]
"""Decodes the bundle's clips with the model at the path; :class:`CanaryFailedError` if
the model cannot be decoded."""


def load_scorer() -> Scorer:
    """The ASR decoder, imported now; :class:`CanaryUnavailableError` without it."""
    try:
        from asr import ASRError
        from asr.canary import score
    except (ImportError, OSError) as exc:
        raise CanaryUnavailableError(
            f"this device cannot run canary checks (they need the asr package and torch): "
            f"{type(exc).__name__}: {exc}"
        ) from exc

    def scorer(model: Path, bundle: CanaryBundle) -> CanaryResult:
        try:
            result = score(model, bundle)
        except ASRError as exc:
            raise CanaryFailedError(f"canary: the model cannot be decoded: {exc}") from exc
        except Exception as exc:  # torch failing on this device: never a crash loop
            raise CanaryUnavailableError(
                f"the canary check failed on this device: {type(exc).__name__}: {exc}"
            ) from exc
        return CanaryResult(
            result.wer, result.words, result.word_errors, result.clips, bundle.max_wer
        )

    return scorer


def fetch(
    canary: CanaryRef,
    target_digest: str,
    *,
    client: httpx.Client,
    trusted: TrustedMetadata,
    state: StateDir,
    config: AgentConfig,
) -> DownloadResult:
    """Verify the canary's signed target, then download it (:class:`TrustError`,
    :class:`DownloadError`)."""
    signed = trusted.target(canary.target_path)
    if (signed.length, signed.sha256) != (canary.size, canary.sha256):
        raise TrustError(f"{canary.target_path}: the plan's size/hash differ from the signed ones")
    if signed.custom.get("kind") != "canary" or signed.custom.get("digest") != target_digest:
        raise TrustError(f"{canary.target_path} is not signed as a canary for {target_digest}")
    cap = min(config.max_blob_bytes, DEFAULT_LIMITS.max_file_bytes)
    if signed.length > cap:
        raise DownloadError(f"{canary.target_path} is {signed.length} bytes, above the cap")
    return download(
        client,
        str(httpx.URL(config.server_url).join(canary.url)),
        state.downloads / signed.sha256,
        length=signed.length,
        sha256=signed.sha256,
        max_attempts=config.download_attempts,
    )


def check(model: Path, bundle_file: Path, scorer: Scorer) -> CanaryResult:
    """Score the model on the bundle; :class:`CanaryFailedError` above the bound."""
    try:
        bundle = read_canary(bundle_file)
    except CanaryFormatError as exc:
        raise CanaryUnavailableError(f"the canary bundle cannot be read: {exc}") from exc
    result = replace(scorer(model, bundle), max_wer=bundle.max_wer)
    if not result.wer <= result.max_wer:
        raise CanaryFailedError(f"{result.describe()}: the WER is above the bound")
    return result
