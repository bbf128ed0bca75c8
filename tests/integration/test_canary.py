"""Canary checks end to end: a real server, real `diffcast agent` processes, a real (tiny,
untrained) CTC model published as a base and a diff.

The clips' transcripts are words an untrained model cannot say, so its WER is exactly
1.0 (checked below): a bundle bounding the WER at 0.5 fails the new version, one at 1.5
passes it -- deterministic without a trained model.

- Failing: the device refuses the new model (the old one keeps running, the digest is
  never tried again), reports ``canary_failed`` naming the WER and the bound, and the
  release, with its automatic halt at one failure, halts.
- Passing: the new model goes live with the max-abs health check on as well; a plan
  whose canary is swapped for another signed target is refused first (``untrusted``).
- A device without torch reports ``canary_unavailable`` and downloads nothing.
- The device-side check itself: the bound is inclusive, weights that do not fit the
  bundle's config fail, an unreadable bundle cannot check anything.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from asr.canary import build_canary, score
from asr.model import CTCModel, ModelConfig, save_checkpoint
from device_agent import canary
from device_agent.errors import CanaryFailedError, CanaryUnavailableError
from diffs.canary import CanaryClip, read_canary
from diffs.container import diff_bytes
from diffs.digest import file_digest
from diffs.make import make_exact
from diffs.model import load_model
from tests.integration.chaos_proxy import (
    ChaosProxy,
    Stage,
    rewrite_plans,
    stage_fixture,  # noqa: F401  (the fixture)
)
from tests.integration.live import ADMIN_TOKEN
from tests.integration.test_operator_cli import cli

CONFIG = ModelConfig(dim=16, blocks=1, kernel=3, expansion=2, lookahead=1)
WITHOUT = (
    "import sys; sys.modules.update(dict.fromkeys({!r})); "
    "from device_agent.cli import agent_app; agent_app()"
)
"""A real agent process on a device where these modules cannot be imported."""


@dataclass(frozen=True)
class AsrVersions:
    files: list[Path]
    digests: list[str]
    diff: bytes
    """Version 0 to version 1."""
    strict: Path
    """A canary bundle with the bound 0.5."""
    loose: Path
    """The same clips with the bound 1.5."""


@pytest.fixture(scope="module")
def asr_versions(tmp_path_factory: pytest.TempPathFactory) -> AsrVersions:
    out = tmp_path_factory.mktemp("canary-models")
    torch.manual_seed(0)
    model = CTCModel(CONFIG)
    files = [out / "v0.safetensors", out / "v1.safetensors"]
    save_checkpoint(model, files[0])
    with torch.no_grad():  # a small fine-tune: one layer moves a little
        model.front.weight.add_(torch.randn_like(model.front.weight) * 1e-3)
    save_checkpoint(model, files[1])
    rng = np.random.default_rng(7)
    clips = [
        CanaryClip(
            "noise",
            "turn on the kitchen lights",
            (rng.standard_normal(16_000) * 800).astype(np.int16),
        ),
        CanaryClip(
            "quiet", "call mom at noon", (rng.standard_normal(12_000) * 40).astype(np.int16)
        ),
        CanaryClip("silence", "play some jazz music", np.zeros(8_000, np.int16)),
    ]
    strict = build_canary(out / "strict.safetensors", clips, 0.5, CONFIG)
    build_canary(out / "loose.safetensors", clips, 1.5, CONFIG)
    for file in files:  # the premise: an untrained model misses every word, no more
        assert score(file, strict).wer == 1.0
    return AsrVersions(
        files=files,
        digests=[file_digest(f) for f in files],
        diff=diff_bytes(make_exact(load_model(files[0]), load_model(files[1]))),
        strict=out / "strict.safetensors",
        loose=out / "loose.safetensors",
    )


def publish(stage: Stage, model: str, versions: AsrVersions, **release: Any) -> int:
    """Versions 0 and 1 of ``model``, and an active release of version 1."""
    with stage.admin() as admin:
        assert admin.post("/v1/models", json={"name": model}).status_code == 201
        r = admin.post(f"/v1/models/{model}/versions", content=versions.files[0].read_bytes())
        assert r.status_code == 201, r.text
        r = admin.post(f"/v1/models/{model}/versions", params={"parent": 0}, content=versions.diff)
        assert r.status_code == 201, r.text
        assert r.json()["digest"] == versions.digests[1]
        r = admin.post(
            "/v1/releases", json={"model": model, "version": 1, "activate": True, **release}
        )
        assert r.status_code == 201, r.text
        return int(r.json()["id"])


def canary_downloads(proxy: ChaosProxy, bundle: Path) -> int:
    sha = read_sha(bundle)
    return len(proxy.exchanges(lambda e: e.path == f"/v1/blobs/{sha}"))


def read_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_model_failing_its_canary_is_refused_and_halts_the_release(
    stage: Stage, asr_versions: AsrVersions
) -> None:
    release = publish(stage, "cny-fail", asr_versions, min_attempts=1, failure_threshold=0.5)
    operator = {
        **os.environ,
        "DIFFCAST_SERVER": stage.server.url,
        "DIFFCAST_TOKEN": ADMIN_TOKEN,
    }
    attached = cli(["release", "canary", str(release), str(asr_versions.strict)], operator)
    assert attached.returncode == 0, attached.stderr
    assert "3 clips, WER bound 0.5" in attached.stdout

    device = stage.device("cny-1", "cny-fail", asr_versions.files[0], 0)
    before = device.live_model()
    with ChaosProxy(stage.server.url) as proxy:
        refused = device.run_once(proxy.url, "--health-check-max-abs", "1000")
        output = refused.stdout + refused.stderr
        assert refused.returncode == 1, output
        assert "canary_failed" in refused.stdout
        assert canary_downloads(proxy, asr_versions.strict) == 1
    assert device.live_model() == before
    assert list((device.state / "staging").iterdir()) == []
    assert list((device.state / "downloads").iterdir()) == []
    assert device.refused() == [asr_versions.digests[1]]
    report = device.reports()[-1]
    assert (report["outcome"], report["reason"]) == ("failed", "canary_failed")
    assert (report["release_id"], report["from_version"]) == (release, 0)
    assert "canary WER 1.0000" in report["message"] and "bound 0.5" in report["message"]
    assert stage.server_reports("cny-1")[-1] == ("failed", "canary_failed")
    assert stage.server_view("cny-1")["version"] == 0
    with stage.admin() as admin:
        shown = admin.get(f"/v1/releases/{release}").json()
    assert shown["state"] == "halted" and shown["halt_reason"].startswith("automatic halt")
    assert shown["progress"]["failures_by_reason"] == {"canary_failed": 1}

    # nothing more is fetched for the refused target
    with ChaosProxy(stage.server.url) as proxy:
        again = device.run_once(proxy.url)
        assert again.returncode == 0, again.stdout + again.stderr
        assert proxy.exchanges(lambda e: e.path.startswith("/v1/blobs/")) == []
    assert device.live_model() == before


def test_a_model_passing_its_canary_goes_live(stage: Stage, asr_versions: AsrVersions) -> None:
    release = publish(stage, "cny-pass", asr_versions)
    with stage.admin() as admin:
        r = admin.put(f"/v1/releases/{release}/canary", content=asr_versions.loose.read_bytes())
        assert r.status_code == 200, r.text
        snapshot = admin.get("/v1/models/cny-pass/versions/1").json()
    device = stage.device("cny-2", "cny-pass", asr_versions.files[0], 0)
    before = device.live_model()

    def swap_canary(plan: dict[str, Any]) -> dict[str, Any]:
        # another target signed by the same role, but not as this release's canary
        sha = snapshot["snapshot_sha256"]
        plan["canary"].update(
            url=f"/v1/blobs/{sha}",
            target_path=f"cny-pass/snapshot-{sha}.safetensors",
            sha256=sha,
            size=snapshot["snapshot_size"],
        )
        return plan

    with ChaosProxy(stage.server.url, tamper=rewrite_plans(swap_canary)) as proxy:
        tampered = device.run_once(proxy.url)
        assert tampered.returncode == 1, tampered.stdout + tampered.stderr
        assert "untrusted" in tampered.stdout
    assert device.live_model() == before
    assert device.refused() == []  # not the model's fault: tried again next time
    assert "not signed as a canary" in device.reports()[-1]["message"]

    with ChaosProxy(stage.server.url) as proxy:
        updated = device.run_once(proxy.url, "--health-check-max-abs", "1000")
        assert updated.returncode == 0, updated.stdout + updated.stderr
        assert canary_downloads(proxy, asr_versions.loose) == 1
    current = device.assert_valid()
    assert (current["version"], current["digest"]) == (1, asr_versions.digests[1])
    assert list((device.state / "downloads").iterdir()) == []
    report = device.reports()[-1]
    assert (report["outcome"], report["release_id"]) == ("updated", release)
    assert "canary WER 1.0000" in report["message"] and "bound 1.5: passed" in report["message"]
    canary_step = report["steps"][-1]
    assert canary_step["kind"] == "canary"
    assert canary_step["sha256"] == read_sha(asr_versions.loose)
    assert canary_step["bytes_downloaded"] == asr_versions.loose.stat().st_size
    assert stage.server_view("cny-2")["version"] == 1


@pytest.mark.parametrize("missing", [("torch",), ("asr", "torch")], ids="-".join)
def test_a_device_without_torch_reports_it_and_downloads_nothing(
    stage: Stage, asr_versions: AsrVersions, missing: tuple[str, ...]
) -> None:
    model = f"cny-no-{'-'.join(missing)}"
    release = publish(stage, model, asr_versions)
    assert read_canary(asr_versions.loose).max_wer == 1.5
    with stage.admin() as admin:
        r = admin.put(f"/v1/releases/{release}/canary", content=asr_versions.loose.read_bytes())
        assert r.status_code == 200, r.text
    device = stage.device(f"{model}-1", model, asr_versions.files[0], 0)
    before = device.live_model()
    with ChaosProxy(stage.server.url) as proxy:
        args = ["run", "--once", "--server", proxy.url, "--state-dir", str(device.state)]
        result = subprocess.run(
            [sys.executable, "-c", WITHOUT.format(missing), *args, "--model", model],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert "canary_unavailable" in result.stdout
        assert "Traceback" not in output
        assert proxy.exchanges(lambda e: e.path.startswith("/v1/blobs/")) == []
    assert device.live_model() == before
    assert device.refused() == [asr_versions.digests[1]]
    report = device.reports()[-1]
    assert (report["outcome"], report["reason"]) == ("failed", "canary_unavailable")
    assert "torch" in report["message"]
    assert stage.server_reports(device.device_id)[-1] == ("failed", "canary_unavailable")


def test_the_device_side_check(asr_versions: AsrVersions, tmp_path: Path) -> None:
    scorer = canary.load_scorer()
    model = asr_versions.files[1]
    passed = canary.check(model, asr_versions.loose, scorer)
    assert (passed.wer, passed.max_wer, passed.clips) == (1.0, 1.5, 3)
    with pytest.raises(CanaryFailedError, match=r"WER 1\.0000 .* bound 0\.5"):
        canary.check(model, asr_versions.strict, scorer)
    # a WER equal to the bound passes: only "above" fails
    clips = list(read_canary(asr_versions.strict).clips)
    exact = build_canary(tmp_path / "exact.safetensors", clips, 1.0, CONFIG)
    assert canary.check(model, tmp_path / "exact.safetensors", scorer).max_wer == exact.max_wer
    # weights that do not fit the bundle's model config fail the model
    wide = build_canary(tmp_path / "wide.safetensors", clips, 1.5, replace(CONFIG, dim=24))
    assert wide.decoder is not None
    with pytest.raises(CanaryFailedError, match="cannot be decoded"):
        canary.check(model, tmp_path / "wide.safetensors", scorer)
    # a bundle the device cannot read means it cannot check the model
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(asr_versions.loose.read_bytes()[:-3])
    with pytest.raises(CanaryUnavailableError, match="cannot be read"):
        canary.check(model, broken, scorer)
