"""The main job, end to end: a fleet of devices learns new words through neural diffs.

1. Starts the server (SQLite + local blobs, the embedded default) on a free loopback port.
2. Publishes the committed base ASR model as version 0.
3. Trains three sparse updates (2% of the model's size), each teaching one update set's
   new words on top of the last, and publishes them as diffs (versions 1-3), with their
   per-cohort WER as version metrics.
4. Releases version 3 to every device, behind the quality gate (no cohort's WER on the
   original test set may rise by more than 5 points).
5. Runs a simulated fleet (real agents: TUF-verified plans, resumable downloads, staged
   apply, digest checks, reports) whose devices start at versions 0, 1, 2 or with no
   model, until every one runs version 3; re-hashes every device's model file.
6. Prints a report -- per device the plan it got, bytes downloaded against a full-model
   download, WER on the new-word clips before and after -- and writes an HTML report
   with plots and the JSON behind it under ``demo-output/``.

Run with ``make demo``; ``--quick`` (tests) trains for a few steps on a few clips.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import (  # noqa: E402
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table  # noqa: E402

console = Console(soft_wrap=True)
if not console.is_terminal:
    console.width = 132  # logs and CI: keep the device table on one line per device
MODEL = "asr"
ADMIN_TOKEN = "dct_demo-admin"
ENROLL_SECRET = "demo-enrollment-secret"
BASE = ROOT / "asr" / "checkpoints" / "base.safetensors"


@dataclass(frozen=True)
class Settings:
    updates: tuple[str, ...]
    budget: float
    steps: int
    batch_seconds: float
    train_limit: int
    replay_base: int
    test_limit: int
    old_test_limit: int
    devices: int
    start_versions: tuple[int | None, ...]


FULL = Settings(
    updates=("swimmers", "places", "artists"),
    budget=0.02,
    steps=200,
    batch_seconds=30.0,
    train_limit=1_200,
    replay_base=1_200,
    test_limit=120,
    old_test_limit=240,
    devices=24,
    start_versions=(0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 0, None),
)
QUICK = replace(
    FULL,
    steps=3,
    batch_seconds=6.0,
    train_limit=6,
    replay_base=6,
    test_limit=6,
    old_test_limit=6,
    devices=20,
)


def step(title: str) -> None:
    console.rule(f"[bold]{title}")


# --------------------------------------------------------------------------- server


@contextmanager
def running_server(data_dir: Path) -> Iterator[str]:
    """The server on a free loopback port until the block ends (always stopped)."""
    from server.process import local_server

    env = dict(
        os.environ,
        DIFFCAST_DATA_DIR=str(data_dir),
        DIFFCAST_BOOTSTRAP_TOKEN=ADMIN_TOKEN,
        DIFFCAST_ENROLLMENT_SECRET=ENROLL_SECRET,
        DIFFCAST_MIGRATE_ON_START="true",
    )
    with local_server(data_dir, env) as server:
        yield server.url


def ok(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise RuntimeError(
            f"{response.request.method} {response.request.url}: "
            f"HTTP {response.status_code}: {response.text[:300]}"
        )
    return response.json() if response.content else None


# --------------------------------------------------------------------------- the job


def train_updates(settings: Settings, base: Path, work: Path) -> tuple[list[Path], dict[str, Any]]:
    """Train the updates; returns the diff files and, per version, its model."""
    from asr.corpus import CorpusConfig, CorpusStore, generate
    from asr.difftrain import DiffTrainConfig, Method, train_diff
    from asr.model import load_checkpoint
    from asr.train import TrainData
    from diffs.container import write_diff

    corpus = replace(
        CorpusConfig(),
        train_size=settings.replay_base,
        test_size=settings.old_test_limit,
        update_train_size=settings.train_limit,
        update_test_size=settings.test_limit,
    )
    store = CorpusStore.open(ROOT / ".cache" / "asr-corpus", corpus)
    splits = ["base/train", "base/test"]
    splits += [f"{u}/{part}" for u in settings.updates for part in ("train", "test")]
    missing = [s for s in splits if store.missing_shards(s)]
    if missing:
        with Progress(
            TextColumn("synthesizing speech (espeak-ng)"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            task = bar.add_task("synth", total=None)
            generate(
                store,
                missing,
                workers=2,
                on_progress=lambda d, t: bar.update(task, completed=d, total=t),
            )
    models = {0: load_checkpoint(base)}
    train = DiffTrainConfig().train
    config = DiffTrainConfig(
        method=Method.SPARSE,
        budget=settings.budget,
        train=replace(
            train,
            steps=settings.steps,
            batch_seconds=settings.batch_seconds,
            log_every=max(1, settings.steps // 4),
        ),
    )
    replay = store.load("base/train")
    diffs = []
    for number, update in enumerate(settings.updates, 1):
        data = TrainData(store.load(f"{update}/train"), list(replay))
        console.print(
            f"update {number}: teaching [bold]{update}[/bold] "
            f"({len(data.utterances)} clips, replaying {len(data.replay)})"
        )
        result = train_diff(
            models[number - 1], data, config, log=lambda line: console.print(f"  [dim]{line}[/dim]")
        )
        path = work / f"v{number - 1}-v{number}.diff"
        write_diff(path, result.diff)
        models[number] = result.model
        diffs.append(path)
        replay += store.load(f"{update}/train")
        console.print(
            f"  -> {path.name}: {result.diff_bytes:,} bytes "
            f"({result.fraction:.2%} of the model), {result.seconds:.0f} s"
        )
    return diffs, {"models": models, "store": store}


def evaluate(settings: Settings, models: dict[int, Any], store: Any) -> dict[int, dict[str, Any]]:
    from asr.course import score
    from asr.metrics import ALL

    new_clips = [u for name in settings.updates for u in store.load(f"{name}/test")]
    old_clips = store.load("base/test")
    results = {}
    for number, model in models.items():
        new, old = score(model, new_clips), score(model, old_clips)
        results[number] = {
            "new_word_wer": new[ALL].wer,
            "old_wer": old[ALL].wer,
            "wer_by_cohort": {k: v.wer for k, v in old.items() if k != ALL},
            "new_word_wer_by_cohort": {k: v.wer for k, v in new.items() if k != ALL},
        }
        console.print(
            f"version {number}: WER on the new-word clips {new[ALL].wer:6.2%}, "
            f"on the original test clips {old[ALL].wer:6.2%}"
        )
    return results


def publish(
    url: str, base: Path, diffs: Sequence[Path], quality: dict[int, dict[str, Any]]
) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    versions = []
    with httpx.Client(base_url=url, headers=headers, timeout=120.0) as client:
        ok(client.post("/v1/models", json={"name": MODEL, "description": "reference ASR model"}))
        files = [(base, None), *((d, n) for n, d in enumerate(diffs))]
        for number, (path, parent) in enumerate(files):
            params: dict[str, Any] = {"method": "base" if parent is None else "sparse"}
            if parent is not None:
                params["parent"] = parent
            version = ok(
                client.post(
                    f"/v1/models/{MODEL}/versions", params=params, content=path.read_bytes()
                )
            )
            metrics = {
                "wer_by_cohort": quality[number]["wer_by_cohort"],
                "new_word_wer": quality[number]["new_word_wer"],
            }
            ok(client.patch(f"/v1/models/{MODEL}/versions/{number}", json={"metrics": metrics}))
            versions.append(version)
            console.print(
                f"published version {version['version']} ({path.name}, "
                f"{path.stat().st_size:,} bytes): {version['digest']}"
            )
        release = ok(
            client.post(
                "/v1/releases",
                json={
                    "model": MODEL,
                    "version": len(diffs),
                    "name": "new words",
                    "max_wer_regression": 0.05,
                    "activate": True,
                },
            )
        )
        console.print(
            f"release {release['id']} of version {len(diffs)} is "
            f"[bold]{release['state']}[/bold] (quality gate passed)"
        )
    return versions


def run_fleet(url: str, settings: Settings, work: Path) -> Any:
    from device_agent.fleet import simulate

    starts = [
        settings.start_versions[i % len(settings.start_versions)] for i in range(settings.devices)
    ]
    with Progress(
        TextColumn("devices converged"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("fleet", total=len(starts))
        return simulate(
            url,
            ADMIN_TOKEN,
            MODEL,
            work / "fleet",
            starts,
            concurrency=6,
            timeout=600,
            on_progress=lambda d, t: bar.update(task, completed=d, total=t),
        )


def verify_devices(fleet: Any, work: Path) -> dict[str, bool]:
    """Re-hash every device's live model file: the digest proves what it runs."""
    from device_agent.state import StateDir
    from diffs.digest import file_digest

    verified = {}
    for device in fleet.devices:
        state = StateDir(work / "fleet" / device.device_id)
        installed = state.installed()
        verified[device.device_id] = bool(
            installed is not None
            and file_digest(state.model_file(installed.digest)) == fleet.target_digest
        )
    return verified


# --------------------------------------------------------------------------- report


def build_report(
    settings: Settings,
    fleet: Any,
    verified: dict[str, bool],
    quality: dict[int, dict[str, Any]],
    diffs: Sequence[Path],
    seconds: float,
) -> dict[str, Any]:
    target = fleet.target_version
    devices = []
    for d in fleet.devices:
        full = fleet.full_model_bytes if d.start_version != target else 0
        devices.append(
            {
                "device": d.device_id,
                "start_version": d.start_version,
                "final_version": d.final_version,
                "plan": d.plan_kinds,
                "bytes_downloaded": d.bytes_downloaded,
                "full_model_bytes": full,
                "new_word_wer_before": None
                if d.start_version is None
                else quality[d.start_version]["new_word_wer"],
                "new_word_wer_after": quality[target]["new_word_wer"],
                "converged": d.converged,
                "digest_verified": verified[d.device_id],
            }
        )
    downloaded = sum(d["bytes_downloaded"] for d in devices)
    full = sum(d["full_model_bytes"] for d in devices)
    # Devices that had a model updated it; a device with none must take the full model.
    updating = [d for d in devices if d["start_version"] is not None]
    update_downloaded = sum(d["bytes_downloaded"] for d in updating)
    update_full = sum(d["full_model_bytes"] for d in updating)
    return {
        "model_bytes": fleet.full_model_bytes,
        "target_version": target,
        "target_digest": fleet.target_digest,
        "updates": [
            {"version": n, "file": p.name, "bytes": p.stat().st_size}
            for n, p in enumerate(diffs, 1)
        ],
        "quality": {str(k): v for k, v in quality.items()},
        "devices": devices,
        "converged": sum(d["converged"] for d in devices),
        "verified": sum(d["digest_verified"] for d in devices),
        "bytes_downloaded": downloaded,
        "bytes_full": full,
        "bytes_saved": 1 - downloaded / full if full else 0.0,
        "updating_devices": len(updating),
        "update_bytes_downloaded": update_downloaded,
        "update_bytes_full": update_full,
        "update_bytes_saved": 1 - update_downloaded / update_full if update_full else 0.0,
        "fleet_seconds": fleet.seconds,
        "total_seconds": seconds,
        "settings": {
            k: list(v) if isinstance(v, tuple) else v for k, v in settings.__dict__.items()
        },
    }


COLUMNS = (
    "device",
    "start",
    "plan",
    "downloaded",
    "vs full model",
    "new-word WER before",
    "after",
    "digest",
)


def device_cells(d: dict[str, Any]) -> list[str]:
    """One device's row of the report (console and HTML)."""
    full = d["full_model_bytes"]
    before = d["new_word_wer_before"]
    return [
        d["device"],
        "none" if d["start_version"] is None else f"v{d['start_version']}",
        " + ".join(d["plan"]) or "-",
        f"{d['bytes_downloaded']:,}",
        f"{d['bytes_downloaded'] / full:.1%}" if full else "-",
        "-" if before is None else f"{before:.1%}",
        f"{d['new_word_wer_after']:.1%}",
        "verified" if d["digest_verified"] else "MISMATCH",
    ]


def summary_lines(report: dict[str, Any]) -> list[str]:
    n = len(report["devices"])
    fresh = n - report["updating_devices"]
    return [
        f"{report['converged']}/{n} devices converged to version {report['target_version']}; "
        f"{report['verified']}/{n} model files re-hashed to {report['target_digest']}",
        f"the {report['updating_devices']} devices that updated downloaded "
        f"{report['update_bytes_downloaded']:,} bytes instead of {report['update_bytes_full']:,} "
        f"as full models: {report['update_bytes_saved']:.1%} saved",
        f"with the {fresh} new devices (full model): {report['bytes_downloaded']:,} bytes "
        f"instead of {report['bytes_full']:,} ({report['bytes_saved']:.1%} saved)",
        f"fleet update {report['fleet_seconds']:.1f} s; "
        f"whole demo {report['total_seconds'] / 60:.1f} min",
    ]


def print_report(report: dict[str, Any]) -> None:
    table = Table(*COLUMNS)
    for d in report["devices"]:
        cells = device_cells(d)
        cells[-1] = (
            f"[green]{cells[-1]}[/green]" if d["digest_verified"] else f"[red]{cells[-1]}[/red]"
        )
        table.add_row(*cells)
    console.print(table)
    for line in summary_lines(report):
        console.print(f"[bold]{line}[/bold]")


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return base64.b64encode(buffer.getvalue()).decode()


def write_html(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = report["devices"]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    names = [d["device"].removeprefix("sim-") for d in devices]
    ax.bar(names, [d["full_model_bytes"] / 1e6 for d in devices], color="#ddd", label="full model")
    ax.bar(names, [d["bytes_downloaded"] / 1e6 for d in devices], color="#2a7", label="downloaded")
    ax.set_ylabel("MB")
    ax.set_title("Bytes each device downloaded vs a full-model download")
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    ax.legend()
    fig.tight_layout()
    bytes_png = _png(fig)
    plt.close(fig)

    quality = report["quality"]
    versions = sorted(int(v) for v in quality)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(
        versions,
        [100 * quality[str(v)]["new_word_wer"] for v in versions],
        "o-",
        label="new-word clips",
    )
    ax.plot(
        versions,
        [100 * quality[str(v)]["old_wer"] for v in versions],
        "s-",
        label="original test clips",
    )
    ax.set_xticks(versions, [f"v{v}" for v in versions])
    ax.set_ylabel("WER % (greedy)")
    ax.set_title("Accuracy per version")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    wer_png = _png(fig)
    plt.close(fig)

    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in device_cells(d)) + "</tr>"
        for d in devices
    )
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    summary = "<br>".join(html.escape(line) for line in summary_lines(report))
    updates = "".join(
        f"<li>v{u['version']}: {html.escape(u['file'])}, {u['bytes']:,} bytes "
        f"({u['bytes'] / report['model_bytes']:.2%} of the model)</li>"
        for u in report["updates"]
    )
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Diffcast demo report</title>
<style>{style}</style></head><body>
<h1>Diffcast demo: a fleet learns new words through neural diffs</h1>
<p>{summary}</p>
<img alt="bytes per device" src="data:image/png;base64,{bytes_png}">
<img alt="WER per version" src="data:image/png;base64,{wer_png}">
<h2>Updates</h2><ul>{updates}</ul>
<h2>Devices</h2><table><tr>{head}</tr>{rows}</table>
</body></html>
"""
    path.write_text(page)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "demo-output")
    parser.add_argument("--quick", action="store_true", help="a few steps on a few clips (tests)")
    parser.add_argument("--base", type=Path, default=BASE, help="base checkpoint")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if not args.base.exists():
        console.print(f"[red]error:[/red] {args.base} is missing (run `make train-base`)")
        return 2
    started = time.monotonic()
    out: Path = args.output
    work = out / "run"
    shutil.rmtree(work, ignore_errors=True)  # running twice starts afresh
    (work / "server").mkdir(parents=True)

    step("1. train three updates that teach new words (sparse diffs, 2% of the model)")
    diffs, trained = train_updates(settings, args.base, work)
    step("2. accuracy of every version")
    quality = evaluate(settings, trained["models"], trained["store"])
    with running_server(work / "server") as url:
        step(f"3. publish the base model and the diffs; release version {len(diffs)}")
        console.print(f"server (SQLite + local blobs) at {url}")
        publish(url, args.base, diffs, quality)
        step(f"4. a fleet of {settings.devices} devices updates itself")
        fleet = run_fleet(url, settings, work)
    verified = verify_devices(fleet, work)
    report = build_report(settings, fleet, verified, quality, diffs, time.monotonic() - started)
    step("5. report")
    print_report(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_html(report, out / "report.html")
    console.print(f"wrote {out / 'report.html'} and {out / 'report.json'}")
    good = report["converged"] == report["verified"] == len(report["devices"])
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
