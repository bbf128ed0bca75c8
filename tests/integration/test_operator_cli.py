"""The operator's command line against a real server: keys, migrations, models,
publishing, tokens, root-key rotation -- and a device that follows the rotation."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx

from tests.integration.conftest import AGENT, Published, provision_device, run_once
from tests.integration.live import ADMIN_TOKEN, live_server, server_env
from tests.lineage import make_lineage


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AGENT, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_operator_workflow_and_root_rotation(tmp_path: Path) -> None:
    (tmp_path / "lineage").mkdir()
    lineage = make_lineage(tmp_path / "lineage", 3)
    data = tmp_path / "server"
    env = server_env(data)
    keys = cli(["keys", "init"], env)
    assert keys.returncode == 0, keys.stderr
    assert (data / "keys" / "online" / "1.root.json").exists()
    assert cli(["keys", "init"], env).returncode == 2  # never overwrites keys
    migrated = cli(["server", "migrate"], env)
    assert migrated.returncode == 0, migrated.stderr
    with live_server(data) as server:
        op = {**env, "DIFFCAST_SERVER": server.url, "DIFFCAST_TOKEN": ADMIN_TOKEN}
        assert cli(["model", "create", "asr", "--description", "speech"], op).returncode == 0
        base = cli(["version", "publish", "asr", str(lineage.files[0])], op)
        assert base.returncode == 0, base.stderr
        assert "version 0" in base.stdout
        diff_file = tmp_path / "d1.diff"
        diff_file.write_bytes(lineage.diffs[0])
        first = cli(
            ["version", "publish", "asr", str(diff_file), "--parent", "0", "--notes", "names"], op
        )
        assert first.returncode == 0, first.stderr
        again = cli(["version", "publish", "asr", str(diff_file), "--parent", "0"], op)
        assert "already published as asr version 1" in again.stdout
        bad = cli(["version", "publish", "asr", str(diff_file), "--parent", "1"], op)
        assert bad.returncode == 2
        assert "error: 422" in bad.stderr
        assert "Traceback" not in bad.stderr
        listed = cli(["version", "list", "asr", "--as-json"], op)
        assert [v["version"] for v in json.loads(listed.stdout)] == [0, 1]
        reader = cli(["token", "create", "ci", "--scope", "read"], op).stdout.strip()
        denied = cli(["model", "create", "other"], {**op, "DIFFCAST_TOKEN": reader})
        assert denied.returncode == 2
        assert "403" in denied.stderr

        # a device provisioned with root v1 ...
        bundle = tmp_path / "bundle.json"
        bundle.write_text(
            json.dumps(
                httpx.get(
                    f"{server.url}/v1/provisioning",
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                ).json()
            )
        )
        published = Published(server, lineage, bundle)
        state = tmp_path / "device"
        provision_device(published, state, "dev-rot", 0)
        # ... the root keys rotate to two keys (threshold 2) ...
        rotated = cli(
            [
                "keys",
                "rotate-root",
                "--root-dir",
                str(data / "keys" / "root"),
                "--new-root-dir",
                str(tmp_path / "root2"),
                "--root-keys",
                "2",
                "--threshold",
                "2",
            ],
            op,
        )
        assert rotated.returncode == 0, rotated.stderr
        assert "published root v2" in rotated.stdout
        # ... a new version is published, and the device still verifies and installs it
        diff2 = tmp_path / "d2.diff"
        diff2.write_bytes(lineage.diffs[1])
        assert cli(["version", "publish", "asr", str(diff2), "--parent", "1"], op).returncode == 0
        result = run_once(server.url, state)
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads((state / "current.json").read_text())["digest"] == lineage.digests[2]
        trusted_root = json.loads((state / "tuf" / "root.json").read_text())
        assert trusted_root["signed"]["version"] == 2
