"""The trust repository against the real python-tuf client (``tuf.ngclient.Updater``).

The client reaches the repository through an in-memory ``FetcherInterface`` (no network);
an attacker is a function that rewrites what the fetcher serves. Each attack of the TUF
threat model that matters here — tampered or arbitrary blobs, tampered metadata,
rollback, freeze, endless data, compromised or rotated keys — must be refused by the
client, and honest changes (new versions, refresh, key rotation) must be followed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote

import pytest
from sqlalchemy.orm import Session, sessionmaker
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, Targets
from tuf.ngclient import FetcherInterface, Updater

import server.models  # noqa: F401  (registers the tables on Base.metadata)
from server.db import Base, make_engine, make_session_factory
from server.errors import BadRequestError, ConflictError, NotFoundError, ServiceError
from server.trust.keys import (
    OnlineKeys,
    RootKeys,
    create_root,
    generate_online_keys,
    generate_root_keys,
    init_keys,
    load_online_keys,
    load_root_keys,
    rotate_online,
    rotate_root,
)
from server.trust.repository import ExpiryPolicy, TargetSpec, TrustRepository
from server.trust.store import (
    MemoryMetadataStore,
    MetadataFile,
    MetadataStore,
    MetadataVersionConflictError,
    SqlMetadataStore,
)

METADATA_URL = "https://diffcast.test/tuf/"
BLOBS_URL = "https://diffcast.test/blobs/"
Tamper = Callable[[str, bytes], Iterator[bytes]]


def honest(_name: str, body: bytes) -> Iterator[bytes]:
    yield body


class RepositoryFetcher(FetcherInterface):
    """Serves ``TrustRepository.metadata_file`` and content-addressed blobs from memory.

    Metadata URLs are ``<METADATA_URL><file name>``; ngclient asks for a target at
    ``<BLOBS_URL><model>/<sha256>.<file name>`` (consistent snapshots), served from
    ``blobs`` by its sha256. An attacker may add files (``planted``) and rewrite
    every (name, body) on its way out (``tamper``).
    """

    def __init__(self, repo: TrustRepository, blobs: dict[str, bytes]) -> None:
        self.repo = repo
        self.blobs = blobs
        self.tamper: Tamper = honest
        self.planted: dict[str, bytes] = {}
        self.requested: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        if url.startswith(METADATA_URL):
            name = unquote(url.removeprefix(METADATA_URL))
            try:
                body = self.planted.get(name) or self.repo.metadata_file(name)
            except NotFoundError:
                raise tuf_errors.DownloadHTTPError(f"{name} not found", 404) from None
        elif url.startswith(BLOBS_URL):
            name = url.removeprefix(BLOBS_URL)
            sha256 = name.partition("/")[2].partition(".")[0]
            if sha256 not in self.blobs:
                raise tuf_errors.DownloadHTTPError(f"{name} not found", 404)
            body = self.blobs[sha256]
        else:
            raise tuf_errors.DownloadHTTPError(f"unknown URL {url}", 404)
        self.requested.append(name)
        return self.tamper(name, body)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Env:
    repo: TrustRepository
    store: MetadataStore
    root_keys: RootKeys
    online: OnlineKeys
    root_v1: bytes
    clock: Clock
    tmp: Path
    blobs: dict[str, bytes] = field(default_factory=dict)
    fetcher: RepositoryFetcher = field(init=False)

    def __post_init__(self) -> None:
        self.fetcher = RepositoryFetcher(self.repo, self.blobs)

    def publish(self, model: str, file_name: str, content: bytes, **custom: object) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        self.blobs[sha256] = content
        path = f"{model}/{file_name}"
        self.repo.add_targets(model, [TargetSpec(path, len(content), sha256, custom)])
        return path

    def updater(self, device: str = "device") -> Updater:
        return Updater(
            metadata_dir=str(self.tmp / device / "metadata"),
            metadata_base_url=METADATA_URL,
            target_dir=str(self.tmp / device / "targets"),
            target_base_url=BLOBS_URL,
            fetcher=self.fetcher,
            bootstrap=self.root_v1,
        )

    def download(self, path: str, device: str = "device") -> bytes:
        updater = self.updater(device)
        updater.refresh()
        info = updater.get_targetinfo(path)
        assert info is not None, f"{path} is not signed"
        return Path(updater.download_target(info)).read_bytes()


def real_now() -> datetime:
    # ngclient checks expiry against the real clock, so the repository signs near it.
    return datetime.now(UTC).replace(microsecond=0)


def sql_store(tmp_path: Path) -> SqlMetadataStore:
    return SqlMetadataStore(sql_sessions(tmp_path))


def sql_sessions(tmp_path: Path) -> sessionmaker[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'trust.db'}")
    Base.metadata.create_all(engine)
    return make_session_factory(engine)


@pytest.fixture(params=["memory", "sql"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Env:
    store: MetadataStore = (
        MemoryMetadataStore() if request.param == "memory" else sql_store(tmp_path)
    )
    return make_env(store, tmp_path, Clock(real_now()))


def make_env(store: MetadataStore, tmp_path: Path, clock: Clock) -> Env:
    root_keys = generate_root_keys()
    online = generate_online_keys()
    root_v1 = create_root(root_keys, online, now=real_now())
    repo = TrustRepository(store, online, clock, ExpiryPolicy())
    assert repo.initialize(root_v1)
    return Env(repo, store, root_keys, online, root_v1, clock, tmp_path)


def flip_one_byte(body: bytes, offset: int = 0) -> bytes:
    return body[:offset] + bytes([body[offset] ^ 0x01]) + body[offset + 1 :]


def refresh_and_look_up(updater: Updater, path: str) -> None:
    updater.refresh()
    updater.get_targetinfo(path)  # fetches the delegated role on the way


def latest_name(env: Env, role: str) -> str:
    return f"{env.store.latest_version(role)}.{role}.json"


# --- the honest path ------------------------------------------------------------------


def test_client_verifies_and_downloads_a_model_target(env: Env) -> None:
    content = b"weights of asr v1" * 100
    path = env.publish("asr", "v1.safetensors", content, version=1, kind="snapshot")

    updater = env.updater()
    updater.refresh()
    info = updater.get_targetinfo(path)

    assert info is not None
    assert info.length == len(content)
    assert info.hashes == {"sha256": hashlib.sha256(content).hexdigest()}
    assert info.custom == {"version": 1, "kind": "snapshot"}
    assert Path(updater.download_target(info)).read_bytes() == content
    assert updater.get_targetinfo("asr/v2.safetensors") is None
    assert updater.get_targetinfo("kws/v1.safetensors") is None
    # consistent snapshots: every file but timestamp.json is fetched by version
    assert "1.model-asr.json" in env.fetcher.requested
    assert "timestamp.json" in env.fetcher.requested


def test_client_follows_new_versions_and_models(env: Env) -> None:
    env.publish("asr", "v1.safetensors", b"one")
    assert env.download("asr/v1.safetensors") == b"one"

    env.publish("asr", "v2.diff", b"two")
    env.publish("kws", "v1.safetensors", b"kws")

    assert env.download("asr/v2.diff") == b"two"
    assert env.download("kws/v1.safetensors") == b"kws"
    assert env.store.latest_version("model-asr") == 2
    assert env.store.latest_version("targets") == 3  # one delegation per new model


def test_adding_an_identical_target_writes_nothing(env: Env) -> None:
    env.publish("asr", "v1.safetensors", b"one", version=1)
    before = {r: env.store.latest_version(r) for r in ("model-asr", "snapshot", "timestamp")}

    spec = TargetSpec("asr/v1.safetensors", 3, hashlib.sha256(b"one").hexdigest(), {"version": 1})
    assert env.repo.add_targets("asr", [spec]) is False

    assert {r: env.store.latest_version(r) for r in before} == before


def test_a_signed_path_never_changes_content(env: Env) -> None:
    env.publish("asr", "v1.safetensors", b"one")
    other = TargetSpec("asr/v1.safetensors", 5, hashlib.sha256(b"other").hexdigest())
    with pytest.raises(ConflictError):
        env.repo.add_targets("asr", [other])


@pytest.mark.parametrize(
    ("model", "spec"),
    [
        ("asr", TargetSpec("kws/v1.bin", 1, "0" * 64)),  # another model's path
        ("asr", TargetSpec("asr/sub/v1.bin", 1, "0" * 64)),  # not "<model>/<file>"
        ("asr", TargetSpec("asr/v1.bin", -1, "0" * 64)),
        ("asr", TargetSpec("asr/v1.bin", 1, "0" * 63)),
        ("asr", TargetSpec("asr/v1.bin", 1, "0" * 64, {"wer": 0.1})),  # floats are unsignable
        ("a/b", TargetSpec("a/b/v1.bin", 1, "0" * 64)),
        ("as*", TargetSpec("as*/v1.bin", 1, "0" * 64)),
    ],
)
def test_invalid_targets_are_refused(env: Env, model: str, spec: TargetSpec) -> None:
    with pytest.raises(BadRequestError):
        env.repo.add_targets(model, [spec])


@pytest.mark.parametrize(
    "name",
    ["foo.json", "1.timestamp.json", "9.root.json", "1.model-kws.json", "../1.root.json", "1.x"],
)
def test_unknown_metadata_files_are_not_found(env: Env, name: str) -> None:
    with pytest.raises(NotFoundError):
        env.repo.metadata_file(name)


def test_initialize_is_idempotent_but_refuses_another_root(env: Env) -> None:
    assert env.repo.initialize(env.root_v1) is False
    other = create_root(env.root_keys, env.online, now=real_now() + timedelta(seconds=5))
    with pytest.raises(ConflictError):
        env.repo.initialize(other)


# --- attacks --------------------------------------------------------------------------


def test_tampered_target_bytes_are_rejected(env: Env) -> None:
    path = env.publish("asr", "v1.safetensors", b"honest weights")
    env.fetcher.tamper = lambda name, body: iter(
        [flip_one_byte(body) if name.startswith("asr/") else body]
    )
    with pytest.raises(tuf_errors.LengthOrHashMismatchError):
        env.download(path)


def test_an_arbitrary_target_in_tampered_metadata_is_rejected(env: Env) -> None:
    """The attacker points the signed path at its own blob of the same length."""
    path = env.publish("asr", "v1.safetensors", b"honest weights")
    evil = b"evil!! weights"
    env.blobs[hashlib.sha256(evil).hexdigest()] = evil
    honest_sha = hashlib.sha256(b"honest weights").hexdigest().encode()

    def swap_hash(name: str, body: bytes) -> Iterator[bytes]:
        yield body.replace(honest_sha, hashlib.sha256(evil).hexdigest().encode())

    env.fetcher.tamper = swap_hash
    with pytest.raises(tuf_errors.UnsignedMetadataError):
        env.download(path)


@pytest.mark.parametrize(
    ("role", "error"),
    [
        ("timestamp", tuf_errors.UnsignedMetadataError),
        ("snapshot", tuf_errors.LengthOrHashMismatchError),  # timestamp pins its sha256
        ("targets", tuf_errors.UnsignedMetadataError),
        ("model-asr", tuf_errors.UnsignedMetadataError),
    ],
)
def test_tampered_metadata_is_rejected(env: Env, role: str, error: type[Exception]) -> None:
    path = env.publish("asr", "v1.safetensors", b"weights")
    target = "timestamp.json" if role == "timestamp" else latest_name(env, role)

    def bump_expiry_year(name: str, body: bytes) -> Iterator[bytes]:
        if name == target:  # same length, so only the signature can tell
            signed = json.loads(body)["signed"]
            year = signed["expires"][:4]
            body = body.replace(
                f'"expires":"{year}'.encode(), f'"expires":"{int(year) + 1}'.encode()
            )
        yield body

    env.fetcher.tamper = bump_expiry_year
    with pytest.raises(error):
        env.download(path)


def test_replayed_older_timestamp_is_rejected(env: Env) -> None:
    path = env.publish("asr", "v1.safetensors", b"one")
    old_timestamp = env.store.get("timestamp")
    env.publish("asr", "v2.diff", b"two")
    env.download(path)  # the device now trusts the newer timestamp

    env.fetcher.tamper = lambda name, body: iter(
        [old_timestamp if name == "timestamp.json" else body]
    )
    with pytest.raises(tuf_errors.BadVersionNumberError):
        env.updater().refresh()


@pytest.mark.parametrize(
    ("role", "error"),
    [
        # timestamp pins snapshot's sha256, so a replayed snapshot fails on its hash
        ("snapshot", tuf_errors.LengthOrHashMismatchError),
        ("model-asr", tuf_errors.BadVersionNumberError),
    ],
)
def test_replayed_older_snapshot_or_model_role_is_rejected(
    env: Env, role: str, error: type[Exception]
) -> None:
    env.publish("asr", "v1.safetensors", b"one")
    older = env.store.get(role)
    # re-signs every role: same content and length, next version
    env.repo.refresh(env.clock.now + timedelta(days=4))
    current = latest_name(env, role)
    assert len(env.store.get(role)) == len(older)
    env.fetcher.tamper = lambda name, body: iter([older if name == current else body])

    with pytest.raises(error):
        refresh_and_look_up(env.updater(), "asr/v1.safetensors")


def test_expired_timestamp_is_rejected_until_refreshed(tmp_path: Path) -> None:
    clock = Clock(real_now() - timedelta(days=2))  # a server whose signatures went stale
    env = make_env(MemoryMetadataStore(), tmp_path, clock)
    path = env.publish("asr", "v1.safetensors", b"weights")

    with pytest.raises(tuf_errors.ExpiredMetadataError):
        env.download(path)

    clock.now = real_now()
    assert env.repo.refresh() == ["timestamp"]
    assert env.download(path, device="other") == b"weights"


def test_refresh_renews_each_role_before_it_expires(env: Env) -> None:
    start = env.clock.now
    env.publish("asr", "v1.safetensors", b"weights")

    assert env.repo.refresh(start) == []
    assert env.repo.refresh(start + timedelta(hours=13)) == ["timestamp"]
    renewed = env.repo.refresh(start + timedelta(days=4))
    assert sorted(renewed) == ["model-asr", "snapshot", "targets", "timestamp"]
    assert env.repo.refresh(start + timedelta(days=4)) == []
    assert env.download("asr/v1.safetensors") == b"weights"


def test_endless_target_download_is_cut_at_the_signed_length(env: Env) -> None:
    path = env.publish("asr", "v1.safetensors", b"x" * 1000)
    served = itertools.count()

    def endless(name: str, body: bytes) -> Iterator[bytes]:
        yield body
        if name.startswith("asr/"):
            for _ in served:
                yield b"\0" * 1024

    env.fetcher.tamper = endless
    with pytest.raises(tuf_errors.DownloadLengthMismatchError):
        env.download(path)
    assert next(served) <= 2  # the client stopped reading at once


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "model-asr"])
def test_endless_metadata_is_cut(env: Env, role: str) -> None:
    env.publish("asr", "v1.safetensors", b"weights")
    target = "timestamp.json" if role == "timestamp" else latest_name(env, role)

    def endless(name: str, body: bytes) -> Iterator[bytes]:
        yield body
        if name == target:
            yield from itertools.repeat(b" " * 4096)

    env.fetcher.tamper = endless
    with pytest.raises(tuf_errors.DownloadLengthMismatchError):
        refresh_and_look_up(env.updater(), "asr/v1.safetensors")


# --- key rotation ---------------------------------------------------------------------


def test_root_rotation_is_followed_by_the_client(env: Env) -> None:
    path = env.publish("asr", "v1.safetensors", b"weights")
    env.download(path)

    new_root_keys = generate_root_keys(count=3, threshold=2)
    root_v2 = rotate_root(env.root_v1, env.root_keys, new_root_keys, now=real_now())
    env.repo.publish_root(root_v2)
    env.repo.publish_root(root_v2)  # a second replica publishing it too is harmless

    assert env.download(path) == b"weights"
    history = env.tmp / "device" / "metadata" / "root_history"
    assert (history / "2.root.json").read_bytes() == root_v2
    trusted = Metadata[Root].from_bytes(root_v2).signed
    assert trusted.roles["root"].threshold == 2
    assert set(trusted.roles["root"].keyids) == set(new_root_keys.keyids)


def test_online_key_rotation_re_signs_everything(env: Env) -> None:
    path = env.publish("asr", "v1.safetensors", b"weights")
    env.download(path)

    new_online = generate_online_keys()
    root_v2 = rotate_online(env.root_v1, env.root_keys, new_online, now=real_now())
    env.repo.publish_root(root_v2, new_online)

    assert env.download(path) == b"weights"
    assert env.download(env.publish("asr", "v2.diff", b"two")) == b"two"
    model_role = Metadata[Targets].from_bytes(env.repo.metadata_file(latest_name(env, "model-asr")))
    assert list(model_role.signatures) == [new_online.models.public_key.keyid]

    with pytest.raises(BadRequestError):  # a root naming keys the server lacks
        env.repo.publish_root(
            rotate_online(root_v2, env.root_keys, generate_online_keys(), now=real_now())
        )
    stale_replica = TrustRepository(env.store, env.online, env.clock)
    with pytest.raises(ServiceError, match="online keys"):
        stale_replica.add_targets("asr", [])


def test_root_rotation_needs_a_threshold_of_the_old_keys(env: Env) -> None:
    two_of_three = generate_root_keys(count=3, threshold=2)
    root_v2 = rotate_root(env.root_v1, env.root_keys, two_of_three, now=real_now())
    env.repo.publish_root(root_v2)
    one_old_key = RootKeys(two_of_three.signers[:1], threshold=1)
    attacker = generate_root_keys()

    with pytest.raises(ValueError, match="threshold"):
        rotate_root(root_v2, one_old_key, attacker, now=real_now())

    # A root v3 signed by the attacker's keys and one old key: the repository refuses it…
    forged = Metadata[Root].from_bytes(root_v2)
    forged.signed.version = 3
    for keyid in list(forged.signed.roles["root"].keyids):
        forged.signed.revoke_key(keyid, "root")
    forged.signed.add_key(attacker.signers[0].public_key, "root")
    forged.sign(attacker.signers[0])
    forged.sign(two_of_three.signers[0], append=True)
    forged_bytes = forged.to_bytes()
    with pytest.raises(BadRequestError):
        env.repo.publish_root(forged_bytes)

    # …and so does a device it is served to.
    env.fetcher.planted["3.root.json"] = forged_bytes
    with pytest.raises(tuf_errors.UnsignedMetadataError):
        env.updater().refresh()


# --- size -----------------------------------------------------------------------------


def test_top_level_metadata_does_not_grow_with_versions(tmp_path: Path) -> None:
    env = make_env(MemoryMetadataStore(), tmp_path, Clock(real_now()))
    env.publish("asr", "v0.safetensors", b"base")
    top_before = len(env.store.get("targets"))
    snapshot_before = len(env.store.get("snapshot"))

    for batch in range(50):
        specs = [
            TargetSpec(f"asr/v{batch}-{i}.diff", 10, hashlib.sha256(bytes([batch, i])).hexdigest())
            for i in range(4)
        ]
        env.repo.add_targets("asr", specs)

    assert len(env.store.get("targets")) == top_before  # untouched by versions
    assert len(env.store.get("snapshot")) - snapshot_before <= 4  # version digits only
    assert len(env.store.get("timestamp")) < 600

    model_asr = len(env.store.get("model-asr"))
    for number in range(20):
        env.publish(f"model{number}", "v1.safetensors", bytes([number]))
    per_model_top = (len(env.store.get("targets")) - top_before) / 20
    per_model_snapshot = (len(env.store.get("snapshot")) - snapshot_before) / 20
    assert per_model_top < 250
    assert per_model_snapshot < 80
    assert len(env.store.get("model-asr")) == model_asr  # other models do not touch it
    assert env.download("model7/v1.safetensors") == bytes([7])
    assert not [n for n in env.fetcher.requested if "model-asr" in n]  # nor does its device


# --- stores and concurrency ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sql"])
def test_a_batch_is_stored_entirely_or_not_at_all(kind: str, tmp_path: Path) -> None:
    store: MetadataStore = MemoryMetadataStore() if kind == "memory" else sql_store(tmp_path)
    store.put("snapshot", 1, b"s1")

    with pytest.raises(MetadataVersionConflictError):
        store.put_many([MetadataFile("model-asr", 1, b"m1"), MetadataFile("snapshot", 1, b"s1'")])

    assert store.latest_version("model-asr") == 0
    assert store.get("snapshot") == b"s1"
    store.put_many([MetadataFile("snapshot", 2, b"s2"), MetadataFile("model-asr", 1, b"m1")])
    assert store.get("snapshot") == b"s2"
    assert store.get("snapshot", 1) == b"s1"
    with pytest.raises(NotFoundError):
        store.get("snapshot", 3)


class RacingStore(MemoryMetadataStore):
    """Runs ``rival`` (once) just before the next batch lands: a replica that won."""

    def __init__(self) -> None:
        super().__init__()
        self.rival: Callable[[], object] | None = None
        self.batches = 0

    def put_many(self, files: Sequence[MetadataFile]) -> None:
        self.batches += 1
        rival, self.rival = self.rival, None
        if rival is not None:
            rival()
        super().put_many(files)


def test_a_publisher_that_lost_a_race_retries_from_fresh_metadata(tmp_path: Path) -> None:
    store = RacingStore()
    env = make_env(store, tmp_path, Clock(real_now()))
    rival = TrustRepository(store, env.online, env.clock)
    kws = b"kws weights"
    env.blobs[hashlib.sha256(kws).hexdigest()] = kws
    store.rival = lambda: rival.add_targets(
        "kws", [TargetSpec("kws/v1.bin", len(kws), hashlib.sha256(kws).hexdigest())]
    )
    batches = store.batches

    env.publish("asr", "v1.bin", b"asr weights")

    assert store.batches - batches == 3  # ours (refused), the rival's, ours again
    assert [store.latest_version(r) for r in ("targets", "snapshot", "timestamp")] == [3, 3, 3]
    assert env.download("asr/v1.bin") == b"asr weights"
    assert env.download("kws/v1.bin") == b"kws weights"


def test_a_publisher_gives_up_after_max_attempts(tmp_path: Path) -> None:
    class LosingStore(MemoryMetadataStore):
        losing = False
        attempts = 0

        def put_many(self, files: Sequence[MetadataFile]) -> None:
            self.attempts += 1
            if self.losing:
                raise MetadataVersionConflictError("another replica is always first")
            super().put_many(files)

    store = LosingStore()
    env = make_env(store, tmp_path, Clock(real_now()))
    repo = TrustRepository(store, env.online, env.clock, max_attempts=3)
    store.losing, store.attempts = True, 0

    with pytest.raises(ConflictError):
        repo.add_targets("asr", [TargetSpec("asr/v1.bin", 1, "0" * 64)])
    assert store.attempts == 3


def test_concurrent_replicas_never_publish_two_files_with_one_name(tmp_path: Path) -> None:
    sessions = sql_sessions(tmp_path)
    env = make_env(SqlMetadataStore(sessions), tmp_path, Clock(real_now()))
    replicas = [
        TrustRepository(SqlMetadataStore(sessions), env.online, env.clock) for _ in range(2)
    ]
    errors: list[BaseException] = []

    def publish(replica: int) -> None:
        try:
            for number in range(8):
                content = f"{replica}-{number}".encode()
                sha256 = hashlib.sha256(content).hexdigest()
                env.blobs[sha256] = content
                spec = TargetSpec(f"shared/r{replica}-{number}.diff", len(content), sha256)
                replicas[replica].add_targets("shared", [spec])
                own = TargetSpec(f"m{replica}-{number}/v1.bin", len(content), sha256)
                replicas[replica].add_targets(f"m{replica}-{number}", [own])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []

    # Every version of snapshot and timestamp exists once, with no gaps.
    for role in ("snapshot", "timestamp", "model-shared"):
        latest = env.store.latest_version(role)
        versions = [
            Metadata.from_bytes(env.store.get(role, v)).signed.version for v in range(1, latest + 1)
        ]
        assert versions == list(range(1, latest + 1))
    assert env.store.latest_version("model-shared") == 16
    updater = env.updater()
    updater.refresh()
    for replica, number in itertools.product(range(2), range(8)):
        assert updater.get_targetinfo(f"shared/r{replica}-{number}.diff") is not None
        assert updater.get_targetinfo(f"m{replica}-{number}/v1.bin") is not None


# --- key files ------------------------------------------------------------------------


def test_key_files_are_private_and_load_back(tmp_path: Path) -> None:
    now = real_now()
    online_dir, root_dir = tmp_path / "online", tmp_path / "root"
    root_v1 = init_keys(online_dir, root_dir, now=now, root_key_count=3, root_threshold=2)

    for directory in (online_dir, root_dir):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        for key_file in [*directory.glob("*.pem"), *directory.glob("*.pub.json")]:
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, key_file
    assert sorted(p.name for p in online_dir.glob("*.pem")) == [
        "models.pem",
        "snapshot.pem",
        "targets.pem",
        "timestamp.pem",
    ]
    assert (online_dir / "1.root.json").read_bytes() == root_v1

    online = load_online_keys(online_dir)
    root_keys = load_root_keys(root_dir)
    root = Metadata[Root].from_bytes(root_v1).signed
    assert root.roles["timestamp"].keyids == [online.timestamp.public_key.keyid]
    assert set(root.roles["root"].keyids) == set(root_keys.keyids)
    assert root.roles["root"].threshold == 2
    assert root.expires - now == timedelta(days=365)

    # the loaded keys sign: they can run a repository and rotate root
    repo = TrustRepository(MemoryMetadataStore(), online, Clock(now))
    repo.initialize(root_v1)
    repo.publish_root(rotate_root(root_v1, root_keys, root_keys, now=now))

    with pytest.raises(FileExistsError):
        init_keys(online_dir, root_dir, now=now)
