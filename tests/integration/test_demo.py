"""``make demo`` in quick mode: every device converges, digests verify, > 90% bytes saved."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_quick_demo_converges_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "demo-output"
    cmd = [sys.executable, str(ROOT / "scripts" / "demo.py"), "--quick", "--output", str(out)]
    for _ in range(2):  # running it twice works
        result = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    devices = report["devices"]
    assert len(devices) >= 20
    assert report["converged"] == report["verified"] == len(devices)
    assert {d["final_version"] for d in devices} == {3}
    assert len({d["start_version"] for d in devices}) >= 3  # they start at different versions
    assert report["update_bytes_saved"] > 0.9
    for d in devices:
        if d["start_version"] is not None and d["start_version"] < 3:
            assert d["plan"], d
            assert 0 < d["bytes_downloaded"] < 0.2 * d["full_model_bytes"]
    assert [u["version"] for u in report["updates"]] == [1, 2, 3]
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "devices converged to version 3" in page
    assert "saved" in result.stdout
    # No server left behind: the demo stops what it started.
    match = re.search(r"http://127\.0\.0\.1:(\d+)", result.stdout)
    assert match is not None
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", int(match.group(1)))) != 0
