"""An app per test on SQLite and on PostgreSQL (a fresh database each), and helpers
that make small models and diffs to publish."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient

from diffs.container import diff_bytes
from diffs.make import make_exact
from diffs.model import Tensor, save_model
from server.app import create_app
from server.settings import Settings
from server.trust.keys import init_keys

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
ADMIN_TOKEN = "dct_admin-test-token"
ENROLL_SECRET = "enroll-test-secret"


def _pg_available() -> bool:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    if not _pg_available():
        pytest.fail("PostgreSQL is not reachable at 127.0.0.1:5432 (start it: see .ci/run)")
    name = f"diffcast_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _reset_pg(url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Signing keys made once per session (as `diffcast keys init` makes them)."""
    root = tmp_path_factory.mktemp("keys")
    init_keys(root / "online", root / "root", now=datetime.now(UTC))
    return root


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path, keys_dir: Path) -> Settings:
    url = None
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        _reset_pg(url)
    return Settings(
        data_dir=tmp_path / "data",
        database_url=url,
        keys_dir=keys_dir,
        migrate_on_start=True,
        bootstrap_token=ADMIN_TOKEN,
        enrollment_secret=ENROLL_SECRET,
        max_upload_bytes=4 * 1024 * 1024,
        poll_cache_seconds=0.0,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings)
    with TestClient(app) as test_client:
        test_client.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        yield test_client
    app.state.context.engine.dispose()


@dataclass
class Lineage:
    """A base model and four successive fine-tunes, with the exact diffs between them."""

    files: list[Path]
    digests: list[str]
    diffs: list[bytes]


@pytest.fixture(scope="session")
def lineage(tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    from diffs.digest import model_digest

    out = tmp_path_factory.mktemp("lineage")
    rng = np.random.default_rng(11)
    model = {
        "enc.weight": Tensor.of(rng.standard_normal((64, 48)).astype(np.float32)),
        "enc.bias": Tensor.of(rng.standard_normal(64).astype(np.float32)),
        "head.weight": Tensor.of(rng.standard_normal((16, 64)).astype(np.float16)),
    }
    files, digests, diffs = [], [], []
    for number in range(5):
        if number:
            previous = model
            model = {}
            for name, tensor in previous.items():
                flat = tensor.array.reshape(-1).copy()
                chosen = rng.choice(flat.size, max(1, flat.size // 20), replace=False)
                flat[chosen] += (rng.standard_normal(chosen.size) * 0.01).astype(flat.dtype)
                model[name] = Tensor.of(flat.reshape(tensor.shape))
            diffs.append(diff_bytes(make_exact(previous, model)))
        path = out / f"v{number}.safetensors"
        save_model(path, model)
        files.append(path)
        digests.append(model_digest(model))
    return Lineage(files, digests, diffs)


def publish_lineage(
    client: TestClient, lineage: Lineage, model: str = "asr", upto: int = 4
) -> None:
    assert client.post("/v1/models", json={"name": model}).status_code == 201
    r = client.post(f"/v1/models/{model}/versions", content=lineage.files[0].read_bytes())
    assert r.status_code == 201, r.text
    for number in range(1, upto + 1):
        r = client.post(
            f"/v1/models/{model}/versions",
            params={"parent": number - 1},
            content=lineage.diffs[number - 1],
        )
        assert r.status_code == 201, r.text
