"""``kill -9`` of real agent processes at random instants of an update.

Downloads go through a throttling proxy so that they last long enough to be cut short;
the model is big enough that applying a chain takes a while too. Each trial starts
``diffcast agent run``, waits until the update reaches a phase drawn at random
(planning, downloading, applying), waits a further random delay, and sends SIGKILL.
After every kill the device must be on a valid model: ``current.json`` names a file
whose canonical digest is the one it records. The next trial restarts the agent on the
same state, so every restart recovers from the previous kill; after a few trials a
final run must converge to the newest version and the server must agree.

A trial counts when its kill interrupted an update (a kill that came after the update
finished is checked the same way, but not counted). The default suite runs 12 trials;
``-m slow`` runs 50.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from tests.integration.chaos_proxy import (
    ChaosProxy,
    Device,
    Stage,
    stage_fixture,  # noqa: F401  (the fixture)
)
from tests.lineage import Lineage, make_lineage

MODEL = "crash"
RATE = 400_000
"""Blob bytes per second through the proxy: an update downloads for ~0.6-1 s."""
LANES = 3
"""Devices killed concurrently (each with its own proxy)."""
PER_DEVICE = 6
"""Trials on one state directory before a fresh device takes over."""
PHASES = ("planning", "downloading", "applying", "health_check", "switching")
TARGETS = {"planning": (1, 0.05), "downloading": (4, 0.3), "applying": (3, 0.05)}
"""Phase to wait for: (weight, longest extra random delay in seconds)."""


@pytest.fixture(scope="module")
def big(stage: Stage, tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    """A ~1.9 MB model with 6 versions (diffs of ~83 kB), published as ``crash``."""
    lineage = make_lineage(tmp_path_factory.mktemp("lineage-crash"), 6, rows=8192, seed=13)
    stage.publish(MODEL, lineage, range(6))
    return lineage


@dataclass
class Lane:
    stage: Stage
    lineage: Lineage
    proxy: ChaosProxy
    rng: random.Random
    name: str
    devices: list[Device] = field(default_factory=list)
    kills: Counter[str] = field(default_factory=Counter)
    """Where each kill landed: the journal's phase, or ``idle``/``done``."""
    mid_update: dict[str, int] = field(default_factory=dict)
    """Kills that interrupted an update, per device."""

    @property
    def target(self) -> str:
        return self.lineage.digests[-1]

    def fresh_device(self) -> Device:
        start = self.rng.choice((0, 2))
        device_id = f"{self.name}-{len(self.devices)}"
        device = self.stage.device(device_id, MODEL, self.lineage.files[start], start)
        self.devices.append(device)
        self.mid_update[device_id] = 0
        return device

    def converged(self, device: Device) -> bool:
        current = device.current()
        return current is not None and current["digest"] == self.target

    def trial(self, device: Device) -> None:
        """Start the agent, SIGKILL it at a random instant, check the live model."""
        stale = (device.journal() or {}).get("id")
        phase, (_, longest) = self.rng.choices(
            list(TARGETS.items()), weights=[w for w, _ in TARGETS.values()]
        )[0]
        delay = self.rng.uniform(0, longest)
        process = device.spawn(self.proxy.url, "--interval", "0.1")
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                journal = device.journal()
                if journal is not None and journal.get("id") != stale:
                    if PHASES.index(journal.get("phase", "planning")) >= PHASES.index(phase):
                        break
                elif self.converged(device):
                    break
                assert process.poll() is None, f"the agent exited ({process.returncode})"
                time.sleep(0.002)
            else:
                raise AssertionError(f"{device.device_id}: no {phase} phase within 60 s")
            time.sleep(delay)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        journal = device.journal()
        if journal is not None and journal.get("id") != stale:
            landed = str(journal.get("phase"))
            self.mid_update[device.device_id] += 1
        else:
            landed = "done" if self.converged(device) else "idle"
        self.kills[landed] += 1
        print(f"  {device.device_id}: wanted {phase}+{delay:.2f}s, landed {landed}")
        current = device.assert_valid()  # the device restarts on a valid model
        assert current["digest"] == self.lineage.digests[current["version"]]

    def finish(self, device: Device) -> None:
        """Restart without interruption: the device converges and everything is reported.

        (A device that converged before its last kill, with nothing left to recover or
        to report, needs no restart.)
        """
        settled = device.journal() is None and not any((device.state / "outbox").iterdir())
        if not (settled and self.converged(device)):
            for _ in range(3):
                result = device.run_once(self.proxy.url)
                if self.converged(device):
                    break
            else:
                raise AssertionError(f"{device.device_id} did not converge: {result.stdout}")
        current = device.assert_valid()
        assert current["version"] == len(self.lineage.files) - 1
        reports = device.reports()
        assert reports[-1]["outcome"] == "updated"
        interrupted = [r for r in reports if r["reason"] == "interrupted"]
        completed = [r for r in reports if r.get("message") == "completed before a restart"]
        # every interrupted update was reported after the restart (a report whose
        # delivery was itself cut short may arrive twice)
        assert len(interrupted) + len(completed) >= self.mid_update[device.device_id]
        assert list((device.state / "staging").iterdir()) == []
        seen = self.stage.server_view(device.device_id)
        assert (seen["digest"], seen["last_outcome"]) == (self.target, "updated")

    def run(self, trials: int) -> None:
        """Kill until ``trials`` kills have interrupted an update (kills that came too
        late, after the update, are checked the same way but not counted)."""
        device = self.fresh_device()
        on_device = 0
        while sum(self.mid_update.values()) < trials:
            if on_device == PER_DEVICE or self.converged(device):
                self.finish(device)
                device, on_device = self.fresh_device(), 0
            self.trial(device)
            on_device += 1
        self.finish(device)


@pytest.mark.parametrize(
    "trials",
    [pytest.param(12, id="12-trials"), pytest.param(50, id="50-trials", marks=pytest.mark.slow)],
)
def test_kill_9_during_updates_always_leaves_a_valid_model(
    stage: Stage, big: Lineage, trials: int
) -> None:
    started = time.monotonic()
    lanes = [
        Lane(
            stage,
            big,
            ChaosProxy(stage.server.url, rate=RATE).start(),
            random.Random(n),
            f"kill{trials}-{n}",
        )
        for n in range(LANES)
    ]
    share = [trials // LANES + (n < trials % LANES) for n in range(LANES)]
    try:
        with ThreadPoolExecutor(LANES) as pool:
            list(pool.map(Lane.run, lanes, share))
    finally:
        for lane in lanes:
            lane.proxy.stop()
    kills = sum((lane.kills for lane in lanes), Counter[str]())
    devices = sum(len(lane.devices) for lane in lanes)
    print(
        f"{sum(kills.values())} kills on {devices} devices in "
        f"{time.monotonic() - started:.1f}s, where they landed: {dict(sorted(kills.items()))}"
    )
    assert sum(sum(lane.mid_update.values()) for lane in lanes) >= trials
    # the kills did land in each phase that matters
    assert kills["downloading"] >= 1
    assert kills["applying"] + kills["switching"] >= 1
