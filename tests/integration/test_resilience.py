"""Real agents against a bad network and a bad model.

- A proxy cuts blob downloads at random byte offsets: every device still converges,
  resuming with ``Range`` instead of starting over, and the bytes on the wire (counted
  by the proxy) and the bytes reported stay within 1.2x of the plan option it used.
- A published version that fails the device's health check is refused: the old model
  keeps running, the failure is reported (``health_check_failed``), the refused target
  is never downloaded again, and the next good version is taken.
- The check behind ``--health-check-max-abs`` (:class:`MaxAbsHealthCheck`) on every float
  dtype, NaN and infinity.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from device_agent.errors import HealthCheckError
from device_agent.health import MaxAbsHealthCheck
from diffs.container import diff_bytes
from diffs.dtypes import DType, bf16_to_f32, f32_to_bf16
from diffs.make import make_exact
from diffs.model import Tensor, load_model, save_model
from tests.integration.chaos_proxy import (
    ChaosProxy,
    Device,
    Stage,
    stage_fixture,  # noqa: F401  (the fixture)
)
from tests.lineage import Lineage, make_lineage

CUT_PROBABILITY = 0.75
MAX_CYCLES = 6
BUDGET = 1.2


@pytest.fixture(scope="module")
def lineage(tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    return make_lineage(tmp_path_factory.mktemp("lineage-res"), 6, rows=512)


def _converge(device: Device, proxy: ChaosProxy, target: str) -> int:
    """``diffcast agent run --once`` through the proxy until the device runs ``target``."""
    output = ""
    for cycle in range(1, MAX_CYCLES + 1):
        result = device.run_once(proxy.url)
        output = result.stdout + result.stderr
        current = device.current()
        if current is not None and current["digest"] == target:
            assert result.returncode == 0, output
            return cycle
    raise AssertionError(f"{device.device_id} did not converge in {MAX_CYCLES} cycles: {output}")


def test_cut_connections_resume_within_budget(stage: Stage, lineage: Lineage) -> None:
    stage.publish("cut", lineage, range(6))
    target = lineage.digests[5]
    starts = {"cut-0": 0, "cut-1": 1, "cut-4": 4, "cut-none": None}
    devices = [
        stage.device(name, "cut", lineage.files[v] if v is not None else None, v)
        for name, v in starts.items()
    ]
    # one proxy per device, so the bytes on each device's wire are counted apart; seeded
    # so that each device's first download is cut
    proxies = [
        ChaosProxy(stage.server.url, seed=seed, cut_probability=CUT_PROBABILITY).start()
        for seed in range(7, 7 + len(devices))
    ]
    try:
        with ThreadPoolExecutor(2) as pool:
            cycles = list(pool.map(lambda d, p: _converge(d, p, target), devices, proxies))
    finally:
        for proxy in proxies:
            proxy.stop()

    with stage.admin() as admin:

        def blob_size(sha256: str) -> int:
            head = admin.head(f"/v1/blobs/{sha256}")
            assert head.status_code == 200
            return int(head.headers["content-length"])

        for device, proxy, used in zip(devices, proxies, cycles, strict=True):
            current = device.assert_valid()
            assert (current["digest"], current["version"]) == (target, 5)
            reports = device.reports()
            final = reports[-1]
            assert final["outcome"] == "updated", final
            plan_bytes = sum(blob_size(step["sha256"]) for step in final["steps"])
            reported = sum(r["bytes_downloaded"] for r in reports)
            wire = proxy.blob_bytes
            print(
                f"{device.device_id}: {final['plan_kind']} plan {plan_bytes} B, wire {wire} B "
                f"({wire / plan_bytes:.2f}x), reported {reported} B, {proxy.cuts} cuts, "
                f"{used} cycle(s)"
            )
            assert wire <= BUDGET * plan_bytes, (device.device_id, wire, plan_bytes)
            assert reported <= BUDGET * plan_bytes, (device.device_id, reported, plan_bytes)
            # every download cut once the device held some bytes went on from where it
            # stopped: cuts after some bytes, and cuts of a resumed download before any
            # (the device still holds what came before)
            resumed = proxy.exchanges(lambda e: e.range is not None)
            held_some = proxy.exchanges(lambda e: e.cut and (e.sent > 0 or e.range is not None))
            assert len(resumed) == len(held_some), device.device_id
            assert all(e.status == 206 for e in resumed), device.device_id
            seen = stage.server_view(device.device_id)
            assert (seen["version"], seen["digest"], seen["last_outcome"]) == (5, target, "updated")
    assert all(p.cuts for p in proxies)
    assert sum(p.cuts for p in proxies) >= 8


def _diff(before: Path, after: dict[str, Tensor]) -> bytes:
    return diff_bytes(make_exact(load_model(before), after))


def test_a_model_failing_the_health_check_is_refused_and_reported(
    stage: Stage, lineage: Lineage, tmp_path: Path
) -> None:
    stage.publish("hc", lineage, range(3))
    # version 3: one weight blown up (as a diverged fine-tune would); version 4 repairs it
    bad = load_model(lineage.files[2])
    weights = bad["enc.weight"].array.copy()
    weights[7, 3] = 1.0e6
    bad["enc.weight"] = Tensor.of(weights)
    save_model(tmp_path / "v3.safetensors", bad)
    fixed = load_model(lineage.files[2])
    repaired = fixed["enc.weight"].array.copy()
    repaired[7, 3] = 0.5
    fixed["enc.weight"] = Tensor.of(repaired)
    with stage.admin() as admin:
        r = admin.post(
            "/v1/models/hc/versions",
            params={"parent": 2},
            content=_diff(lineage.files[2], bad),
        )
        assert r.status_code == 201, r.text
        bad_digest = r.json()["digest"]

    device = stage.device("hc-1", "hc", lineage.files[2], 2)
    before = device.live_model()
    check = ("--health-check-max-abs", "100")
    with ChaosProxy(stage.server.url) as proxy:
        refused = device.run_once(proxy.url, *check)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "health_check_failed" in refused.stdout
        assert device.live_model() == before
        assert list((device.state / "staging").iterdir()) == []  # the refused model is gone
        assert device.refused() == [bad_digest]
        report = device.reports()[-1]
        assert (report["outcome"], report["reason"]) == ("failed", "health_check_failed")
        assert "enc.weight" in report["message"] and "above the bound" in report["message"]
        assert stage.server_reports("hc-1")[-1] == ("failed", "health_check_failed")
        seen = stage.server_view("hc-1")
        assert (seen["last_outcome"], seen["version"]) == ("failed", 2)

        # the next cycle does not fetch the refused target again
        proxy.reset()
        again = device.run_once(proxy.url, *check)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "refused_before" in again.stdout
        assert proxy.exchanges(lambda e: e.path.startswith("/v1/blobs/")) == []
        assert device.live_model() == before
        assert len(device.reports()) == 1

        # a repaired version is a new target: it passes and goes live
        with stage.admin() as admin:
            r = admin.post(
                "/v1/models/hc/versions",
                params={"parent": 3},
                content=_diff(tmp_path / "v3.safetensors", fixed),
            )
            assert r.status_code == 201, r.text
            good_digest = r.json()["digest"]
        updated = device.run_once(proxy.url, *check)
        assert updated.returncode == 0, updated.stdout + updated.stderr
    current = device.assert_valid()
    assert (current["version"], current["digest"]) == (4, good_digest)
    assert device.reports()[-1]["outcome"] == "updated"
    assert stage.server_view("hc-1")["version"] == 4


def test_max_abs_health_check(tmp_path: Path) -> None:
    """The check behind ``--health-check-max-abs``: every float dtype, NaN and inf refused,
    integer tensors ignored."""
    check = MaxAbsHealthCheck(10.0)
    base = {
        "w32": Tensor.of(np.linspace(-10, 10, 2_100_000, dtype=np.float32)),  # > one block
        "w16": Tensor.of(np.array([-9.5, 9.5], dtype=np.float16)),
        "wbf": Tensor.of(f32_to_bf16(np.array([-10.0, 3.0], dtype=np.float32)), DType.BF16),
        "steps": Tensor.of(np.array([10**9], dtype=np.int64)),
    }
    save_model(tmp_path / "ok.safetensors", base)
    check(tmp_path / "ok.safetensors")
    for name, value in (("w32", 10.5), ("w16", -11.0), ("wbf", 12.0), ("w32", np.nan)):
        model = dict(base)
        array = bf16_to_f32(model[name].array).copy() if name == "wbf" else model[name].array.copy()
        array[-1] = value
        model[name] = (
            Tensor.of(f32_to_bf16(array), DType.BF16) if name == "wbf" else Tensor.of(array)
        )
        path = tmp_path / f"bad-{name}.safetensors"
        save_model(path, model)
        with pytest.raises(HealthCheckError, match=f"tensor '{name}' element"):
            check(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    with pytest.raises(HealthCheckError, match="cannot be read"):
        check(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="finite"):
        MaxAbsHealthCheck(float("inf"))
