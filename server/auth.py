"""Credentials: operator API tokens with scopes, and per-device credentials.

Secrets are random 32-byte URL-safe strings, shown once, stored only as SHA-256 hashes
(a fast hash is right for high-entropy secrets; nothing to brute-force). Comparisons go
through the hash index, so no secret is ever compared byte by byte in Python.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from enum import StrEnum


class Scope(StrEnum):
    READ = "read"
    PUBLISH = "publish"
    ADMIN = "admin"


IMPLIED: dict[Scope, frozenset[Scope]] = {
    Scope.READ: frozenset({Scope.READ}),
    Scope.PUBLISH: frozenset({Scope.READ, Scope.PUBLISH}),
    Scope.ADMIN: frozenset({Scope.READ, Scope.PUBLISH, Scope.ADMIN}),
}


def new_secret(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Operator:
    token_id: int
    name: str
    scopes: frozenset[Scope]

    def can(self, scope: Scope) -> bool:
        return any(scope in IMPLIED[s] for s in self.scopes)


@dataclass(frozen=True)
class DeviceIdentity:
    device_id: str
    tags: dict[str, str]
