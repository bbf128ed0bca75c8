"""The scale-out configuration: PostgreSQL and an S3-compatible store (SeaweedFS on
loopback), with two app instances sharing them as two replicas would."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

from fastapi.testclient import TestClient

from diffs.container import DiffReader
from diffs.patch_file import apply_to_file
from server.app import create_app
from server.settings import Settings
from tests.lineage import Lineage
from tests.server.api.conftest import ADMIN_TOKEN, ENROLL_SECRET, _reset_pg, publish_lineage
from tests.server.seaweed import S3Endpoint


def test_two_replicas_on_postgresql_and_s3(
    pg_url: str, seaweedfs_s3: S3Endpoint, keys_dir: Path, tmp_path: Path, lineage: Lineage
) -> None:
    _reset_pg(pg_url)
    bucket = f"scale-{uuid.uuid4().hex[:10]}"

    def settings(name: str) -> Settings:
        return Settings(
            data_dir=tmp_path / name,
            database_url=pg_url,
            blob_store="s3",
            s3_endpoint=seaweedfs_s3.endpoint,
            s3_bucket=bucket,
            s3_region=seaweedfs_s3.region,
            s3_access_key=seaweedfs_s3.access_key,
            s3_secret_key=seaweedfs_s3.secret_key,
            keys_dir=keys_dir,
            migrate_on_start=True,
            bootstrap_token=ADMIN_TOKEN,
            enrollment_secret=ENROLL_SECRET,
            poll_cache_seconds=0.0,
        )

    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with (
        TestClient(create_app(settings("a")), headers=auth) as a,
        TestClient(create_app(settings("b")), headers=auth) as b,
    ):
        publish_lineage(a, lineage)  # publish through replica a ...
        assert not any((tmp_path / "a").rglob("blobs/*/*/*"))  # ... nothing stored locally
        credential = b.post(
            "/v1/devices/enroll", json={"enrollment_secret": ENROLL_SECRET, "device_id": "d1"}
        ).json()["credential"]
        device = {"Authorization": f"Bearer {credential}"}
        plan = b.get(  # ... plan through replica b
            "/v1/devices/d1/update",
            params={"model": "asr", "digest": lineage.digests[0]},
            headers=device,
        ).json()
        assert plan["target"]["digest"] == lineage.digests[4]
        composed = next(o for o in plan["options"] if o["kind"] == "composed")
        step = composed["steps"][0]
        blob = a.get(step["url"])  # the composed diff replica b built is served by replica a
        assert blob.status_code == 200
        assert len(blob.content) == step["size"]
        part = a.get(step["url"], headers={"Range": "bytes=3-9"})
        assert part.status_code == 206
        assert part.content == blob.content[3:10]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "m.safetensors"
            assert (
                apply_to_file(lineage.files[0], [DiffReader(blob.content)], out)
                == lineage.digests[4]
            )
        # both replicas serve the same signed metadata
        assert a.get("/tuf/timestamp.json").content == b.get("/tuf/timestamp.json").content
