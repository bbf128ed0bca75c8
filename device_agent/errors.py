"""The agent's exception tree. Each error carries a reason code that goes into reports.

::

    AgentError                       reason
    ├── EnrollmentError              enrollment_failed
    ├── ServerError                  server_error       (unreachable, 5xx, bad answer)
    ├── TrustError                   untrusted          (metadata refused, target unsigned)
    ├── DownloadError                download_failed
    │   ├── LengthExceededError      length_exceeded    (more bytes than the signed length)
    │   └── HashMismatchError        hash_mismatch      (bytes differ from the signed hash)
    ├── ApplyError                   apply_failed       (a diff did not apply)
    │   └── DigestError              digest_mismatch    (a result is not the signed digest)
    ├── DowngradeError               downgrade_refused
    ├── CanaryFetchError             (its cause's: untrusted, hash_mismatch, ...)
    └── HealthCheckError             health_check_failed
        ├── CanaryFailedError        canary_failed      (WER above the bound, or undecodable)
        └── CanaryUnavailableError   canary_unavailable (this device cannot run the check)

A :class:`HealthCheckError` refuses the target for good: the device keeps its model and
never tries that digest again. A :class:`CanaryFetchError` ends the update too, but the
next poll tries again (the network or the server may have been at fault, not the model).
"""

from __future__ import annotations


class AgentError(Exception):
    reason = "agent_error"


class EnrollmentError(AgentError):
    reason = "enrollment_failed"


class ServerError(AgentError):
    reason = "server_error"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TrustError(AgentError):
    reason = "untrusted"


class DownloadError(AgentError):
    reason = "download_failed"


class LengthExceededError(DownloadError):
    reason = "length_exceeded"


class HashMismatchError(DownloadError):
    reason = "hash_mismatch"


class ApplyError(AgentError):
    reason = "apply_failed"


class DigestError(ApplyError):
    reason = "digest_mismatch"


class DowngradeError(AgentError):
    reason = "downgrade_refused"


class HealthCheckError(AgentError):
    reason = "health_check_failed"


class CanaryFailedError(HealthCheckError):
    reason = "canary_failed"


class CanaryUnavailableError(HealthCheckError):
    reason = "canary_unavailable"


class CanaryFetchError(AgentError):
    """The canary bundle could not be fetched or verified; carries its cause's reason."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
