"""Exact diff codec vs generic binary delta tools, and the cost of applying it on a device.

For a float32 model of ``--params`` parameters (a handful of 2-D weight matrices and norm
vectors shaped like a small speech encoder, values ~ N(0, 0.05)) and each density in
``--densities`` (percent), the new model changes a uniformly random subset of that many
parameters by small fine-tune-like deltas (~ N(0, 1e-3), added in float32). Per density:

- **our exact diff** (:func:`diffs.make.make_exact` + :func:`diffs.container.write_diff`):
  encode time, total bytes, position bits per changed entry against the bound
  ``log2(C(n, k))`` (summed over tensors), value (XOR) bits per changed entry;
- **generic tools** on the same two safetensors files: ``zstd -19 --long --patch-from``
  (``--single-thread``), ``bsdiff``, ``xdelta3 -e -9``: patch bytes, encode time, and a
  decode that must reproduce the new file byte for byte;
- **apply**, in child processes pinned to one core with OMP/MKL/OpenBLAS threads at 1:
  *warm*, every entry applied the way :func:`diffs.patch_file.apply_to_file` applies it
  (:func:`diffs.patch_file.patch_flat_from`: straight from the sections by the compiled
  kernel where it covers the entry, see :mod:`diffs.direct`) into a writable mapping of
  a copy of the base whose pages are all mapped already -- the codec's own cost; *cold*,
  the same into a fresh mapping, pages mapped per entry
  (:func:`diffs.patch_file.patch_tensor_from`), page faults counted; the *decoded* path
  (:meth:`DiffReader.entry`, then :func:`patch_in_place`), decode and scatter timed
  apart; that path again with the compiled kernels off (``DIFFCAST_NATIVE=0``: the numpy
  reference), and with glibc malloc keeping freed memory besides (*keep-heap*:
  temporaries stop paying a page fault per fresh page, which is dear in a VM); the whole
  :func:`diffs.patch_file.apply_to_file` (copy, patch, digest check, fsync, rename) with
  the base digest known, the copy and the digest alone, and the peak RSS of one
  ``apply_to_file`` in a fresh process against the model file's size.

Prints tables and writes every figure, with the machine it ran on, to JSON
(``bench/results/diff_codec.json`` by default). Timings are the best of ``--repeats``
(the median is in the JSON too); other processes on the machine add noise.

Run: ``.venv/bin/python bench/diff_codec.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(ROOT))

from bench.common import machine_info, model_shapes  # noqa: E402

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "diff_codec.json"
DEFAULT_PARAMS = 10_000_000
DEFAULT_DENSITIES = (0.5, 1.0, 2.0, 5.0, 10.0)
QUICK_PARAMS = 1_000_000
QUICK_DENSITIES = (5.0, 10.0)
TARGET_ENTRIES_PER_S = 50e6
BASE_STD = 0.05
DELTA_STD = 1e-3
FRONTEND_IN = 240  # 80 mel bins x 3 stacked frames
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
GENERIC_TOOLS = ("zstd", "bsdiff", "xdelta3")
KEEP_HEAP_ENV = {"MALLOC_TRIM_THRESHOLD_": str(256 << 20), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
"""glibc malloc settings that keep freed memory for reuse instead of returning it to the
kernel: the same code then stops paying a page fault for every fresh page of its
temporaries (which a virtual machine can make dear)."""


# --------------------------------------------------------------------------------------
# The synthetic models


def make_base(shapes: Sequence[tuple[str, tuple[int, ...]]], seed: int) -> dict[str, Any]:
    from diffs.model import Tensor

    rng = np.random.default_rng(seed)
    model = {}
    for name, shape in shapes:
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(BASE_STD)
        if name.endswith("norm.weight"):
            values += np.float32(1.0)
        model[name] = Tensor.of(values)
    return model


def make_update(base: dict[str, Any], density: float, seed: int) -> tuple[dict[str, Any], int, int]:
    """The base with ``round(density * N)`` uniformly random elements moved by N(0, 1e-3).

    Returns the new model, the number of elements picked and the number whose bits
    actually changed (a delta below half an ulp rounds away; practically never).
    """
    from diffs.model import Tensor

    rng = np.random.default_rng([seed, round(density * 1e6)])
    names = list(base)
    sizes = np.array([base[n].array.size for n in names], dtype=np.int64)
    n_total = int(sizes.sum())
    k = round(density * n_total)
    picked = np.sort(rng.choice(n_total, size=k, replace=False))
    deltas = (rng.standard_normal(k) * DELTA_STD).astype(np.float32)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    cuts = np.searchsorted(picked, bounds)
    new = {}
    changed = 0
    for i, name in enumerate(names):
        old = base[name].array.reshape(-1)
        flat = old.copy()
        local = picked[cuts[i] : cuts[i + 1]] - bounds[i]
        flat[local] = flat[local] + deltas[cuts[i] : cuts[i + 1]]  # float32 + float32
        changed += int(np.count_nonzero(flat.view(np.uint32) != old.view(np.uint32)))
        new[name] = Tensor.of(flat.reshape(base[name].array.shape))
    return new, k, changed


# --------------------------------------------------------------------------------------
# Measuring


def best_and_median(samples: Sequence[float]) -> dict[str, float]:
    return {"best": min(samples), "median": statistics.median(samples), "n": len(samples)}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall-clock and CPU seconds (user + system, this process) of ``fn()``.

    CPU time is what the work costs a core: unlike wall time it does not grow while other
    processes hold the core, which on a shared machine is most of the noise.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def run_measured(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd``; its wall-clock and CPU seconds (user + system, from ``wait4``, so that
    tools running side by side are each charged their own)."""
    start = time.perf_counter()
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {log.read_text()}")
    return wall, usage.ru_utime + usage.ru_stime


def plane_entropy_bits(xor: np.ndarray) -> float:
    """Order-0 entropy (bits per element) of each byte plane of ``xor``, summed."""
    planes = np.ascontiguousarray(xor).view(np.uint8).reshape(-1, xor.dtype.itemsize)
    total = 0.0
    for j in range(planes.shape[1]):
        counts = np.bincount(planes[:, j], minlength=256).astype(np.float64)
        p = counts[counts > 0] / planes.shape[0]
        total += float(-(p * np.log2(p)).sum())
    return total


def measure_ours(
    base: dict[str, Any], new: dict[str, Any], diff_path: Path, repeats: int
) -> dict[str, Any]:
    from diffs.container import DiffReader, write_diff
    from diffs.make import make_exact
    from diffs.positions import position_bound_bits

    make_s, write_s, make_cpu, write_cpu = [], [], [], []
    for _ in range(repeats):
        t_make, c_make, diff = timed_cpu(lambda: make_exact(base, new))
        t_write, c_write, _ = timed_cpu(lambda d=diff: write_diff(diff_path, d))
        make_s.append(t_make)
        write_s.append(t_write)
        make_cpu.append(c_make)
        write_cpu.append(c_write)
    total_bytes = diff_path.stat().st_size
    pos_bytes = xor_bytes = 0
    bound_bits = 0.0
    count = 0
    entropy_bits = 0.0
    with DiffReader(diff_path) as reader:
        kinds = sorted({s.kind for s in reader.specs})
        codecs = sorted({s.codec.value for s in reader.specs if s.codec is not None})
        for index, spec in enumerate(reader.specs):
            sizes = reader.section_sizes(index)
            pos_bytes += sizes.get("positions", 0)
            xor_bytes += sizes.get("xor", 0)
            bound_bits += position_bound_bits(spec.numel, spec.count)
            count += spec.count
            entry = reader.entry(index)
            entropy_bits += plane_entropy_bits(entry.xor) * spec.count  # type: ignore[union-attr]
        entries = len(reader.specs)
        digests = {"base": reader.base_digest, "target": reader.target_digest}
    n_total = sum(t.array.size for t in base.values())
    return {
        "entries": entries,
        "kinds": kinds,
        "codecs": codecs,
        "changed": count,
        "total_bytes": total_bytes,
        "position_bytes": pos_bytes,
        "value_bytes": xor_bytes,
        "overhead_bytes": total_bytes - pos_bytes - xor_bytes,
        "bytes_per_changed_entry": total_bytes / count,
        "position_bits_per_entry": 8 * pos_bytes / count,
        "position_bound_bits_per_entry": bound_bits / count,
        "position_bits_over_bound": 8 * pos_bytes / bound_bits - 1,
        "global_position_bound_bits_per_entry": position_bound_bits(n_total, count) / count,
        "value_bits_per_entry": 8 * xor_bytes / count,
        "value_plane_entropy_bits_per_entry": entropy_bits / count,
        "make_s": best_and_median(make_s),
        "write_s": best_and_median(write_s),
        "encode_s": best_and_median([a + b for a, b in zip(make_s, write_s, strict=True)]),
        "encode_cpu_s": best_and_median([a + b for a, b in zip(make_cpu, write_cpu, strict=True)]),
        "digests": digests,
    }


def zstd_window_log(*paths: Path) -> int:
    size = max(p.stat().st_size for p in paths)
    return max(27, math.ceil(math.log2(max(size, 2))))


def tool_commands(
    tool: str, old: Path, new: Path, patch: Path, out: Path
) -> tuple[list[str], list[str]]:
    """(encode, decode) command lines of a generic tool."""
    if tool == "zstd":
        wlog = zstd_window_log(old, new)
        common = ["zstd", "-q", "-f", "--single-thread", f"--long={wlog}", f"--patch-from={old}"]
        return [*common, "-19", str(new), "-o", str(patch)], [
            *common,
            "-d",
            str(patch),
            "-o",
            str(out),
        ]
    if tool == "bsdiff":
        return ["bsdiff", str(old), str(new), str(patch)], [
            "bspatch",
            str(old),
            str(out),
            str(patch),
        ]
    if tool == "xdelta3":
        return (
            ["xdelta3", "-e", "-9", "-f", "-s", str(old), str(new), str(patch)],
            ["xdelta3", "-d", "-f", "-s", str(old), str(patch), str(out)],
        )
    raise ValueError(tool)


def tool_available(tool: str) -> str | None:
    """``None`` if usable, else why not."""
    needed = {"zstd": ["zstd"], "bsdiff": ["bsdiff", "bspatch"], "xdelta3": ["xdelta3"]}[tool]
    missing = [b for b in needed if shutil.which(b) is None]
    if missing:
        return f"{', '.join(missing)} not on PATH (make system-deps installs it)"
    return None


def tool_version(tool: str) -> str:
    cmd = {"zstd": ["zstd", "--version"], "xdelta3": ["xdelta3", "-V"]}.get(tool)
    if cmd is None:
        try:
            out = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", tool],
                check=False,
                capture_output=True,
                text=True,
            )
            return f"{tool} (Debian {out.stdout.strip()})" if out.returncode == 0 else tool
        except OSError:
            return tool
    result = subprocess.run(cmd, check=False, capture_output=True, text=True)
    return (result.stdout + result.stderr).strip().splitlines()[0]


def measure_tool(tool: str, old: Path, new: Path, work: Path, repeats: int) -> dict[str, Any]:
    patch, out = work / f"{tool}.patch", work / f"{tool}.out"
    encode, decode = tool_commands(tool, old, new, patch, out)
    log = work / f"{tool}.stderr"
    enc_s, dec_s, enc_cpu, dec_cpu = [], [], [], []
    for _ in range(repeats):
        t, c = run_measured(encode, log)
        enc_s.append(t)
        enc_cpu.append(c)
        t, c = run_measured(decode, log)
        dec_s.append(t)
        dec_cpu.append(c)
    log.unlink()
    roundtrip = out.read_bytes() == new.read_bytes()
    size = patch.stat().st_size
    patch.unlink()
    out.unlink()
    return {
        "bytes": size,
        "encode_s": best_and_median(enc_s),
        "encode_cpu_s": best_and_median(enc_cpu),
        "decode_s": best_and_median(dec_s),
        "decode_cpu_s": best_and_median(dec_cpu),
        "roundtrip_ok": roundtrip,
        "command": " ".join(encode).replace(str(work) + "/", ""),
    }


def run_apply_child(
    phase: str, args: dict[str, Any], extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    env = dict(os.environ)
    env.update({name: "1" for name in THREAD_ENV})
    env.update(extra_env or {})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--apply-child", phase, json.dumps(args)]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"apply child ({phase}) failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# The apply child (a fresh process, one core)


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _pure_once(reader: Any, base: Path, work: Path, mode: str, path: str) -> dict[str, Any]:
    """Apply every entry to a writable mapping of a fresh copy of ``base``.

    ``path``: ``direct`` is what ``apply_to_file`` runs (straight from the sections where
    the compiled kernel covers the entry, else decoded); ``decoded`` decodes every entry
    first (:meth:`DiffReader.entry`, timed apart) then scatters it (``patch_in_place``).
    Cold: a fresh mapping, pages mapped per entry as ``apply_to_file`` does
    (:func:`diffs.patch_file.patch_tensor_from` / ``patch_tensor``). Warm: every page
    mapped writable before the clock starts: the codec's own cost, right after the copy
    (which leaves little of the model or of anything else in the CPU caches). Hot: warm,
    after the same entries were applied once already, untimed: what the code costs when
    memory does not wait (an exact diff applied twice undoes itself; the work is the same).
    """
    import mmap

    from diffs.model import ModelFile

    warm = mode in ("warm", "hot")
    shutil.copyfile(base, work)
    with ModelFile(work, writable=True) as model:
        if warm:  # write-fault every page of every tensor before the clock starts
            for tensor in model.values():
                raw = tensor.array.reshape(-1).view(np.uint8)
                raw[:: mmap.PAGESIZE] ^= 0
                raw[-1:] ^= 0
                del raw
        if mode == "hot":
            _apply_every_entry(reader, model, warm, path)
        # The clocks are read around the whole loop: CPU time and fault counts are system
        # calls, which cost microseconds apiece here -- dear beside a 40 us entry. Only the
        # decoded path's split reads the (cheap) wall clock per entry.
        f0 = _minflt()
        t0, c0 = time.perf_counter(), time.process_time()
        decode_s = _apply_every_entry(reader, model, warm, path)
        total_cpu = time.process_time() - c0
        total_s = time.perf_counter() - t0
        faults = _minflt() - f0
    work.unlink()
    out: dict[str, Any] = {"s": total_s, "cpu_s": total_cpu, "minor_faults": faults}
    if path == "decoded":
        out["decode_wall_s"] = decode_s
        out["scatter_wall_s"] = total_s - decode_s
    return out


def _apply_every_entry(reader: Any, model: Any, warm: bool, path: str) -> float:
    """One pass of :func:`_pure_once`; the wall time spent decoding (decoded path)."""
    from diffs.entries import check_fits, patch_in_place
    from diffs.patch_file import patch_flat_from, patch_tensor, patch_tensor_from

    decode_s = 0.0
    for index, spec in enumerate(reader.specs):
        if path == "direct":
            if warm:
                tensor = check_fits(spec, model.get(spec.name))
                patch_flat_from(reader, index, tensor.array.reshape(-1))
                del tensor
            else:
                patch_tensor_from(model, reader, index)
        else:
            d0 = time.perf_counter()
            entry = reader.entry(index)
            decode_s += time.perf_counter() - d0
            if warm:
                tensor = check_fits(entry, model.get(spec.name))
                patch_in_place(tensor.array.reshape(-1), tensor.dtype, entry)
                del tensor
            else:
                patch_tensor(model, entry)
            del entry
    return decode_s


def apply_child(phase: str, args: dict[str, Any]) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[-1]
    os.sched_setaffinity(0, {cpu})
    from diffs.container import DiffReader
    from diffs.digest import file_digest
    from diffs.patch_file import apply_to_file

    base, diff, work = Path(args["base"]), Path(args["diff"]), Path(args["work"])
    repeats = int(args["repeats"])
    out: dict[str, Any] = {"cpu": cpu, "threads_env": {n: os.environ.get(n) for n in THREAD_ENV}}
    if phase == "pure":
        from diffs.kernels import backend

        out["kernels"] = backend()
        paths = ("direct", "decoded") if backend() == "native" else ("decoded",)
        with DiffReader(diff) as reader:
            for path in paths:
                for mode in ("cold", "warm", "hot") if path == "direct" else ("cold", "warm"):
                    runs = [_pure_once(reader, base, work, mode, path) for _ in range(repeats)]
                    cpu = [r["cpu_s"] for r in runs]
                    best = runs[cpu.index(min(cpu))]
                    out[f"{path}_{mode}"] = {
                        "s": best_and_median([r["s"] for r in runs]),
                        "cpu_s": best_and_median(cpu),
                        "minor_faults_of_best": best["minor_faults"],
                        **{
                            f"{part}_of_best": best[part]
                            for part in ("decode_wall_s", "scatter_wall_s")
                            if part in best
                        },
                    }
    elif phase == "whole":
        digest = args["base_digest"]
        target = args["target_digest"]
        samples: dict[str, list[float]] = {}

        def record(name: str, fn: Callable[[], Any]) -> Any:
            wall, cpu, result = timed_cpu(fn)
            samples.setdefault(f"{name}_s", []).append(wall)
            samples.setdefault(f"{name}_cpu_s", []).append(cpu)
            return result

        for _ in range(repeats):
            with DiffReader(diff) as reader:
                got = record(
                    "apply_to_file",
                    lambda r=reader: apply_to_file(base, [r], work, base_digest=digest),
                )
            if got != target or file_digest(work) != target:
                raise RuntimeError("apply_to_file produced the wrong model")
            # The parts that grow with the model, not the diff, timed alone for reference.
            record("digest", lambda: file_digest(work))
            work.unlink()
            record("copy", lambda: shutil.copyfile(base, work))
            work.unlink()
        out.update({name: best_and_median(values) for name, values in samples.items()})
    elif phase == "rss":
        # ru_maxrss survives exec (it starts at the parent's size), so the peak is read
        # from VmHWM after resetting it ("5" > clear_refs), with ru_maxrss kept beside it.
        digest = args["base_digest"]
        reset = _reset_peak_rss()
        out["baseline_rss_kib"] = _proc_status_kib("VmRSS")
        with DiffReader(diff) as reader:
            t, cpu, got = timed_cpu(lambda: apply_to_file(base, [reader], work, base_digest=digest))
        if got != args["target_digest"]:
            raise RuntimeError("apply_to_file produced the wrong model")
        work.unlink()
        out["apply_to_file_s"] = t
        out["apply_to_file_cpu_s"] = cpu
        out["peak_rss_source"] = "VmHWM after clear_refs" if reset else "ru_maxrss"
        out["peak_rss_kib"] = (
            _proc_status_kib("VmHWM")
            if reset
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )
        out["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["rss_after_kib"] = {f: _proc_status_kib(f) for f in ("VmRSS", "RssAnon", "RssFile")}
    else:
        raise ValueError(phase)
    return out


# --------------------------------------------------------------------------------------
# The machine


def filesystem_of(path: Path) -> str:
    try:
        result = subprocess.run(
            ["df", "--output=fstype", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout.split()[-1]
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console

    from diffs.digest import model_digest
    from diffs.model import save_model

    console = Console(stderr=True)
    shapes = model_shapes(args.params)
    n_total = sum(math.prod(s) for _, s in shapes)
    tools = {t: tool_available(t) for t in GENERIC_TOOLS}
    report: dict[str, Any] = {
        "benchmark": "diff_codec",
        "machine": machine_info(),
        "config": {
            "params": n_total,
            "densities_percent": list(args.densities),
            "repeats": args.repeats,
            "tool_repeats": args.tool_repeats,
            "tool_jobs": args.tool_jobs,
            "quick": args.quick,
            "seed": args.seed,
            "dtype": "F32",
            "base": f"N(0, {BASE_STD}) (norm weights 1 + that)",
            "delta": f"N(0, {DELTA_STD}) added in float32 at uniformly random positions",
            "tensors": [{"name": n, "shape": list(s)} for n, s in shapes],
            "timing": "best of repeats (median also given); other processes may add noise",
            "apply_child": "fresh process pinned to one core, OMP/MKL/OpenBLAS threads = 1",
        },
        "tools": {
            t: {
                "available": why is None,
                "why_not": why,
                "version": tool_version(t) if why is None else None,
            }
            for t, why in tools.items()
        },
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="diffcast-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        report["machine"]["workdir_filesystem"] = filesystem_of(work)
        console.log(f"base model: {n_total:,} float32 params in {len(shapes)} tensors")
        base = make_base(shapes, args.seed)
        base_path = work / "base.safetensors"
        save_model(base_path, base)
        base_digest = model_digest(base)
        model_bytes = base_path.stat().st_size
        report["config"]["model_file_bytes"] = model_bytes
        if tools["zstd"] is None:
            report["tools"]["zstd"]["window_log"] = zstd_window_log(base_path)
            report["tools"]["zstd"]["threads"] = "--single-thread"
        for density in args.densities:
            console.log(f"density {density}%: building the update")
            new, picked, changed = make_update(base, density / 100, args.seed)
            new_path = work / f"new-{density}.safetensors"
            save_model(new_path, new)
            diff_path = work / f"exact-{density}.diff"
            console.log(f"density {density}%: our exact diff")
            ours = measure_ours(base, new, diff_path, args.repeats)
            if ours["changed"] != changed:
                raise RuntimeError(f"the diff has {ours['changed']} entries, {changed} changed")
            generic: dict[str, Any] = {}
            usable = [tool for tool, why in tools.items() if why is None]
            console.log(f"density {density}%: {', '.join(usable)} ({args.tool_jobs} at a time)")
            with ThreadPoolExecutor(max_workers=args.tool_jobs) as pool:
                futures = {
                    tool: pool.submit(
                        measure_tool, tool, base_path, new_path, work, args.tool_repeats
                    )
                    for tool in usable
                }
            for tool, why in tools.items():
                generic[tool] = futures[tool].result() if why is None else {"skipped": why}
            console.log(f"density {density}%: apply (child processes, one core)")
            child_args = {
                "base": str(base_path),
                "diff": str(diff_path),
                "work": str(work / "work.safetensors"),
                "repeats": args.repeats,
                "base_digest": base_digest,
                "target_digest": ours["digests"]["target"],
            }
            pure = run_apply_child("pure", child_args)
            numpy_only = {"DIFFCAST_NATIVE": "0"}
            ref = run_apply_child("pure", child_args, numpy_only)
            ref_keep = run_apply_child("pure", child_args, {**numpy_only, **KEEP_HEAP_ENV})
            whole = run_apply_child("whole", child_args)
            rss = run_apply_child("rss", child_args)
            row = {
                "density_percent": density,
                "picked": picked,
                "changed": changed,
                "ours": ours,
                "generic": generic,
                "apply": summarize_apply(changed, pure, ref, ref_keep, whole, rss, model_bytes),
            }
            measured = {t: g["bytes"] for t, g in generic.items() if "bytes" in g}
            row["ours_smaller_than"] = {t: ours["total_bytes"] < b for t, b in measured.items()}
            row["best_generic"] = min(measured, key=measured.__getitem__) if measured else None
            row["ours_over_best_generic"] = (
                ours["total_bytes"] / measured[row["best_generic"]] if measured else None
            )
            report["rows"].append(row)
            diff_path.unlink()
            new_path.unlink()
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["summary"] = summarize(report)
    return report


def summarize_apply(
    changed: int,
    pure: dict[str, Any],
    ref: dict[str, Any],
    ref_keep: dict[str, Any],
    whole: dict[str, Any],
    rss: dict[str, Any],
    model_bytes: int,
) -> dict[str, Any]:
    def rate(seconds: float) -> float:
        return changed / seconds if seconds > 0 else float("inf")

    def modes(child: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {
            key: {
                **result,
                "entries_per_s": rate(result["cpu_s"]["best"]),
                "entries_per_s_wall": rate(result["s"]["best"]),
                **extra,
            }
            for key, result in child.items()
            if key.endswith(("_cold", "_warm", "_hot"))
        }

    ours = modes(pure)
    path = "direct" if "direct_warm" in ours else "decoded"
    return {
        "cpu": pure["cpu"],
        "kernels": pure["kernels"],
        "rates": "entries_per_s: by CPU time (user + system) of the best repeat; "
        "entries_per_s_wall: by wall-clock time of the best repeat",
        "warm": ours[f"{path}_warm"],
        "cold": ours[f"{path}_cold"],
        "hot": ours.get(f"{path}_hot"),
        "paths": ours,
        "numpy": modes(ref),
        "numpy_keep_heap": modes(ref_keep, malloc_env=KEEP_HEAP_ENV),
        "apply_to_file": {
            "s": whole["apply_to_file_s"],
            "cpu_s": whole["apply_to_file_cpu_s"],
            "entries_per_s": rate(whole["apply_to_file_cpu_s"]["best"]),
            "entries_per_s_wall": rate(whole["apply_to_file_s"]["best"]),
            "copy_alone_s": whole["copy_s"],
            "copy_alone_cpu_s": whole["copy_cpu_s"],
            "digest_alone_s": whole["digest_s"],
            "digest_alone_cpu_s": whole["digest_cpu_s"],
        },
        "rss": {
            "baseline_kib": rss["baseline_rss_kib"],
            "peak_kib": rss["peak_rss_kib"],
            "peak_over_baseline_kib": rss["peak_rss_kib"] - rss["baseline_rss_kib"],
            "peak_source": rss["peak_rss_source"],
            "ru_maxrss_kib": rss["ru_maxrss_kib"],
            "after_apply_kib": rss["rss_after_kib"],
            "model_file_bytes": model_bytes,
            "note": (
                "peak RSS (VmHWM, reset after imports) of a fresh process running one "
                "apply_to_file; baseline = VmRSS after imports, before the apply. RSS counts "
                "the resident pages of memory-mapped files (the diff and the model copy) "
                "while they are mapped. ru_maxrss is inherited across exec from the parent, "
                "so it is kept only for reference."
            ),
        },
    }


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    rows = report["rows"]
    compared = [t for t, info in report["tools"].items() if info["available"]]
    smallest = all(all(r["ours_smaller_than"].values()) for r in rows)
    warm = [r["apply"]["warm"]["entries_per_s"] for r in rows]
    cold = [r["apply"]["cold"]["entries_per_s"] for r in rows]
    hot = [r["apply"]["hot"]["entries_per_s"] for r in rows if r["apply"]["hot"]]
    ref = [r["apply"]["numpy"]["decoded_warm"]["entries_per_s"] for r in rows]
    return {
        "tools_compared": compared,
        "tools_missing": [t for t in report["tools"] if t not in compared],
        "ours_smaller_than_every_tool_on_every_row": smallest and bool(compared),
        "kernels": rows[0]["apply"]["kernels"],
        "min_warm_entries_per_s": min(warm),
        "min_warm_entries_per_s_wall": min(r["apply"]["warm"]["entries_per_s_wall"] for r in rows),
        "min_cold_entries_per_s": min(cold),
        "min_hot_entries_per_s": min(hot) if hot else None,
        "min_numpy_warm_entries_per_s": min(ref),
        "rates": "by CPU time of the best repeat (wall-clock rates in each row)",
        "target_entries_per_s": TARGET_ENTRIES_PER_S,
        "warm_meets_target": min(warm) >= TARGET_ENTRIES_PER_S,
        "cold_meets_target": min(cold) >= TARGET_ENTRIES_PER_S,
        "numpy_warm_meets_target": min(ref) >= TARGET_ENTRIES_PER_S,
        "max_peak_rss_over_baseline_kib": max(
            r["apply"]["rss"]["peak_over_baseline_kib"] for r in rows
        ),
    }


# --------------------------------------------------------------------------------------
# Printing


def print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 160))
    cfg, machine = report["config"], report["machine"]
    tools = report["summary"]["tools_compared"]
    rows = report["rows"]

    sizes = Table(
        title=(
            f"Exact diff vs generic delta tools: {cfg['params']:,} float32 params, "
            f"model file {cfg['model_file_bytes'] / 2**20:.1f} MiB, {len(cfg['tensors'])} tensors"
        )
    )
    for col in ("density", "changed", "pos bits/entry", "bound", "over bound", "xor bits/entry"):
        sizes.add_column(col, justify="right")
    sizes.add_column("ours bytes", justify="right", style="bold")
    for tool in tools:
        sizes.add_column(f"{tool} bytes", justify="right")
    sizes.add_column("ours / best tool", justify="right")
    for row in rows:
        ours = row["ours"]
        cells = [
            f"{row['density_percent']:g}%",
            f"{row['changed']:,}",
            f"{ours['position_bits_per_entry']:.3f}",
            f"{ours['position_bound_bits_per_entry']:.3f}",
            f"{100 * ours['position_bits_over_bound']:+.2f}%",
            f"{ours['value_bits_per_entry']:.2f}",
            f"{ours['total_bytes']:,}",
        ]
        for tool in tools:
            smaller = row["ours_smaller_than"][tool]
            cells.append(
                f"{row['generic'][tool]['bytes']:,}" + ("" if smaller else " [red]<=[/red]")
            )
        ratio = row["ours_over_best_generic"]
        cells.append(f"{ratio:.3f} ({row['best_generic']})" if ratio else "-")
        sizes.add_row(*cells)
    console.print(sizes)

    times = Table(title="Encode (and the tools' decode) time, CPU s (wall s)")
    times.add_column("density", justify="right")
    times.add_column("ours make+write", justify="right", style="bold")
    for tool in tools:
        times.add_column(f"{tool} enc", justify="right")
        times.add_column(f"{tool} dec", justify="right")

    def cpu_wall(cpu: dict[str, float], wall: dict[str, float], digits: int = 2) -> str:
        return f"{cpu['best']:.{digits}f} ({wall['best']:.{digits}f})"

    for row in rows:
        ours = row["ours"]
        cells = [
            f"{row['density_percent']:g}%",
            cpu_wall(ours["encode_cpu_s"], ours["encode_s"], 3),
        ]
        for tool in tools:
            g = row["generic"][tool]
            cells += [
                cpu_wall(g["encode_cpu_s"], g["encode_s"], 1),
                cpu_wall(g["decode_cpu_s"], g["decode_s"]),
            ]
        times.add_row(*cells)
    console.print(times)

    speed = Table(
        title=(
            f"Decode + apply, one core (cpu {rows[0]['apply']['cpu']}), best of {cfg['repeats']}; "
            f"model file {cfg['model_file_bytes'] / 2**20:.1f} MiB"
        )
    )
    for col in (
        "density",
        "changed",
        "warm ms",
        "warm M/s",
        "(wall)",
        "hot M/s",
        "cold M/s",
        "faults",
        "dec ms",
        "scat ms",
        "decoded M/s",
        "numpy M/s",
        "heap M/s",
        "apply ms",
        "(wall)",
        "apply M/s",
        "copy ms",
        "dgst ms",
        "RSS+ MiB",
    ):
        speed.add_column(col, justify="right")

    def mps(x: float) -> str:
        style = "green" if x >= TARGET_ENTRIES_PER_S else "red"
        return f"[{style}]{x / 1e6:.1f}[/{style}]"

    for row in rows:
        a = row["apply"]
        warm, cold, decoded = a["warm"], a["cold"], a["paths"]["decoded_warm"]
        whole, rss = a["apply_to_file"], a["rss"]
        speed.add_row(
            f"{row['density_percent']:g}%",
            f"{row['changed']:,}",
            f"{1e3 * warm['cpu_s']['best']:.2f}",
            mps(warm["entries_per_s"]),
            f"{warm['entries_per_s_wall'] / 1e6:.1f}",
            mps(a["hot"]["entries_per_s"]) if a["hot"] else "-",
            mps(cold["entries_per_s"]),
            f"{cold['minor_faults_of_best']:,}",
            f"{1e3 * decoded['decode_wall_s_of_best']:.2f}",
            f"{1e3 * decoded['scatter_wall_s_of_best']:.2f}",
            mps(decoded["entries_per_s"]),
            mps(a["numpy"]["decoded_warm"]["entries_per_s"]),
            mps(a["numpy_keep_heap"]["decoded_warm"]["entries_per_s"]),
            f"{1e3 * whole['cpu_s']['best']:.1f}",
            f"{1e3 * whole['s']['best']:.1f}",
            f"{whole['entries_per_s'] / 1e6:.1f}",
            f"{1e3 * whole['copy_alone_cpu_s']['best']:.1f}",
            f"{1e3 * whole['digest_alone_cpu_s']['best']:.1f}",
            f"{rss['peak_over_baseline_kib'] / 1024:.1f}",
        )
    console.print(speed)
    console.print(
        "Times are CPU time (user + system) of the best repeat unless marked (wall); other "
        "processes share the machine. warm: every entry applied as apply_to_file applies it "
        f"(kernels: {rows[0]['apply']['kernels']}; straight from the sections where the "
        "compiled kernel covers the entry) to a writable mapping of a copy of the base whose "
        "pages are all mapped already, right after the copy: the codec's own cost; hot: the "
        "same, the entries applied once before (untimed), so their data is in the CPU "
        "caches: the code's cost without waiting on memory; cold: the same on a fresh "
        "mapping, pages mapped per entry (patch_file.patch_tensor_from), minor page faults "
        "counted; dec, scat (wall), decoded: each entry decoded into arrays first "
        "(DiffReader.entry), then scattered (patch_in_place), warm; numpy: that decoded "
        "path with the compiled kernels off (DIFFCAST_NATIVE=0), the reference code; heap: "
        "the same with glibc malloc keeping freed memory "
        "(MALLOC_TRIM_THRESHOLD_/MALLOC_MMAP_THRESHOLD_), so temporaries do not page-fault "
        "afresh; apply: the whole apply_to_file (copy, patch, digest check, fsync, rename; "
        "base digest known); copy, dgst: those parts alone; RSS+: peak RSS (VmHWM) of one "
        "apply_to_file in a fresh process over its baseline after imports (compare with the "
        "model file's size).",
        highlight=False,
    )
    s = report["summary"]
    verdict = "yes" if s["ours_smaller_than_every_tool_on_every_row"] else "[red]NO[/red]"
    console.print(f"ours smaller than {', '.join(tools) or 'no tool'} on every row: {verdict}")
    if s["tools_missing"]:
        console.print(f"[yellow]not compared (missing): {', '.join(s['tools_missing'])}[/yellow]")
    console.print(
        f"decode+apply by CPU time, worst row: {s['min_warm_entries_per_s'] / 1e6:.1f} "
        f"M entries/s warm ({s['min_warm_entries_per_s_wall'] / 1e6:.1f} by wall clock, "
        f"kernels: {s['kernels']}), "
        + (
            f"{s['min_hot_entries_per_s'] / 1e6:.1f} M/s hot, "
            if s["min_hot_entries_per_s"]
            else ""
        )
        + f"{s['min_cold_entries_per_s'] / 1e6:.1f} M/s cold, "
        f"{s['min_numpy_warm_entries_per_s'] / 1e6:.1f} M/s warm with numpy alone (target "
        f"{TARGET_ENTRIES_PER_S / 1e6:.0f} M/s). {machine['cpu_model']}, "
        f"{machine['cpu_count']} cores, load average {machine['load_average_at_start'][0]:.1f} "
        f"at start, {machine['load_average_at_end'][0]:.1f} at end",
        highlight=False,
    )


# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=None, help=f"default {DEFAULT_PARAMS:_}")
    parser.add_argument(
        "--densities",
        type=lambda s: tuple(float(x) for x in s.split(",")),
        default=None,
        help="comma-separated percents (default 0.5,1,2,5,10)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 7)")
    parser.add_argument(
        "--tool-repeats", type=int, default=1, help="timing repeats of the generic tools"
    )
    parser.add_argument(
        "--tool-jobs",
        type=int,
        default=min(3, os.cpu_count() or 1),
        help="generic tools run side by side (their CPU times stay their own; default: "
        "up to 3, one per core)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_PARAMS:_} params, densities 5,10, 2 repeats",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON path")
    parser.add_argument("--workdir", type=Path, default=None, help="where temp files go")
    parser.add_argument("--seed", type=int, default=20240611)
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 unless ours is smallest on every row and warm apply meets 50 M/s",
    )
    args = parser.parse_args(argv)
    if args.params is None:
        args.params = QUICK_PARAMS if args.quick else DEFAULT_PARAMS
    if args.densities is None:
        args.densities = QUICK_DENSITIES if args.quick else DEFAULT_DENSITIES
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    if not all(0 < d <= 100 for d in args.densities):
        parser.error("densities are percents in (0, 100]")
    if args.repeats < 1 or args.tool_repeats < 1 or args.tool_jobs < 1:
        parser.error("repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--apply-child"]:
        print(json.dumps(apply_child(argv[1], json.loads(argv[2]))))
        return 0
    args = parse_args(argv)
    report = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)
    print(f"wrote {args.output}")
    s = report["summary"]
    if args.strict and not (
        s["ours_smaller_than_every_tool_on_every_row"] and s["warm_meets_target"]
    ):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
