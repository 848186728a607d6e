"""``jaxnmf.fit_streamed`` (blocks read from disk in row tiles) against the disk and the in-memory fit.

    python -m benchmarks.out_of_core [--size-gb 3] [--n 10000] [--rank 20] [--iters 5] [--quick] [--out DIR]

Writes a data set of about ``--size-gb`` GB of float32 ``.npy`` files to a temporary folder (the
paper-like case's blocks, ``cases.CASES["paper"]``, their rows scaled to the size; X_b = W_b G +
noise as ``cases.make_blocks``, written in row chunks), then measures, side by side in one run:

- **sequential read**: a plain read of every file (``readinto`` of 64 MB chunks), cold (each file
  dropped from the page cache first: ``os.fsync`` then ``os.posix_fadvise(fd, 0, 0,
  POSIX_FADV_DONTNEED)``, which needs no root for clean pages) and warm (read again at once);
  median of ``--repeats``. Whether the drop worked is checked with ``mincore`` (the share of the
  files' pages still in the page cache after it). This machine is a VM: the host may cache the
  disk image whatever the guest drops, so "cold" is cold for this kernel only; and where DAMON
  pages out cold memory (recorded), the page cache is evicted too, so "warm" may not be.
- **fit_streamed**: ``--iters`` iterations (``tol=0``, from ``cases.init_factors``), cold (the
  files dropped before the call and before every pass) and warm. Each pass over the data inside
  the call is timed by wrapping ``jaxnmf._stream._Stream.run`` (from its first read to its last
  result; the F update between passes, which reads no data, is outside): seconds per iteration =
  median of the iterations' passes; achieved bandwidth = bytes of the blocks / that. Target: cold
  bandwidth >= 70% of the cold sequential read.
- **in-memory fit**: ``fit(..., one_pass=True, tol=0)`` on the same data (read into aligned
  arrays, when it takes less than 40% of the available memory): seconds per iteration = (t(3k) -
  t(k)) / 2k of calls of k = ``--iters`` and 3k iterations, after a warm-up call of each; and J
  after ``--iters`` iterations against fit_streamed's (target: relative difference <= 1e-4).
- **peak memory** of a fit_streamed call in a child process (``python -m benchmarks.out_of_core
  --memory-child DIR RANK ITERS``): VmHWM (``memory._peak_rss``) minus the resident memory after
  imports and backend start, over the data's size. Target: <= 25%.

Writes results.json and results.md (also printed) to ``--out``, atomically; the data is removed
at the end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import psutil

import jaxnmf
from jaxnmf import _stream

from .cases import CASES, TRUE_RANK
from .memory import _peak_rss
from .report import log, publish

BANDWIDTH_TARGET, MEMORY_TARGET, AGREE_TARGET = 0.7, 0.25, 1e-4
_CHUNK = 64 << 20  # bytes per read of the sequential read, and per written chunk of the data
MEMORY_SHARE = 0.4  # the in-memory fit runs when the data takes less than this share of the available memory


def write_data(folder: pathlib.Path, size_bytes: float, n: int, seed: int = 0) -> list[pathlib.Path]:
    """The paper-like case's blocks, rows scaled so that the float32 data is about ``size_bytes``,
    as .npy files written in row chunks (never a whole block in memory), fsynced. Returns the paths."""
    paper = CASES["paper"]
    scale = size_bytes / (4 * sum(paper.rows) * n)
    rng = np.random.default_rng(seed)
    g = rng.exponential(size=(TRUE_RANK, n)).astype(np.float32)
    paths = []
    for name, rows in paper.blocks:
        rows = max(1, round(rows * scale))
        path = folder / f"{name}.npy"
        step = max(1, _CHUNK // (4 * n))
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (rows, n)})
            for start in range(0, rows, step):
                r = min(step, rows - start)
                w = (rng.exponential(size=(r, TRUE_RANK)) * (rng.random((r, TRUE_RANK)) < 0.3)).astype(np.float32)
                part = w @ g
                part += rng.random(part.shape, dtype=np.float32)
                part.tofile(f)
            f.flush()
            os.fsync(f.fileno())
        paths.append(path)
    return paths


def data_bytes(paths) -> int:
    """Bytes of the arrays in the .npy files (headers excluded)."""
    return sum(int(np.prod(np.load(p, mmap_mode="r").shape)) * 4 for p in paths)


def drop_cache(paths) -> bool:
    """Ask the kernel to drop the files' clean pages from the page cache; False where it cannot be asked."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def cached_share(paths) -> float | None:
    """The share of the files' pages in the page cache (``mincore`` of a private mapping, which
    touches no page), or None where mincore is not available."""
    try:
        mincore = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    resident = total = 0
    for p in paths:
        size = os.path.getsize(p)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        with open(p, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
            anchor = ctypes.c_char.from_buffer(m)
            ok = mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) == 0
            del anchor
        if not ok:
            return None
        resident += sum(v & 1 for v in vec)
        total += pages
    return resident / total


def damon_pageout() -> bool | None:
    """Whether a running DAMON context pages out cold memory (``/sys/kernel/mm/damon``): it also
    evicts the page cache, so "warm" reads may come from the disk. None where /sys does not tell."""
    root = pathlib.Path("/sys/kernel/mm/damon/admin/kdamonds")
    try:
        return any((k / "state").read_text().strip() == "on"
                   and any(a.read_text().strip() == "pageout" for a in k.glob("contexts/*/schemes/*/action"))
                   for k in root.iterdir() if k.is_dir())
    except OSError:
        return None


def sequential_read(paths) -> float:
    """Seconds to read every file once, in order, in 64 MB ``readinto`` calls (unbuffered)."""
    buf = bytearray(_CHUNK)
    start = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


@contextlib.contextmanager
def timed_passes(paths, cold: bool):
    """While active, every pass of fit_streamed (``_Stream.run``) is timed into the yielded list,
    after dropping the files from the page cache when ``cold``."""
    seconds, run = [], _stream._Stream.run

    def timed_run(self, *args):
        if cold:
            drop_cache(paths)
        start = time.perf_counter()
        out = jax.block_until_ready(run(self, *args))
        seconds.append(time.perf_counter() - start)
        return out

    _stream._Stream.run = timed_run
    try:
        yield seconds
    finally:
        _stream._Stream.run = run


def init_from_files(paths, rank: int, seed: int = 1):
    """``cases.init_factors``' rule from the files' means (read in row chunks): F0 (rank, N), W0_b."""
    rng = np.random.default_rng((seed, rank))
    arrays = [np.load(p, mmap_mode="r") for p in paths]
    means = [float(sum(np.sum(x[a:a + 4096], dtype=np.float64) for a in range(0, x.shape[0], 4096)) / x.size)
             for x in arrays]
    total = sum(m * x.size for m, x in zip(means, arrays)) / sum(x.size for x in arrays)
    n = arrays[0].shape[1]
    F0 = (np.sqrt(total / rank) * np.abs(rng.standard_normal((rank, n)))).astype(np.float32)
    W0 = [(np.sqrt(m / rank) * np.abs(rng.standard_normal((x.shape[0], rank)))).astype(np.float32)
          for m, x in zip(means, arrays)]
    return F0, W0


def measure_streamed(paths, init, rank: int, iters: int, cold: bool) -> dict:
    """One fit_streamed call of ``iters`` iterations, its passes timed (``timed_passes``)."""
    if cold:
        drop_cache(paths)
    start = time.perf_counter()
    with timed_passes(paths, cold) as passes:
        res = jaxnmf.fit_streamed(paths, rank, key=jax.random.key(0), init=init, max_iter=iters, tol=0)
    call = time.perf_counter() - start
    # passes: the initial statistics pass, then one per iteration (the last forms the exact residuals too)
    return dict(call_seconds=call, pass_seconds=passes, seconds_per_iter=statistics.median(passes[1:]),
                loss=res.loss, n_iter=res.n_iter)


def load_aligned(paths) -> list[np.ndarray]:
    """The files as 64-byte aligned float32 arrays (``jaxnmf.aligned_empty``: fit uses them in place)."""
    out = []
    for p in paths:
        header = np.load(p, mmap_mode="r")
        x = jaxnmf.aligned_empty(header.shape, np.float32)
        with open(p, "rb", buffering=0) as f:
            f.seek(header.offset)
            f.readinto(memoryview(x.reshape(-1).view(np.uint8)))
        out.append(x)
    return out


def measure_in_memory(paths, init, rank: int, iters: int) -> dict:
    """fit(one_pass=True) on the data in memory: seconds per iteration (slope of k and 3k iterations,
    after a warm-up call of each) and J after ``iters`` iterations."""
    blocks = load_aligned(paths)
    call = lambda k: jaxnmf.fit(blocks, rank, key=jax.random.key(0), init=init, max_iter=k, tol=0, one_pass=True)
    times = {}
    for k in (iters, 3 * iters):
        res = call(k)  # compiles this length
        if k == iters:
            loss = res.loss
        start = time.perf_counter()
        jax.block_until_ready(call(k).F)
        times[k] = time.perf_counter() - start
    return dict(seconds=times, seconds_per_iter=(times[3 * iters] - times[iters]) / (2 * iters), loss=loss)


def measure_memory(folder: pathlib.Path, rank: int, iters: int) -> dict:
    """Peak resident memory of a fit_streamed call in a child process (the JSON it prints)."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.out_of_core", "--memory-child", str(folder), str(rank),
                           str(iters)], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        return dict(error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_child(folder: str, rank: int, iters: int) -> dict:
    jax.block_until_ready(jax.numpy.ones(8) * 2)  # start the backend before the baseline
    baseline = psutil.Process().memory_info().rss
    paths = sorted(pathlib.Path(folder).glob("*.npy"))
    jaxnmf.fit_streamed(paths, rank, key=jax.random.key(0), max_iter=iters, tol=0)
    peak = _peak_rss()
    size = data_bytes(paths)
    return dict(baseline_bytes=baseline, peak_bytes=peak, data_bytes=size, ratio=(peak - baseline) / size)


def verdict(measured: float | None, limit: float, at_least: bool = False) -> str:
    """PASS or MISS against ``limit`` (at most, or ``at_least``)."""
    if measured is None:
        return "n/a"
    return "PASS" if (measured >= limit if at_least else measured <= limit) else "MISS"


def markdown(r: dict) -> str:
    """The tables and the PASS/MISS lines."""
    gb = r["data_bytes"] / 1e9
    seq, cold, warm = r["sequential"], r["streamed"]["cold"], r["streamed"]["warm"]
    lines = [f"## fit_streamed out of core ({r['date']})", "",
             f"`{r['command']}`; {gb:.2f} GB float32 in {len(r['rows'])} .npy files (rows {r['rows']}, N = {r['n']}), "
             f"d = {r['rank']}, {r['iters']} iterations, tile {r['tile_bytes'] >> 20} MB; {r['cpus']} CPUs, "
             f"{r['memory_bytes'] / 2**30:.0f} GiB memory; load average {r['load_start']:.2f} -> {r['load_end']:.2f}; "
             f"{r['total_seconds']:.0f} s in all", "",
             f"- Page-cache drop (posix_fadvise DONTNEED): {'possible' if seq['drop_possible'] else 'not possible'}; "
             f"share of the files' pages cached after it: "
             + ("unknown (no mincore)" if seq["cached_after_drop"] is None else f"{seq['cached_after_drop']:.1%}")
             + "; before it (after writing/reading): "
             + ("unknown" if seq["cached_before_drop"] is None else f"{seq['cached_before_drop']:.1%}") + "; DAMON "
             "pageout of cold memory (which evicts the page cache, so warm reads may hit the disk): "
             + {True: "on", False: "off", None: "unknown"}[r["damon_pageout"]] + ".", "",
             "| what | seconds | GB/s |", "|---|---:|---:|",
             f"| sequential read, cold | {seq['cold_seconds']:.2f} | {gb / seq['cold_seconds']:.2f} |",
             f"| sequential read, warm | {seq['warm_seconds']:.2f} | {gb / seq['warm_seconds']:.2f} |",
             f"| fit_streamed, one iteration, cold | {cold['seconds_per_iter']:.2f} | {gb / cold['seconds_per_iter']:.2f} |",
             f"| fit_streamed, one iteration, warm | {warm['seconds_per_iter']:.2f} | {gb / warm['seconds_per_iter']:.2f} |"]
    mem = r.get("in_memory")
    if mem:
        lines.append(f"| fit(one_pass=True) in memory, one iteration | {mem['seconds_per_iter']:.2f} | "
                     f"{gb / mem['seconds_per_iter']:.2f} |")
    lines.append("")
    lines.append("- Load average at each section: " + ", ".join(f"{k} {v:.2f}" for k, v in r["loads"].items()) + ".")
    lines += [f"- fit_streamed calls of {r['iters']} iterations: cold {cold['call_seconds']:.1f} s, warm "
              f"{warm['call_seconds']:.1f} s (statistics pass, initial pass, iterations); passes cold "
              + ", ".join(f"{s:.2f}" for s in cold["pass_seconds"]) + " s, warm "
              + ", ".join(f"{s:.2f}" for s in warm["pass_seconds"]) + " s."]
    ratio = (gb / cold["seconds_per_iter"]) / (gb / seq["cold_seconds"])
    lines.append(f"- fit_streamed cold bandwidth / sequential cold read = {ratio:.2f} (at least {BANDWIDTH_TARGET}): "
                 f"{verdict(ratio, BANDWIDTH_TARGET, at_least=True)}")
    if mem and mem["seconds_per_iter"] > seq["cold_seconds"]:
        lines.append(f"- The in-memory fit's iteration ({mem['seconds_per_iter']:.2f} s) is slower than the cold read "
                     f"({seq['cold_seconds']:.2f} s): the products, not the disk, bound a pass on this machine, so no "
                     "streamed fit can reach the disk's bandwidth here.")
    if mem:
        rel = abs(cold["loss"] - mem["loss"]) / mem["loss"]
        lines.append(f"- J after {r['iters']} iterations: fit_streamed {cold['loss']:.7g}, in-memory fit "
                     f"{mem['loss']:.7g}, relative difference {rel:.1e} (at most {AGREE_TARGET:g}): "
                     f"{verdict(rel, AGREE_TARGET)}")
    else:
        lines.append(f"- in-memory fit not run: {r['in_memory_skipped']}")
    m = r["memory"]
    if "error" in m:
        lines.append(f"- peak memory child failed: {m['error']}")
    else:
        lines.append(f"- peak resident memory of fit_streamed {m['peak_bytes'] / 1e9:.2f} GB, {m['baseline_bytes'] / 1e9:.2f} "
                     f"GB after imports; (peak - baseline) / data = {m['ratio']:.3f} (at most {MEMORY_TARGET}): "
                     f"{verdict(m['ratio'], MEMORY_TARGET)}; the part that does not grow with the data (compiled programs, "
                     "two tiles and their temporaries, the statistics pass's float64 chunks) dominates small data")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.out_of_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=3.0, help="float32 data in GB (default: 3; quick: 0.25)")
    parser.add_argument("--n", type=int, default=10000, help="examples N (default: 10000)")
    parser.add_argument("--rank", type=int, default=20, help="factors d (default: 20)")
    parser.add_argument("--iters", type=int, default=5, help="iterations per fit (default: 5; quick: 3)")
    parser.add_argument("--repeats", type=int, default=3, help="sequential reads of each kind (default: 3; quick: 1)")
    parser.add_argument("--dir", type=pathlib.Path, default=None, help="where to write the data (default: a temporary "
                                                                        "folder under $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the data")
    parser.add_argument("--quick", action="store_true", help="0.25 GB, 3 iterations, 1 repeat")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" / "out_of_core",
                        help="output folder (default: benchmarks/results/out_of_core/)")
    parser.add_argument("--memory-child", nargs=3, metavar=("DIR", "RANK", "ITERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.size_gb, args.iters, args.repeats = min(args.size_gb, 0.25), min(args.iters, 3), 1
    if args.iters < 2:
        parser.error("--iters: at least 2 (the median of the iterations' passes)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.memory_child:
        folder, rank, iters = args.memory_child
        result = _memory_child(folder, int(rank), int(iters))
        print(json.dumps(result))
        return result
    start = time.perf_counter()
    results = dict(command=" ".join(["python -m benchmarks.out_of_core"] + (sys.argv[1:] if argv is None else argv)),
                   date=time.strftime("%Y-%m-%d"), load_start=os.getloadavg()[0], n=args.n, rank=args.rank,
                   iters=args.iters, tile_bytes=_stream.TILE_BYTES, cpus=os.cpu_count(),
                   memory_bytes=psutil.virtual_memory().total, damon_pageout=damon_pageout(), loads={})
    folder = pathlib.Path(tempfile.mkdtemp(prefix="jaxnmf-out-of-core-", dir=args.dir))
    try:
        log(f"writing {args.size_gb:g} GB of data to {folder}")
        paths = write_data(folder, args.size_gb * 1e9, args.n)
        results["rows"] = [int(np.load(p, mmap_mode="r").shape[0]) for p in paths]
        results["data_bytes"] = size = data_bytes(paths)
        log("sequential reads")
        results["loads"]["sequential read"] = os.getloadavg()[0]
        before = cached_share(paths)
        possible = drop_cache(paths)
        after = cached_share(paths)
        cold, warm = [], []
        for _ in range(args.repeats):
            drop_cache(paths)
            cold.append(sequential_read(paths))
            warm.append(sequential_read(paths))
        results["sequential"] = dict(drop_possible=possible, cached_before_drop=before, cached_after_drop=after,
                                     cold_samples=cold, warm_samples=warm, cold_seconds=statistics.median(cold),
                                     warm_seconds=statistics.median(warm))
        init = init_from_files(paths, args.rank)
        results["streamed"] = {}
        for kind in ("cold", "warm"):
            log(f"fit_streamed, {kind}")
            results["loads"][f"fit_streamed {kind}"] = os.getloadavg()[0]
            results["streamed"][kind] = measure_streamed(paths, init, args.rank, args.iters, kind == "cold")
        if size < MEMORY_SHARE * psutil.virtual_memory().available:
            log("in-memory fit(one_pass=True)")
            results["loads"]["in-memory fit"] = os.getloadavg()[0]
            results["in_memory"] = measure_in_memory(paths, init, args.rank, args.iters)
        else:
            results["in_memory_skipped"] = (f"{size / 1e9:.1f} GB of data against "
                                            f"{psutil.virtual_memory().available / 1e9:.1f} GB available")
        log("peak memory (child process)")
        results["loads"]["peak memory"] = os.getloadavg()[0]
        results["memory"] = measure_memory(folder, args.rank, args.iters)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    results["load_end"], results["total_seconds"] = os.getloadavg()[0], time.perf_counter() - start
    return publish(args.out, results, markdown)


if __name__ == "__main__":
    main()
