"""`diffcast release ...` and `diffcast fleet status` against a real server."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.integration.conftest import AGENT
from tests.integration.live import ADMIN_TOKEN, live_server, server_env
from tests.integration.test_operator_cli import cli
from tests.lineage import make_lineage


def test_release_commands_and_fleet_status(tmp_path: Path) -> None:
    (tmp_path / "lineage").mkdir()
    lineage = make_lineage(tmp_path / "lineage", 3)
    with live_server(tmp_path / "server") as server:
        op = {
            **server_env(server.data_dir),
            "DIFFCAST_SERVER": server.url,
            "DIFFCAST_TOKEN": ADMIN_TOKEN,
        }
        assert cli(["model", "create", "asr"], op).returncode == 0
        assert cli(["version", "publish", "asr", str(lineage.files[0])], op).returncode == 0
        for number in (1, 2):
            diff = tmp_path / f"d{number}.diff"
            diff.write_bytes(lineage.diffs[number - 1])
            assert (
                cli(
                    ["version", "publish", "asr", str(diff), "--parent", str(number - 1)], op
                ).returncode
                == 0
            )
        created = cli(
            [
                "release",
                "create",
                "asr",
                "2",
                "--name",
                "spring",
                "--tag",
                "region=eu",
                "--percent",
                "10",
                "--activate",
            ],
            op,
        )
        assert created.returncode == 0, created.stderr
        assert "spring" in created.stdout
        assert "active" in created.stdout
        assert "10%" in cli(["release", "list"], op).stdout
        assert "50%" in cli(["release", "expand", "1", "50"], op).stdout
        shrink = cli(["release", "expand", "1", "20"], op)
        assert shrink.returncode == 2
        assert "only expands" in shrink.stderr
        assert "paused" in cli(["release", "pause", "1"], op).stdout
        assert "active" in cli(["release", "resume", "1"], op).stdout
        halted = cli(["release", "halt", "1", "--reason", "bad canaries"], op)
        assert halted.returncode == 0
        assert '"halt_reason": "bad canaries"' in cli(["release", "show", "1"], op).stdout
        rollback = cli(["release", "rollback", "asr", "--to", "1"], op)
        assert rollback.returncode == 0, rollback.stderr
        assert "(rollback)" in rollback.stdout
        assert '"rollback": true' in cli(["release", "show", "2"], op).stdout
        status = subprocess.run(
            [*AGENT, "fleet", "status"],
            env=op,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        assert "active releases" in status.stdout
        assert "saved" in status.stdout
        reader = cli(["token", "create", "viewer", "--scope", "read"], op).stdout.strip()
        denied = cli(["release", "pause", "2"], {**op, "DIFFCAST_TOKEN": reader})
        assert denied.returncode == 2
        assert "403" in denied.stderr
