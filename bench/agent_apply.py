"""What applying an update costs a device: time and peak memory against model size.

For float32 models of ``--sizes`` parameters (default 1 M, 10 M, 100 M; a handful of 2-D
weight matrices and norm vectors shaped like a small speech encoder) and each density in
``--densities`` (percent, default 1 and 10), a generator process builds -- tensor by
tensor, never holding a whole model -- the base model file and a ``--steps``-long chain
(default 5) of diffs of each kind in ``--kinds``:

- ``sparse``: positions + float16 deltas (what a trained sparse diff is), applied with the
  library's exact arithmetic;
- ``exact``: positions + XOR of the float32 bit patterns (lossless, what composed diffs
  and ``make_exact`` produce).

Each step picks about ``density`` of every tensor's elements (independently per step) and
moves them by ~ N(0, 1e-3). The generator patches a working copy of the model in place,
step by step, and takes each step's target digest from it.

Then, per size x kind x density, for a chain of 1 diff (the first step) and of all
``--steps`` diffs, a *fresh child process* runs what the device agent runs
(:mod:`device_agent.install`)::

    readers = diffs.patch_file.open_chain(diff_paths)
    diffs.patch_file.apply_to_file(base, readers, out, base_digest=<known>)

``--repeats`` times, and once more under :mod:`tracemalloc`. Per run it records:

- wall time of ``open_chain`` + ``apply_to_file`` (copy of the base, decode + scatter of
  every entry into the writable memory map, the digest after every step, msync + fsync,
  rename), and how that splits into copy / digest / flush (by wrapping those calls);
- **peak RSS**: ``VmHWM`` of the child after resetting it (``5 > /proc/self/clear_refs``)
  once the imports are done, and ``ru_maxrss`` (which Linux carries over from the
  spawning process across ``exec``; the orchestrating process is kept small for that);
- **peak anonymous and file-backed RSS**, the split of the above: the kernel keeps no
  high-water mark per kind, so the parent samples ``RssAnon`` / ``RssFile`` of the child
  from ``/proc/<pid>/status`` every ~0.5 ms (a spike shorter than that can be missed);
- **heap peak** (the run under :mod:`tracemalloc`, numpy buffers included): exact, and
  counting only what Python and numpy allocate, not mapped files.

File-backed pages (the memory-mapped model copy and the diffs) are reclaimable page
cache; anonymous memory is what a device must really have free. The claim checked is
that the anonymous peak follows the diff, not the model: the summary compares
configurations with the same largest entry (1 M at 10% vs 10 M at 1%, 10 M at 10% vs
100 M at 1% -- same number of changed elements per tensor, 10x the model).

Prints a table and writes every figure, with the machine it ran on, to JSON
(``bench/results/agent_apply.json`` by default). Times are the best of ``--repeats``
(the median is in the table and the JSON); the files are in the page cache (just
written), and other processes on a shared machine add noise.

Run: ``.venv/bin/python bench/agent_apply.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(ROOT))

from bench.common import machine_info, model_shapes  # noqa: E402

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "agent_apply.json"
DEFAULT_SIZES = (1_000_000, 10_000_000, 100_000_000)
DEFAULT_DENSITIES = (1.0, 10.0)
DEFAULT_KINDS = ("sparse", "exact")
DEFAULT_STEPS = 5
DEFAULT_REPEATS = 3
QUICK_SIZES = (100_000, 1_000_000)
QUICK_REPEATS = 1
DEFAULT_ZSTD_LEVEL = 3
BASE_STD = 0.05
DELTA_STD = 1e-3
SAMPLE_CHUNK = 1 << 22
SAMPLE_INTERVAL_S = 0.0005
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
KIB = 1024
MIB = 1 << 20


# --------------------------------------------------------------------------------------
# The synthetic models


def size_label(n: int) -> str:
    if n >= 1_000_000 and n % 100_000 == 0:
        return f"{n / 1_000_000:g}M"
    if n >= 1000 and n % 100 == 0:
        return f"{n / 1000:g}k"
    return str(n)


def sample_positions(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
    """Each of ``n`` positions independently with probability ``p``, in order (chunked)."""
    parts = []
    for start in range(0, n, SAMPLE_CHUNK):
        m = min(SAMPLE_CHUNK, n - start)
        parts.append(np.flatnonzero(rng.random(m, dtype=np.float32) < np.float32(p)) + start)
    return np.concatenate(parts).astype(np.int64, copy=False)


def write_base(path: Path, shapes: Sequence[tuple[str, tuple[int, ...]]], seed: int) -> None:
    """The base model, written one tensor at a time (only one tensor is ever in memory)."""
    from diffs.dtypes import DType
    from diffs.fileio import atomic_output
    from diffs.safetensors_file import TensorLayout, write_safetensors

    index = {name: i for i, (name, _) in enumerate(shapes)}
    layouts = [TensorLayout(name, DType.F32, shape) for name, shape in shapes]

    def write_data(layout: Any, out: Any) -> None:
        rng = np.random.default_rng([seed, index[layout.name]])
        values = rng.standard_normal(layout.shape, dtype=np.float32)
        values *= np.float32(BASE_STD)
        if layout.name.endswith("norm.weight"):
            values += np.float32(1.0)
        out.write(memoryview(values.reshape(-1).view(np.uint8)))

    with atomic_output(path) as out:
        write_safetensors(out, layouts, write_data)


def step_entry(
    kind: str,
    name: str,
    flat: np.ndarray,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    p: float,
) -> Any:
    """One step's entry for one float32 tensor (``flat``: its current values)."""
    from diffs.dtypes import DType
    from diffs.entries import ExactEntry, SparseEntry
    from diffs.values import ValueFormat, Values

    positions = sample_positions(rng, flat.size, p)
    deltas = rng.standard_normal(positions.size, dtype=np.float32)
    deltas *= np.float32(DELTA_STD)
    if kind == "sparse":
        values = Values.quantize(deltas, ValueFormat.F16)
        return SparseEntry(name, DType.F32, shape, positions, values)
    old = flat[positions]
    xor = old.view(np.uint32) ^ (old + deltas).view(np.uint32)  # float32 + float32
    keep = xor != 0  # a delta below half an ulp changes nothing
    return ExactEntry(name, DType.F32, shape, positions[keep], xor[keep])


def gen_child(args: dict[str, Any]) -> dict[str, Any]:
    """Build the base model and every chain in ``args["dir"]``; describe what was built."""
    from diffs.container import Diff, EncodeOptions, write_diff
    from diffs.digest import file_digest, model_file_digest
    from diffs.entries import patch_in_place
    from diffs.model import ModelFile

    started = time.perf_counter()
    work_dir = Path(args["dir"])
    params, seed, steps = int(args["params"]), int(args["seed"]), int(args["steps"])
    options = EncodeOptions(zstd_level=int(args["zstd_level"]))
    shapes = model_shapes(params)
    base = work_dir / "base.safetensors"
    write_base(base, shapes, seed)
    base_digest = file_digest(base)
    chains: dict[str, Any] = {}
    scratch = work_dir / "gen-current.safetensors"
    for kind_index, kind in enumerate(args["kinds"]):
        for density in args["densities"]:
            shutil.copyfile(base, scratch)
            digest = base_digest
            chain = []
            with ModelFile(scratch, writable=True) as current:
                for step in range(steps):
                    entries = []
                    for tensor_index, (name, info) in enumerate(current.infos.items()):
                        rng = np.random.default_rng(
                            [seed, kind_index, round(density * 1000), step, tensor_index]
                        )
                        tensor = current.tensor(name)
                        flat = tensor.array.reshape(-1)
                        entry = step_entry(kind, name, flat, info.shape, rng, density / 100)
                        patch_in_place(flat, tensor.dtype, entry)
                        entries.append(entry)
                        del tensor, flat
                    target = model_file_digest(current)
                    path = work_dir / f"{kind}-{density:g}-{step + 1}.diff"
                    info_meta = {"method": kind, "bench": "agent_apply", "step": step + 1}
                    write_diff(path, Diff(digest, target, entries, info_meta), options)
                    counts = [int(e.positions.size) for e in entries]
                    chain.append(
                        {
                            "path": str(path),
                            "bytes": path.stat().st_size,
                            "base_digest": digest,
                            "target_digest": target,
                            "changed": sum(counts),
                            "largest_entry": max(counts),
                        }
                    )
                    digest = target
                    del entries
            scratch.unlink()
            chains[f"{kind}/{density:g}"] = chain
    return {
        "base": str(base),
        "base_digest": base_digest,
        "model_file_bytes": base.stat().st_size,
        "tensors": [{"name": n, "shape": list(s)} for n, s in shapes],
        "chains": chains,
        "gen_s": time.perf_counter() - started,
        "gen_peak_rss_kib": _status_kib().get("VmHWM"),
    }


# --------------------------------------------------------------------------------------
# The apply child: a fresh process that runs what the device agent runs


def _status_kib(pid: int | str = "self") -> dict[str, int]:
    """The memory fields of ``/proc/<pid>/status``, in KiB (empty if it is gone)."""
    values: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in STATUS_FIELDS:
            values[key] = int(rest.split()[0])
    return values


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _wrap_timed(phases: dict[str, float], phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - start

    return wrapper


def apply_child(args: dict[str, Any]) -> dict[str, Any]:
    import tracemalloc

    from diffs import patch_file
    from diffs.model import ModelFile

    # Time the parts that grow with the model (not the diff) by wrapping them.
    phases: dict[str, float] = {}
    patch_file.model_file_digest = _wrap_timed(phases, "digest", patch_file.model_file_digest)
    shutil.copyfile = _wrap_timed(phases, "copy", shutil.copyfile)  # type: ignore[assignment]
    ModelFile.flush = _wrap_timed(phases, "flush", ModelFile.flush)  # type: ignore[method-assign]

    base, out = Path(args["base"]), Path(args["out"])
    trace = bool(args["trace"])
    if trace:
        tracemalloc.start()
    reset = _reset_peak_rss()
    baseline = _status_kib()
    start = time.perf_counter()
    readers = patch_file.open_chain(args["diffs"])
    try:
        got = patch_file.apply_to_file(base, readers, out, base_digest=args["base_digest"])
    finally:
        for reader in readers:
            reader.close()
    seconds = time.perf_counter() - start
    heap_peak = tracemalloc.get_traced_memory()[1] if trace else None
    if trace:
        tracemalloc.stop()
    after = _status_kib()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    if got != args["target_digest"]:
        raise RuntimeError(f"apply_to_file returned {got}, expected {args['target_digest']}")
    if not out.exists():
        raise RuntimeError("apply_to_file wrote nothing")
    out.unlink()
    return {
        "apply_s": seconds,
        "phases_s": phases,
        "baseline_kib": baseline,
        "after_kib": after,
        "peak_rss_kib": after.get("VmHWM") if reset else usage.ru_maxrss,
        "peak_rss_source": "VmHWM after clear_refs" if reset else "ru_maxrss",
        "ru_maxrss_kib": usage.ru_maxrss,
        "heap_peak_bytes": heap_peak,
        "traced": trace,
        "minor_faults": usage.ru_minflt,
        "major_faults": usage.ru_majflt,
    }


def run_child(mode: str, args: dict[str, Any], sample: bool) -> dict[str, Any]:
    """Run ``mode`` in a fresh interpreter; sample its RSS split from here while it runs."""
    env = dict(os.environ)
    env.update({name: "1" for name in THREAD_ENV})
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--{mode}-child", json.dumps(args)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    peaks = dict.fromkeys(("VmRSS", "RssAnon", "RssFile"), 0)
    samples = 0
    while sample and proc.poll() is None:
        status = _status_kib(proc.pid)
        if status:
            samples += 1
            for key in peaks:
                peaks[key] = max(peaks[key], status.get(key, 0))
        time.sleep(SAMPLE_INTERVAL_S)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed ({proc.returncode}):\n{stderr}")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    if sample:
        result["sampled_peak_kib"] = peaks
        result["samples"] = samples
    return result


# --------------------------------------------------------------------------------------
# The machine


def library_info() -> dict[str, Any]:
    """Which ``diffs`` was measured: the commit, and a hash of the working tree's sources
    (the library may carry uncommitted changes)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "diffs").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    info: dict[str, Any] = {"diffs_sources_sha256": digest.hexdigest()}
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "diffs"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        info["git_head"] = head.stdout.strip()
        info["diffs_uncommitted"] = sorted(line[3:] for line in status.stdout.splitlines())
    except (OSError, subprocess.CalledProcessError):
        info["git_head"] = None
    return info


def filesystem_of(path: Path) -> str:
    try:
        result = subprocess.run(
            ["df", "--output=fstype", str(path)], capture_output=True, text=True, check=True
        )
        return result.stdout.split()[-1]
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --------------------------------------------------------------------------------------
# The run


def best_and_median(samples: Sequence[float]) -> dict[str, float]:
    return {"best": min(samples), "median": statistics.median(samples), "n": len(samples)}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_row(
    model: dict[str, Any],
    chain: list[dict[str, Any]],
    steps: int,
    out: Path,
    repeats: int,
) -> dict[str, Any]:
    used = chain[:steps]
    child_args = {
        "base": model["base"],
        "diffs": [s["path"] for s in used],
        "out": str(out),
        "base_digest": model["base_digest"],
        "target_digest": used[-1]["target_digest"],
        "trace": False,
    }
    runs = [run_child("apply", child_args, sample=True) for _ in range(repeats)]
    traced = run_child("apply", {**child_args, "trace": True}, sample=False)
    times = [r["apply_s"] for r in runs]
    best = runs[times.index(min(times))]
    changed = sum(s["changed"] for s in used)
    baseline_anon = statistics.median(r["baseline_kib"]["RssAnon"] for r in runs)
    peak_anon = max(r["sampled_peak_kib"]["RssAnon"] for r in runs)
    peak_total = statistics.median(r["peak_rss_kib"] for r in runs)
    return {
        "steps": steps,
        "diff_bytes": sum(s["bytes"] for s in used),
        "changed_entries": changed,
        "largest_entry": max(s["largest_entry"] for s in used),
        "model_file_bytes": model["model_file_bytes"],
        "apply_s": best_and_median(times),
        "entries_per_s": changed / min(times),
        "phases_s_of_best": best["phases_s"],
        "memory_kib": {
            "peak_total": peak_total,
            "peak_total_source": runs[0]["peak_rss_source"],
            "peak_total_runs": [r["peak_rss_kib"] for r in runs],
            "ru_maxrss": statistics.median(r["ru_maxrss_kib"] for r in runs),
            "baseline_total": statistics.median(r["baseline_kib"]["VmRSS"] for r in runs),
            "baseline_anon": baseline_anon,
            "peak_anon_sampled": peak_anon,
            "peak_anon_sampled_runs": [r["sampled_peak_kib"]["RssAnon"] for r in runs],
            "peak_anon_over_baseline": peak_anon - baseline_anon,
            "peak_file_sampled": max(r["sampled_peak_kib"]["RssFile"] for r in runs),
            "peak_total_minus_model_file": peak_total - model["model_file_bytes"] / KIB,
            "heap_peak": traced["heap_peak_bytes"] / KIB,
            "samples_per_run": [r["samples"] for r in runs],
        },
        "runs": runs,
        "traced_run": traced,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "benchmark": "agent_apply",
        "machine": {
            **machine_info(),
            "shared": "other engineers' tests run on the same machine; timings carry their noise",
        },
        "library": library_info(),
        "config": {
            "sizes": list(args.sizes),
            "densities_percent": list(args.densities),
            "kinds": list(args.kinds),
            "chain_steps": args.steps,
            "measured_steps": sorted({1, args.steps}),
            "repeats": args.repeats,
            "quick": args.quick,
            "seed": args.seed,
            "zstd_level": args.zstd_level,
            "dtype": "F32",
            "base": f"N(0, {BASE_STD}) (norm weights 1 + that)",
            "step": (
                f"each element independently with probability density, moved by "
                f"N(0, {DELTA_STD}); sparse: float16 deltas; exact: XOR of float32 bits"
            ),
            "applied": (
                "open_chain(diffs) + apply_to_file(base, readers, out, base_digest=known) "
                "in a fresh child process, as device_agent.install does; files in page cache"
            ),
            "timing": "best of repeats (median also given); other processes add noise",
            "memory": {
                "peak_total": "VmHWM of the child, reset after imports (clear_refs 5)",
                "ru_maxrss": "getrusage(RUSAGE_SELF) in the child; Linux carries the "
                "spawning process's peak over exec, so it is at least the orchestrator's",
                "peak_anon_sampled": "max RssAnon of /proc/<pid>/status sampled by the "
                f"parent every ~{SAMPLE_INTERVAL_S * 1e3:g} ms (max over repeats)",
                "baseline_anon": "RssAnon of the child after imports, before the apply",
                "peak_file_sampled": "max RssFile sampled likewise: the mapped model copy "
                "and diffs (page cache, reclaimable)",
                "heap_peak": "tracemalloc peak (Python + numpy buffers) of one more run",
            },
        },
        "models": [],
        "rows": [],
    }
    root = Path(args.workdir) if args.workdir else None
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="diffcast-agent-apply-", dir=root) as tmp:
        report["machine"]["workdir_filesystem"] = filesystem_of(Path(tmp))
        for params in args.sizes:
            size_dir = Path(tmp) / size_label(params)
            size_dir.mkdir()
            log(f"{size_label(params)}: building the base model and the chains")
            gen_args = {
                "dir": str(size_dir),
                "params": params,
                "seed": args.seed,
                "steps": args.steps,
                "kinds": list(args.kinds),
                "densities": list(args.densities),
                "zstd_level": args.zstd_level,
            }
            model = run_child("gen", gen_args, sample=False)
            log(f"{size_label(params)}: built in {model['gen_s']:.1f} s")
            report["models"].append(
                {
                    "params": params,
                    "model_file_bytes": model["model_file_bytes"],
                    "base_digest": model["base_digest"],
                    "tensors": model["tensors"],
                    "gen_s": model["gen_s"],
                    "gen_peak_rss_kib": model["gen_peak_rss_kib"],
                }
            )
            for kind in args.kinds:
                for density in args.densities:
                    chain = model["chains"][f"{kind}/{density:g}"]
                    for steps in sorted({1, args.steps}):
                        log(f"{size_label(params)} {kind} {density:g}% x{steps}: applying")
                        row = measure_row(
                            model, chain, steps, size_dir / "applied.safetensors", args.repeats
                        )
                        report["rows"].append(
                            {"params": params, "kind": kind, "density_percent": density, **row}
                        )
            shutil.rmtree(size_dir)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["summary"] = summarize(report)
    return report


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Does anonymous memory follow the model or the diff?"""
    rows = report["rows"]
    sizes = sorted({r["params"] for r in rows})

    def find(params: int, kind: str, density: float, steps: int) -> dict[str, Any] | None:
        for r in rows:
            if (r["params"], r["kind"], r["density_percent"], r["steps"]) == (
                params,
                kind,
                density,
                steps,
            ):
                return r
        return None

    by_config = []
    for kind in report["config"]["kinds"]:
        for density in report["config"]["densities_percent"]:
            for steps in report["config"]["measured_steps"]:
                found = [find(p, kind, density, steps) for p in sizes]
                series = [r for r in found if r is not None]
                by_config.append(
                    {
                        "kind": kind,
                        "density_percent": density,
                        "steps": steps,
                        "params": [r["params"] for r in series],
                        "anon_over_baseline_mib": [
                            r["memory_kib"]["peak_anon_over_baseline"] / KIB for r in series
                        ],
                        "heap_peak_mib": [r["memory_kib"]["heap_peak"] / KIB for r in series],
                        "peak_total_minus_model_file_mib": [
                            r["memory_kib"]["peak_total_minus_model_file"] / KIB for r in series
                        ],
                        "largest_entry": [r["largest_entry"] for r in series],
                    }
                )
    # Same changed elements per tensor, a model 10x larger: anonymous memory should match.
    pairs = []
    densities = sorted(report["config"]["densities_percent"])
    for small, large in itertools.pairwise(sizes):
        ratio = large / small
        for low in densities:
            high = low * ratio
            if high not in densities:
                continue
            for kind in report["config"]["kinds"]:
                for steps in report["config"]["measured_steps"]:
                    a = find(small, kind, high, steps)
                    b = find(large, kind, low, steps)
                    if a is None or b is None:
                        continue
                    pairs.append(
                        {
                            "kind": kind,
                            "steps": steps,
                            "small": f"{size_label(small)} at {high:g}%",
                            "large": f"{size_label(large)} at {low:g}%",
                            "changed_entries": [a["changed_entries"], b["changed_entries"]],
                            "heap_peak_mib": [
                                a["memory_kib"]["heap_peak"] / KIB,
                                b["memory_kib"]["heap_peak"] / KIB,
                            ],
                            "anon_over_baseline_mib": [
                                a["memory_kib"]["peak_anon_over_baseline"] / KIB,
                                b["memory_kib"]["peak_anon_over_baseline"] / KIB,
                            ],
                        }
                    )
    # Anonymous memory per changed element of the largest entry (what one decode holds).
    per_entry = [
        r["memory_kib"]["heap_peak"] * KIB / r["largest_entry"] for r in rows if r["largest_entry"]
    ]
    largest = [r for r in rows if r["params"] == sizes[-1]]
    return {
        "by_config": by_config,
        "same_diff_larger_model": pairs,
        "heap_peak_bytes_per_largest_entry_change": {
            "min": min(per_entry) if per_entry else None,
            "max": max(per_entry) if per_entry else None,
        },
        "largest_model": {
            "params": sizes[-1],
            "model_file_mib": largest[0]["model_file_bytes"] / MIB if largest else None,
            "max_peak_total_mib": max(r["memory_kib"]["peak_total"] for r in largest) / KIB
            if largest
            else None,
            "max_peak_anon_over_baseline_mib": max(
                r["memory_kib"]["peak_anon_over_baseline"] for r in largest
            )
            / KIB
            if largest
            else None,
            "max_heap_peak_mib": max(r["memory_kib"]["heap_peak"] for r in largest) / KIB
            if largest
            else None,
        },
    }


# --------------------------------------------------------------------------------------
# Printing


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 200))
    machine = report["machine"]
    table = Table(
        title=(
            "Device apply (open_chain + apply_to_file, base digest known, fresh process): "
            "time and peak memory"
        ),
        caption=(
            f"{machine['cpu_model']}, {machine['cpus_allowed']} cores, Python "
            f"{machine['python']}, numpy {machine['numpy']}, {machine['date']}. Time: best / "
            f"median of {report['config']['repeats']}. Peak RSS: VmHWM (file pages of the "
            "mapped model copy included). Anon: sampled RssAnon peak, and over the "
            "post-import baseline. Heap: tracemalloc peak."
        ),
    )
    columns = (
        "model",
        "kind",
        "density",
        "steps",
        "changed",
        "largest\nentry",
        "diff\nbytes",
        "apply s\nbest / med",
        "M changed\nentries/s",
        "copy+digest\n+flush s",
        "peak RSS\nMiB",
        "peak anon\nMiB",
        "anon over\nbase MiB",
        "heap peak\nMiB",
        "model file\nMiB",
    )
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    previous = None
    for row in report["rows"]:
        if previous is not None and previous != row["params"]:
            table.add_section()
        previous = row["params"]
        mem = row["memory_kib"]
        phases = row["phases_s_of_best"]
        fixed = sum(phases.get(k, 0.0) for k in ("copy", "digest", "flush"))
        table.add_row(
            size_label(row["params"]),
            row["kind"],
            f"{row['density_percent']:g}%",
            str(row["steps"]),
            f"{row['changed_entries']:,}",
            f"{row['largest_entry']:,}",
            f"{row['diff_bytes']:,}",
            f"{row['apply_s']['best']:.3f} / {row['apply_s']['median']:.3f}",
            f"{row['entries_per_s'] / 1e6:.1f}",
            f"{fixed:.3f}",
            f"{mem['peak_total'] / KIB:.1f}",
            f"{mem['peak_anon_sampled'] / KIB:.1f}",
            f"{mem['peak_anon_over_baseline'] / KIB:.1f}",
            f"{mem['heap_peak'] / KIB:.1f}",
            f"{row['model_file_bytes'] / MIB:.1f}",
        )
    console.print(table)
    pairs = report["summary"]["same_diff_larger_model"]
    if pairs:
        same = Table(title="Same changes per tensor, 10x the model: anonymous memory")
        for column in ("kind", "steps", "smaller model", "larger model", "heap MiB", "anon MiB"):
            same.add_column(column, justify="right")
        for pair in pairs:
            same.add_row(
                pair["kind"],
                str(pair["steps"]),
                pair["small"],
                pair["large"],
                " -> ".join(f"{v:.1f}" for v in pair["heap_peak_mib"]),
                " -> ".join(f"{v:.1f}" for v in pair["anon_over_baseline_mib"]),
            )
        console.print(same)


# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", help="model sizes (parameters)")
    parser.add_argument("--densities", type=float, nargs="+", help="percent changed per step")
    parser.add_argument("--kinds", nargs="+", choices=DEFAULT_KINDS, default=list(DEFAULT_KINDS))
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="chain length")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--zstd-level",
        type=int,
        default=DEFAULT_ZSTD_LEVEL,
        help="encoding level of the diffs (decoding speed hardly depends on it)",
    )
    parser.add_argument("--workdir", help="where the temporary files go (default: tempfile's)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--quick", action="store_true", help="small models, one repeat")
    parser.add_argument("--gen-child", help=argparse.SUPPRESS)
    parser.add_argument("--apply-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if args.densities is None:
        args.densities = list(DEFAULT_DENSITIES)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gen_child is not None:
        print(json.dumps(gen_child(json.loads(args.gen_child))))
        return 0
    if args.apply_child is not None:
        print(json.dumps(apply_child(json.loads(args.apply_child))))
        return 0
    report = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
