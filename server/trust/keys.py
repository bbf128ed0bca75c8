"""Signing keys of the trust repository, root metadata, and key rotation.

Two key sets, kept apart on disk:

- the **root** keys (offline): a set of ed25519 keys and a threshold. They sign only
  root metadata — the file that names every other top-level key. Keep them off the
  server; they are needed again only to rotate keys or renew root (yearly).
- the **online** keys: one ed25519 key each for ``targets``, ``snapshot`` and
  ``timestamp`` (named in root) and one for the per-model delegated roles
  (``models``; named in the top-level targets metadata, not in root). The server
  loads them at start to sign metadata as models are published.

On disk (every private key PEM/PKCS#8, mode 0600; directories 0700)::

    <online dir>/targets.pem snapshot.pem timestamp.pem models.pem
    <online dir>/online.pub.json      {"targets": {"keyid": ..., "keytype": ...}, ...}
    <online dir>/1.root.json          root v1 (public; written by init_keys)
    <root dir>/root-0.pem ...         offline root keys
    <root dir>/root.pub.json          {"threshold": t, "keys": [{"keyid": ...}, ...]}

Key files are never overwritten: a rotation writes its new keys into a new directory.

Rotation follows TUF: root version N+1 must be signed by a threshold of the root keys
of version N *and* a threshold of its own root keys; a device walks the chain one
version at a time (``<N>.root.json``). Nothing here reads ``os.environ`` or the clock:
callers pass paths and ``now``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

# python-tuf and securesystemslib re-export these names without ``__all__``, which mypy's
# strict no-implicit-reexport rejects; the ignores go once pyproject sets
# ``implicit_reexport = true`` for ``tuf.*`` and ``securesystemslib.*``.
from securesystemslib.signer import (
    CryptoSigner,
    Key,
    SSlibKey,
)
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    Root,
    Snapshot,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

ROOT_EXPIRY = timedelta(days=365)
"""Default lifetime of a root version."""

ONLINE_ROOT_ROLES = (Targets.type, Snapshot.type, Timestamp.type)
"""The online roles whose keys root names."""

MODELS_KEY = "models"
"""Name of the online key that signs every per-model delegated role."""

ONLINE_PUBLIC_FILE = "online.pub.json"
ROOT_PUBLIC_FILE = "root.pub.json"
ROOT_V1_FILE = "1.root.json"

_SERIALIZER = JSONSerializer(compact=True)


@dataclass(frozen=True)
class OnlineKeys:
    """The keys the server holds to sign metadata without an operator."""

    targets: CryptoSigner
    snapshot: CryptoSigner
    timestamp: CryptoSigner
    models: CryptoSigner
    """Signs the per-model delegated targets roles (``model-<name>``)."""

    def for_role(self, role: str) -> CryptoSigner:
        """The signer named ``targets``, ``snapshot``, ``timestamp`` or ``models``."""
        try:
            return self._by_name()[role]
        except KeyError:
            raise ValueError(f"no online key named {role!r}") from None

    def _by_name(self) -> dict[str, CryptoSigner]:
        return {
            Targets.type: self.targets,
            Snapshot.type: self.snapshot,
            Timestamp.type: self.timestamp,
            MODELS_KEY: self.models,
        }


@dataclass(frozen=True)
class RootKeys:
    """An offline root key set: ``threshold`` of ``signers`` must sign each root."""

    signers: tuple[CryptoSigner, ...]
    threshold: int

    def __post_init__(self) -> None:
        if not 1 <= self.threshold <= len(self.signers):
            raise ValueError(f"root threshold {self.threshold} needs 1..{len(self.signers)} keys")
        keyids = [s.public_key.keyid for s in self.signers]
        if len(set(keyids)) != len(keyids):
            raise ValueError("root key set holds the same key twice")

    @property
    def keyids(self) -> list[str]:
        return [s.public_key.keyid for s in self.signers]


# --- generation -------------------------------------------------------------------


def generate_online_keys() -> OnlineKeys:
    """Fresh ed25519 online keys (targets, snapshot, timestamp, models)."""
    return OnlineKeys(
        targets=CryptoSigner.generate_ed25519(),
        snapshot=CryptoSigner.generate_ed25519(),
        timestamp=CryptoSigner.generate_ed25519(),
        models=CryptoSigner.generate_ed25519(),
    )


def generate_root_keys(count: int = 1, threshold: int = 1) -> RootKeys:
    """A fresh offline root key set of ``count`` ed25519 keys."""
    if count < 1:
        raise ValueError("a root key set needs at least one key")
    return RootKeys(
        signers=tuple(CryptoSigner.generate_ed25519() for _ in range(count)),
        threshold=threshold,
    )


def init_keys(
    online_dir: Path,
    root_dir: Path,
    *,
    now: datetime,
    root_key_count: int = 1,
    root_threshold: int = 1,
    expires_in: timedelta = ROOT_EXPIRY,
) -> bytes:
    """Generate and write both key sets and root v1; return root v1's bytes.

    Root v1 is also written to ``<online_dir>/1.root.json``: the server needs it to
    initialize its repository and devices are provisioned with it.
    """
    root_keys = generate_root_keys(root_key_count, root_threshold)
    online = generate_online_keys()
    root = create_root(root_keys, online, now=now, expires_in=expires_in)
    write_root_keys(root_dir, root_keys)
    write_online_keys(online_dir, online)
    _write_file(online_dir / ROOT_V1_FILE, root, mode=0o644)
    return root


# --- files ------------------------------------------------------------------------


def write_online_keys(directory: Path, keys: OnlineKeys) -> None:
    """Write the online keys (private PEM 0600) and ``online.pub.json``."""
    _make_private_dir(directory)
    public: dict[str, Any] = {}
    for name, signer in keys._by_name().items():
        _write_file(directory / f"{name}.pem", signer.private_bytes, mode=0o600)
        public[name] = _public_key_dict(signer.public_key)
    _write_file(directory / ONLINE_PUBLIC_FILE, _json_bytes(public), mode=0o600)


def load_online_keys(directory: Path) -> OnlineKeys:
    """Load the online keys written by :func:`write_online_keys`."""
    public = _read_json(directory / ONLINE_PUBLIC_FILE)
    try:
        signers = {
            name: _load_signer(directory / f"{name}.pem", _key_from_dict(public[name]))
            for name in (*ONLINE_ROOT_ROLES, MODELS_KEY)
        }
    except KeyError as exc:
        raise ValueError(f"{directory / ONLINE_PUBLIC_FILE} lacks the key {exc}") from exc
    return OnlineKeys(
        targets=signers[Targets.type],
        snapshot=signers[Snapshot.type],
        timestamp=signers[Timestamp.type],
        models=signers[MODELS_KEY],
    )


def write_root_keys(directory: Path, keys: RootKeys) -> None:
    """Write an offline root key set (private PEM 0600) and ``root.pub.json``."""
    _make_private_dir(directory)
    for index, signer in enumerate(keys.signers):
        _write_file(directory / f"root-{index}.pem", signer.private_bytes, mode=0o600)
    public = {
        "threshold": keys.threshold,
        "keys": [_public_key_dict(s.public_key) for s in keys.signers],
    }
    _write_file(directory / ROOT_PUBLIC_FILE, _json_bytes(public), mode=0o600)


def load_root_keys(directory: Path) -> RootKeys:
    """Load an offline root key set written by :func:`write_root_keys`."""
    public = _read_json(directory / ROOT_PUBLIC_FILE)
    try:
        entries = public["keys"]
        threshold = int(public["threshold"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{directory / ROOT_PUBLIC_FILE} is malformed") from exc
    signers = tuple(
        _load_signer(directory / f"root-{index}.pem", _key_from_dict(entry))
        for index, entry in enumerate(entries)
    )
    return RootKeys(signers=signers, threshold=threshold)


# --- root metadata ----------------------------------------------------------------


def create_root(
    root_keys: RootKeys,
    online: OnlineKeys,
    *,
    now: datetime,
    expires_in: timedelta = ROOT_EXPIRY,
) -> bytes:
    """Root version 1: the root key set and the online top-level keys, signed."""
    root = Root(version=1, expires=_utc(now) + expires_in, consistent_snapshot=True)
    for signer in root_keys.signers:
        root.add_key(signer.public_key, Root.type)
    root.roles[Root.type].threshold = root_keys.threshold
    for role in ONLINE_ROOT_ROLES:
        root.add_key(online.for_role(role).public_key, role)
    return _sign_root(Metadata(root), trusted=None, signers=root_keys.signers)


def rotate_root(
    current_root: bytes,
    old_keys: RootKeys,
    new_keys: RootKeys,
    *,
    now: datetime,
    expires_in: timedelta = ROOT_EXPIRY,
) -> bytes:
    """The next root version, with ``new_keys`` (and their threshold) as root keys.

    It is signed by ``old_keys`` — which must reach the current root's threshold — and
    by ``new_keys``, which must reach the new threshold. Every current root key not in
    ``new_keys`` is revoked. Pass the same set as old and new to renew root's expiry.
    """
    trusted = _parse_root(current_root)
    root = _next_root(trusted.signed, now=now, expires_in=expires_in)
    for keyid in list(root.roles[Root.type].keyids):
        root.revoke_key(keyid, Root.type)
    for signer in new_keys.signers:
        root.add_key(signer.public_key, Root.type)
    root.roles[Root.type].threshold = new_keys.threshold
    signers = {s.public_key.keyid: s for s in (*old_keys.signers, *new_keys.signers)}
    return _sign_root(Metadata(root), trusted=trusted.signed, signers=list(signers.values()))


def rotate_online(
    current_root: bytes,
    root_keys: RootKeys,
    new_online: OnlineKeys,
    *,
    now: datetime,
    expires_in: timedelta = ROOT_EXPIRY,
) -> bytes:
    """The next root version, naming ``new_online``'s targets/snapshot/timestamp keys.

    Signed by ``root_keys`` (root's keys do not change). The ``models`` key is not in
    root: the repository re-delegates to it when it publishes this root with the new
    online keys (:meth:`server.trust.repository.TrustRepository.publish_root`).
    """
    trusted = _parse_root(current_root)
    root = _next_root(trusted.signed, now=now, expires_in=expires_in)
    for role in ONLINE_ROOT_ROLES:
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        root.add_key(new_online.for_role(role).public_key, role)
    return _sign_root(Metadata(root), trusted=trusted.signed, signers=root_keys.signers)


def parse_root(data: bytes) -> Metadata[Root]:
    """Parse root metadata bytes (no signature check); ``ValueError`` if not a root."""
    return _parse_root(data)


def check_online_keys(root: Root, online: OnlineKeys) -> None:
    """Raise ``ValueError`` unless root names exactly ``online``'s top-level keys."""
    for role in ONLINE_ROOT_ROLES:
        expected = [online.for_role(role).public_key.keyid]
        if root.roles[role].keyids != expected:
            raise ValueError(f"the {role} key of root v{root.version} is not the loaded online key")


# --- helpers ----------------------------------------------------------------------


def _next_root(current: Root, *, now: datetime, expires_in: timedelta) -> Root:
    root = copy.deepcopy(current)  # to_dict()/from_dict() would share the keyid lists
    root.version = current.version + 1
    root.expires = _utc(now) + expires_in
    return root


def _sign_root(
    md: Metadata[Root], *, trusted: Root | None, signers: Sequence[CryptoSigner]
) -> bytes:
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)
    try:
        if trusted is not None:
            trusted.verify_delegate(Root.type, md.signed_bytes, md.signatures)
        md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
    except UnsignedMetadataError as exc:
        raise ValueError(f"root v{md.signed.version} lacks a threshold of signatures") from exc
    return md.to_bytes(_SERIALIZER)


def _parse_root(data: bytes) -> Metadata[Root]:
    md = Metadata[Root].from_bytes(data)
    if not isinstance(md.signed, Root):
        raise ValueError(f"expected root metadata, got {md.signed.type}")
    return md


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return moment.astimezone(UTC)


def _public_key_dict(key: Key) -> dict[str, Any]:
    return {"keyid": key.keyid, **key.to_dict()}


def _key_from_dict(entry: Any) -> SSlibKey:
    if not isinstance(entry, dict) or "keyid" not in entry:
        raise ValueError("a public key entry needs a keyid")
    fields = {k: v for k, v in entry.items() if k != "keyid"}
    key = Key.from_dict(str(entry["keyid"]), fields)
    if not isinstance(key, SSlibKey):
        raise ValueError(f"unsupported key type {type(key).__name__}")
    return key


def _load_signer(path: Path, public_key: SSlibKey) -> CryptoSigner:
    private = load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(private, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an ed25519 private key")
    return CryptoSigner(private, public_key)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON") from exc


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True).encode() + b"\n"


def _make_private_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def _write_file(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``path`` atomically with ``mode``; never overwrite an existing file."""
    if path.exists():
        raise FileExistsError(f"{path} exists; write new keys into a new directory")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # os.open's mode is narrowed by the umask
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
