"""The signed-metadata repository the server keeps so devices can trust every blob.

A TUF repository (python-tuf's Metadata API) with consistent snapshots, stored in a
:class:`~server.trust.store.MetadataStore`. Role layout::

    root                 offline keys; names the targets/snapshot/timestamp keys
    ├── timestamp        online; names the current snapshot (version, length, sha256)
    ├── snapshot         online; version and length of targets and every model role
    └── targets          online; holds no targets, delegates one role per model:
        ├── model-asr    online "models" key; paths "asr/*"; the files of model asr
        └── model-kws    ...                   paths "kws/*"

Properties a device gets from python-tuf's ngclient reading this repository:

- no arbitrary or tampered blob: every target is signed with its length and sha256,
  by the role delegated for exactly that model's paths;
- no rollback: every role's version only grows, snapshot pins every targets role's
  version, timestamp pins snapshot's; a file once published is never replaced
  (the store is append-only);
- no indefinite freeze: every file expires (:class:`ExpiryPolicy`); :meth:`refresh`
  re-signs before it does;
- no endless data: timestamp gives snapshot's length, snapshot every role's length,
  every target its length;
- key rotation: :meth:`publish_root` stores root N+1 (made offline by
  :mod:`server.trust.keys`) and re-signs the online roles with the keys it names.

Size. A device updating model ``m`` fetches timestamp (constant, ~0.5 kB), snapshot
(~50 B per model), top-level targets (~160 B per model: one delegation) and
``model-m`` (~150 B plus its ``custom`` per target file of ``m``). So the top-level
files grow with the number of models only — never with versions — and a model's role
grows with that model's own files only; other models' roles are not fetched. At 1,000
models and 1,000 files in one model a device reads ~0.5 MB once; later polls fetch
only the files whose version changed. Hash-bin delegation inside a model would bound
the model role further but is not worth its cost below ~10,000 files per model.

Concurrency: an operation reads the latest files, signs the next versions and writes
them with one :meth:`~server.trust.store.MetadataStore.put_many`; a writer that lost a
race gets a version conflict for its whole batch and starts over from a fresh read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

# python-tuf and securesystemslib re-export these names without ``__all__``; see keys.py.
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import CryptoSigner, Key
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from server.errors import BadRequestError, ConflictError, NotFoundError, ServiceError
from server.trust.keys import OnlineKeys, check_online_keys
from server.trust.store import MetadataFile, MetadataStore, MetadataVersionConflictError

logger = logging.getLogger(__name__)

MODEL_ROLE_PREFIX = "model-"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,121}")
"""Model names safe in a role name (<= 128 chars), a URL and a TUF path pattern."""
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSIONED_FILE = re.compile(r"(?P<version>[1-9][0-9]{0,9})\.(?P<role>[A-Za-z0-9._-]+)\.json")
_TOP_LEVEL = (Root.type, Timestamp.type, Snapshot.type, Targets.type)

_SERIALIZER = JSONSerializer(compact=True)
_T = TypeVar("_T", Root, Timestamp, Snapshot, Targets)
_R = TypeVar("_R")


@dataclass(frozen=True)
class ExpiryPolicy:
    """How long each role's files live, and when :meth:`TrustRepository.refresh` renews.

    A file is re-signed when less than ``renew_fraction`` of its lifetime is left, so a
    refresh at least that often (e.g. hourly) keeps every file valid.
    """

    targets: timedelta = timedelta(days=7)
    """Top-level targets and every model role."""
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)
    renew_fraction: float = 0.5
    root_warning: timedelta = timedelta(days=30)
    """:meth:`TrustRepository.refresh` logs a warning when root expires sooner."""

    def __post_init__(self) -> None:
        if min(self.targets, self.snapshot, self.timestamp) <= timedelta(0):
            raise ValueError("metadata lifetimes must be positive")
        if not 0 < self.renew_fraction < 1:
            raise ValueError("renew_fraction must lie in (0, 1)")

    def lifetime(self, role: str) -> timedelta:
        if role == Timestamp.type:
            return self.timestamp
        if role == Snapshot.type:
            return self.snapshot
        return self.targets

    def needs_renewal(self, role: str, signed: Signed, now: datetime) -> bool:
        return signed.expires - now < self.lifetime(role) * self.renew_fraction


@dataclass(frozen=True)
class TargetSpec:
    """One downloadable file of a model: ``<model>/<file name>``, its length and sha256.

    ``custom`` is signed with it (e.g. version number, digests, kind); it must be JSON
    without floats (TUF signs canonical JSON).
    """

    path: str
    length: int
    sha256: str
    custom: Mapping[str, Any] = field(default_factory=dict)


def model_role(model_name: str) -> str:
    """The delegated role that signs ``model_name``'s files."""
    if _MODEL_NAME.fullmatch(model_name) is None:
        raise BadRequestError(
            f"model name {model_name!r} must match {_MODEL_NAME.pattern} to be signed"
        )
    return f"{MODEL_ROLE_PREFIX}{model_name}"


class TrustRepository:
    """Signs and serves the TUF metadata for every model's files.

    ``clock`` returns the current time (timezone-aware); expiry dates are computed from
    it. The online keys must be those root names (checked before every signature), so
    a replica still holding rotated-out keys refuses to sign instead of publishing
    metadata that devices would reject.
    """

    def __init__(
        self,
        store: MetadataStore,
        online_keys: OnlineKeys,
        clock: Callable[[], datetime],
        expiry: ExpiryPolicy | None = None,
        *,
        max_attempts: int = 20,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._store = store
        self._keys = online_keys
        self._clock = clock
        self._expiry = expiry or ExpiryPolicy()
        self._max_attempts = max_attempts
        self._checked_root_version = 0

    # --- operations ---------------------------------------------------------------

    def initialize(self, root_bytes: bytes) -> bool:
        """Store root v1 and empty targets, snapshot and timestamp (version 1 each).

        Idempotent: returns ``False`` when the repository already has this root v1;
        :class:`ConflictError` when it has another one.
        """
        root = _parse(root_bytes, Root)
        if root.signed.version != 1:
            raise BadRequestError(f"initialize with root v1, not v{root.signed.version}")
        _verify_root(root, trusted=None)
        self._require_matching_keys(root.signed, self._keys)

        def attempt() -> bool:
            if self._store.latest_version(Root.type) > 0:
                if self._store.get(Root.type, 1) == root_bytes:
                    return False
                raise ConflictError("the trust repository holds another root v1")
            now = self._now()
            if root.signed.is_expired(now):
                raise BadRequestError("root v1 has expired")
            targets = Metadata(Targets(version=1, expires=now))
            root_file = MetadataFile(Root.type, 1, root_bytes)
            self._publish(now, self._keys, {Targets.type: targets}, first=True, extra=[root_file])
            return True

        return self._retrying(attempt)

    def add_targets(self, model_name: str, targets: Sequence[TargetSpec]) -> bool:
        """Sign ``targets`` into ``model_name``'s role (delegating it on first use).

        Bumps the model role, snapshot and timestamp (and top-level targets when the
        delegation is new). Returns ``False`` and writes nothing when every target is
        already signed identically; a path signed with other content is a
        :class:`ConflictError` (a device may already hold the old one).
        """
        role = model_role(model_name)
        files = {spec.path: _target_file(model_name, spec) for spec in targets}
        if len(files) != len(targets):
            raise BadRequestError("the same target path appears twice")

        def attempt() -> bool:
            now = self._now()
            keys = self._current_keys()
            top = self._latest(Targets.type, Targets)
            changed: dict[str, Metadata[Targets]] = {}
            if _delegate(top.signed, model_name, keys.models.public_key):
                top.signed.version += 1
                changed[Targets.type] = top
            model = self._latest_or_none(role, Targets)
            if model is None:
                model = Metadata(Targets(version=1, expires=now))
                _merge_targets(model.signed, files)
                changed[role] = model
            elif _merge_targets(model.signed, files):
                model.signed.version += 1
                changed[role] = model
            if not changed:
                return False
            self._publish(now, keys, changed)
            return True

        return self._retrying(attempt)

    def refresh(self, now: datetime | None = None) -> list[str]:
        """Re-sign every role that expires within its renewal window; return their names.

        Run it periodically (more often than ``timestamp * renew_fraction``); it reads
        every model role, so its cost grows with all metadata, and it writes only when
        something is due. Root is offline: a root close to expiry is only logged —
        renew it with :func:`server.trust.keys.rotate_root` and :meth:`publish_root`.
        """

        def attempt() -> list[str]:
            moment = _utc(now) if now is not None else self._now()
            keys = self._current_keys()
            root = self._latest(Root.type, Root)
            if root.signed.expires - moment < self._expiry.root_warning:
                logger.warning("root v%d expires at %s", root.signed.version, root.signed.expires)
            snapshot = self._latest(Snapshot.type, Snapshot)
            timestamp = self._latest(Timestamp.type, Timestamp)
            changed: dict[str, Metadata[Targets]] = {}
            for role in _targets_roles(snapshot.signed):
                md = self._latest(role, Targets)
                if self._expiry.needs_renewal(role, md.signed, moment):
                    md.signed.version += 1
                    changed[role] = md
            renew_snapshot = self._expiry.needs_renewal(Snapshot.type, snapshot.signed, moment)
            renew_timestamp = self._expiry.needs_renewal(Timestamp.type, timestamp.signed, moment)
            if not (changed or renew_snapshot or renew_timestamp):
                return []
            written = self._publish(moment, keys, changed, renew_snapshot=renew_snapshot)
            return [f.role for f in written]

        return self._retrying(attempt)

    def publish_root(self, root_bytes: bytes, online_keys: OnlineKeys | None = None) -> None:
        """Store root N+1 and re-sign the online roles with the keys it names.

        ``root_bytes`` must be the next version, signed by a threshold of the current
        root's keys and of its own. Pass ``online_keys`` when the root rotates them
        (:func:`server.trust.keys.rotate_online`); a changed ``models`` key is
        delegated anew and every model role is re-signed with it. Publishing the same
        root twice (e.g. from two replicas) is harmless.
        """
        new_root = _parse(root_bytes, Root)
        keys = online_keys or self._keys
        try:
            check_online_keys(new_root.signed, keys)
        except ValueError as exc:
            raise BadRequestError(f"root does not name the online keys given: {exc}") from exc
        version = new_root.signed.version

        def attempt() -> None:
            now = self._now()
            latest = self._store.latest_version(Root.type)
            if version <= latest:
                if self._store.get(Root.type, version) != root_bytes:
                    raise ConflictError(f"another root v{version} is already published")
                return
            if version != latest + 1:
                raise BadRequestError(f"the next root is v{latest + 1}, not v{version}")
            _verify_root(new_root, trusted=self._latest(Root.type, Root).signed)
            if new_root.signed.is_expired(now):
                raise BadRequestError(f"root v{version} has expired")
            top = self._latest(Targets.type, Targets)
            top.signed.version += 1
            changed = {Targets.type: top}
            if _redelegate(top.signed, keys.models.public_key):
                for role in _targets_roles(self._latest(Snapshot.type, Snapshot).signed):
                    if role != Targets.type:
                        md = self._latest(role, Targets)
                        md.signed.version += 1
                        changed[role] = md
            root_file = MetadataFile(Root.type, version, root_bytes)
            self._publish(now, keys, changed, renew_snapshot=True, extra=[root_file])

        self._retrying(attempt)
        self._keys = keys
        self._checked_root_version = 0

    def metadata_file(self, name: str) -> bytes:
        """The bytes of the file ngclient asks for by ``name``; :class:`NotFoundError`.

        ``timestamp.json``; ``<N>.root.json``, ``<N>.snapshot.json``,
        ``<N>.targets.json``, ``<N>.model-<name>.json`` (consistent snapshots); and
        ``root.json``, the latest root, for provisioning.
        """
        if name == "timestamp.json":
            return self._store.get(Timestamp.type)
        if name == "root.json":
            return self._store.get(Root.type)
        match = _VERSIONED_FILE.fullmatch(name)
        if match is None:
            raise NotFoundError(f"no metadata file {name!r}")
        role = match["role"]
        if role == Timestamp.type or (
            role not in _TOP_LEVEL and not role.startswith(MODEL_ROLE_PREFIX)
        ):
            raise NotFoundError(f"no metadata file {name!r}")
        return self._store.get(role, int(match["version"]))

    # --- internals ----------------------------------------------------------------

    def _publish(
        self,
        now: datetime,
        keys: OnlineKeys,
        changed: Mapping[str, Metadata[Targets]],
        *,
        renew_snapshot: bool = False,
        first: bool = False,
        extra: Sequence[MetadataFile] = (),
    ) -> list[MetadataFile]:
        """Sign ``changed`` (versions already bumped), then snapshot and timestamp.

        Everything is written in one batch; a new snapshot is made when a targets role
        changed or ``renew_snapshot``, and a new timestamp always.
        """
        files = list(extra)
        if first:
            snapshot = Metadata(Snapshot(version=1, expires=now, meta={}))
            timestamp = Metadata(Timestamp(version=1, expires=now))
        else:
            snapshot = self._latest(Snapshot.type, Snapshot)
            timestamp = self._latest(Timestamp.type, Timestamp)
            timestamp.signed.version += 1
        for role, md in changed.items():
            signer = keys.targets if role == Targets.type else keys.models
            body = self._sign(md, role, signer, now)
            files.append(MetadataFile(role, md.signed.version, body))
            snapshot.signed.meta[f"{role}.json"] = MetaFile(md.signed.version, len(body))
        if first or changed or renew_snapshot:
            if not first:
                snapshot.signed.version += 1
            body = self._sign(snapshot, Snapshot.type, keys.snapshot, now)
            files.append(MetadataFile(Snapshot.type, snapshot.signed.version, body))
            timestamp.signed.snapshot_meta = MetaFile(
                snapshot.signed.version, len(body), {"sha256": hashlib.sha256(body).hexdigest()}
            )
        body = self._sign(timestamp, Timestamp.type, keys.timestamp, now)
        files.append(MetadataFile(Timestamp.type, timestamp.signed.version, body))
        self._store.put_many(files)
        return files

    def _sign(self, md: Metadata[Any], role: str, signer: CryptoSigner, now: datetime) -> bytes:
        md.signed.expires = now + self._expiry.lifetime(role)
        md.sign(signer)
        return md.to_bytes(_SERIALIZER)

    def _retrying(self, attempt: Callable[[], _R]) -> _R:
        for number in range(1, self._max_attempts + 1):
            try:
                return attempt()
            except MetadataVersionConflictError:
                if number == self._max_attempts:
                    raise
                logger.info("metadata publish lost a race (attempt %d); retrying", number)
        raise AssertionError("unreachable")  # pragma: no cover

    def _current_keys(self) -> OnlineKeys:
        """The online keys, after checking (once per root version) that root names them."""
        latest = self._store.latest_version(Root.type)
        if latest == 0:
            raise ServiceError("the trust repository is not initialized")
        if latest != self._checked_root_version:
            root = self._latest(Root.type, Root)
            self._require_matching_keys(root.signed, self._keys)
            self._checked_root_version = root.signed.version
        return self._keys

    @staticmethod
    def _require_matching_keys(root: Root, keys: OnlineKeys) -> None:
        try:
            check_online_keys(root, keys)
        except ValueError as exc:
            raise ServiceError(f"online keys do not match root: {exc}") from exc

    def _latest(self, role: str, kind: type[_T]) -> Metadata[_T]:
        md = self._latest_or_none(role, kind)
        if md is None:
            raise ServiceError(f"the trust repository has no {role} metadata")
        return md

    def _latest_or_none(self, role: str, kind: type[_T]) -> Metadata[_T] | None:
        try:
            body = self._store.get(role)
        except NotFoundError:
            return None
        return _parse(body, kind)

    def _now(self) -> datetime:
        return _utc(self._clock())


def _parse(body: bytes, kind: type[_T]) -> Metadata[_T]:
    try:
        md = Metadata[_T].from_bytes(body)
    except DeserializationError as exc:
        raise BadRequestError(f"malformed {kind.type} metadata: {exc}") from exc
    if not isinstance(md.signed, kind):
        raise BadRequestError(f"expected {kind.type} metadata, got {md.signed.type}")
    return md


def _verify_root(root: Metadata[Root], *, trusted: Root | None) -> None:
    """Root N+1 needs a threshold of root N's keys (``trusted``) and of its own."""
    try:
        if trusted is not None:
            trusted.verify_delegate(Root.type, root.signed_bytes, root.signatures)
        root.signed.verify_delegate(Root.type, root.signed_bytes, root.signatures)
    except UnsignedMetadataError as exc:
        raise BadRequestError(f"root v{root.signed.version} is not signed: {exc}") from exc


def _target_file(model_name: str, spec: TargetSpec) -> TargetFile:
    directory, _, file_name = spec.path.partition("/")
    if directory != model_name or _FILE_NAME.fullmatch(file_name) is None:
        raise BadRequestError(
            f"target path {spec.path!r} must be '{model_name}/<file name>' "
            f"with a file name matching {_FILE_NAME.pattern}"
        )
    if spec.length < 0:
        raise BadRequestError(f"target {spec.path!r} has a negative length")
    if _SHA256.fullmatch(spec.sha256) is None:
        raise BadRequestError(f"target {spec.path!r}: sha256 must be 64 lowercase hex digits")
    unrecognized: dict[str, Any] = {}
    if spec.custom:
        try:
            # What a device will read back: canonical JSON, no floats, lists not tuples.
            unrecognized["custom"] = json.loads(encode_canonical(dict(spec.custom)) or "{}")
        except Exception as exc:
            raise BadRequestError(
                f"target {spec.path!r}: custom must be JSON without floats"
            ) from exc
    return TargetFile(spec.length, {"sha256": spec.sha256}, spec.path, unrecognized)


def _merge_targets(model: Targets, files: Mapping[str, TargetFile]) -> bool:
    """Add ``files`` to ``model``; ``True`` if any was new. Differing content conflicts."""
    added = False
    for path, target in files.items():
        existing = model.targets.get(path)
        if existing is None:
            model.targets[path] = target
            added = True
        elif existing != target:
            raise ConflictError(f"target {path!r} is already signed with other content")
    return added


def _delegate(top: Targets, model_name: str, key: Key) -> bool:
    """Delegate ``<model_name>/*`` to the model's role with ``key``; ``True`` if new."""
    role = f"{MODEL_ROLE_PREFIX}{model_name}"
    if top.delegations is None:
        top.delegations = Delegations(keys={}, roles={})
    roles = top.delegations.roles
    if roles is None:
        raise ServiceError("top-level targets uses succinct roles; expected one per model")
    if role in roles:
        if roles[role].keyids != [key.keyid]:
            raise ServiceError(f"{role} is delegated to another key than the loaded one")
        return False
    roles[role] = DelegatedRole(role, [], 1, True, paths=[f"{model_name}/*"])
    top.add_key(key, role)
    return True


def _redelegate(top: Targets, key: Key) -> bool:
    """Point every model role at ``key``; ``True`` if it was another key."""
    if top.delegations is None or not top.delegations.roles:
        return False
    roles = top.delegations.roles
    if all(r.keyids == [key.keyid] for r in roles.values()):
        return False
    top.delegations.keys = {key.keyid: key}
    for delegated in roles.values():
        delegated.keyids = [key.keyid]
    return True


def _targets_roles(snapshot: Snapshot) -> Iterator[str]:
    for name in snapshot.meta:
        yield name.removesuffix(".json")


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("the clock must return timezone-aware times")
    return moment.astimezone(UTC)
