"""The memorization filter against guarded sets of up to a million items (the guard index, issue #12).

For each N a guard index (nudging_core/guard_index.py) is built from N deterministic smooth random
64 x 64 items (random colours at 8 x 8, enlarged: a photo's spectrum, not white noise), generated
directly at the comparison size and streamed into build_sharded_guard. Then, for each search
backend (torch; faiss when importable), a fresh process that only imports, opens the guard and
checks measures:
  - per-image check latency (median and max over 40 single-image checks, after 3 warm-up checks)
    of 512 x 512 images: 20 planted copies (an item with noise sigma 0.02-0.05 or brightness
    +-2/255, made at 64 x 64 and enlarged by nearest neighbour so the comparison sees exactly that)
    and 20 fresh images drawn like the items;
  - resident memory: VmRSS before opening, and the peak (VmHWM, reset with /proc/self/clear_refs
    just before opening) over the opening and all checks;
  - the candidates each step lets through (range search, per-tile bounds, exact test) and the
    false candidates (items that reached the exact test and were not under the threshold);
  - the same steps for 5 of the fresh images at looser thresholds (0.15, 0.2): the filters are
    bounds, so the further the threshold reaches into the set, the more items they let through;
  - recall of the planted copies: each must be flagged with its own item at the tiled L2 computed
    directly against that item; and for N <= --brute-max, the exact test run against every item
    (streamed from the shards) on --brute queries must give the same verdicts, items and distances.

  python -m bench.scale_million --sizes 10000 100000 1000000 [--json bench/scale.json]
      [--dir out/scale_million] [--keep] [--threads 1] [--brute 6] [--brute-max 100000]

Disk: about 13.3 KB an item while it runs (13.3 GB at a million); folders are deleted unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

from bench.filter_scale import _reset_peak, _status_mb

BLOCK = 4096            # items generated per random block (the generator is seeded per block)
SIZE = 64
QUERY_SIZE = 512
THRESHOLD = 0.1
SHARD_SIZE = 65536
LOOSE_THRESHOLDS = (0.15, 0.2)
LOOSE_QUERIES = 5


def _block(seed: int, b: int, count: int, only: int | None = None):
    """Items b * BLOCK ... as uint8 [count, 64, 64, 3] (or item `only` of them): the same for the same
    (seed, b). Bilinear enlargement written as two small matrix products (5x faster than interpolate)."""
    import torch
    g = torch.Generator().manual_seed(seed * 1_000_003 + b)
    low = torch.rand(count, 3, 8, 8, generator=g)
    if only is not None:
        low = low[only:only + 1]
    lift = torch.nn.functional.interpolate(torch.eye(8)[:, None, :], size=SIZE, mode="linear",
                                           align_corners=False)[:, 0, :].T.contiguous()      # [64, 8]
    big = torch.einsum("hi,ncij,wj->nhwc", lift, low, lift)
    return (big * 255).round_().clamp_(0, 255).to(torch.uint8)


def items(n: int, seed: int = 1, clock: list | None = None):
    """The n items, one at a time (what build_sharded_guard streams); time spent generating goes to clock[0]."""
    for b in range(0, n, BLOCK):
        t0 = time.perf_counter()
        block = _block(seed, b // BLOCK, min(BLOCK, n - b))
        if clock is not None:
            clock[0] += time.perf_counter() - t0
        yield from block


def item(i: int, seed: int = 1):
    return _block(seed, i // BLOCK, BLOCK, only=i % BLOCK)[0]


def queries(n: int):
    """(images [40, 512, 512, 3] float, planted item or -1, kind) — 20 planted copies, 20 fresh images."""
    import torch
    g = torch.Generator().manual_seed(n + 17)
    small, planted, kinds = [], [], []
    for k in range(20):
        i = (k * 2_654_435_761 + 12345) % n
        base = item(i).float() / 255
        if k % 5 == 4:
            delta = 2 / 255 if k % 10 == 4 else -2 / 255
            small.append((base + delta).clamp(0, 1))
            kinds.append(f"brightness {'+' if delta > 0 else '-'}2")
        else:
            sigma = (0.02, 0.03, 0.04, 0.05)[k % 5]
            small.append((base + sigma * torch.randn(base.shape, generator=g)).clamp(0, 1))
            kinds.append(f"noise {sigma}")
        planted.append(i)
    fresh = _block(987_654, 0, 20).float() / 255           # drawn like the items, from another seed
    small += list(fresh)
    planted += [-1] * 20
    kinds += ["fresh"] * 20
    images = torch.stack(small).repeat_interleave(QUERY_SIZE // SIZE, 1).repeat_interleave(QUERY_SIZE // SIZE, 2)
    return images, planted, kinds


def _stat(values):
    s = sorted(values)
    return {"median": s[len(s) // 2], "max": s[-1]}


def brute(guard, images, chunk: int = 8192):
    """The exact test against every item, streamed from the shards: (min distance, index) per image."""
    import torch
    from nudging_core.tiled_l2 import DEFAULT_GRID, image_tiles, tiled_l2_from_tiles, to_comparison
    q_tiles = image_tiles(to_comparison(images, (SIZE, SIZE)), DEFAULT_GRID)
    best = torch.full((images.shape[0],), float("inf"))
    where = torch.full((images.shape[0],), -1, dtype=torch.long)
    for start in range(0, len(guard), chunk):
        rows = guard.rows(range(start, min(len(guard), start + chunk)))
        d, i = tiled_l2_from_tiles(q_tiles, image_tiles(to_comparison(rows, (SIZE, SIZE)), DEFAULT_GRID)).min(dim=1)
        better = d < best
        best[better], where[better] = d[better], i[better] + start
    return best, where


def one(folder: str, n: int, backend: str, threads: int) -> dict:
    """Open and check, in a process of its own (its memory figures are the filter's alone)."""
    import torch
    torch.set_num_threads(threads)
    if backend == "faiss":
        import faiss
        faiss.omp_set_num_threads(threads)
    from nudging_core.guard_index import GuardIndex
    from nudging_core.tiled_l2 import tiled_l2_matrix, to_comparison
    images, planted, kinds = queries(n)
    sources = torch.stack([item(i) for i in planted if i >= 0])
    _reset_peak()
    rss_before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    guard = GuardIndex.open(folder, backend=backend)
    open_s = time.perf_counter() - t0
    rss_open = _status_mb("VmRSS")
    for k in range(3):                                         # warm-up
        guard.search(images[20 + k:21 + k], THRESHOLD)
    times, results = [], []
    for b in range(images.shape[0]):
        t0 = time.perf_counter()
        results.append(guard.search(images[b:b + 1], THRESHOLD))
        times.append(time.perf_counter() - t0)
    peak = _status_mb("VmHWM")
    rss_after = _status_mb("VmRSS")
    loose = {}              # the fresh images at looser thresholds: many more items reach the later steps
    for threshold in LOOSE_THRESHOLDS:
        spent, got = [], []
        for b in range(20, 20 + LOOSE_QUERIES):
            t0 = time.perf_counter()
            got.append(guard.search(images[b:b + 1], threshold))
            spent.append((time.perf_counter() - t0) * 1000)
        loose[str(threshold)] = {
            "check_ms": {k: round(v, 1) for k, v in _stat(spent).items()},
            **{key: _stat([getattr(r, key)[0] for r in got])
               for key in ("range_candidates", "tile_candidates", "cell_candidates", "matches")}}
    peak_loose = _status_mb("VmHWM")
    stored = guard.rows([i for i in planted if i >= 0])
    direct = tiled_l2_matrix(to_comparison(images[:20], (SIZE, SIZE)), to_comparison(sources, (SIZE, SIZE))).diagonal()
    found = [int(r.indices[0]) for r in results]
    dist = [float(r.distances[0]) for r in results]
    recall = [found[k] == planted[k] and abs(dist[k] - float(direct[k])) < 1e-6 for k in range(20)]
    ms = [t * 1000 for t in times]
    return {
        "backend": backend, "threads": threads, "open_s": round(open_s, 2),
        "check_ms": {k: round(v, 1) for k, v in _stat(ms).items()},
        "check_ms_planted": {k: round(v, 1) for k, v in _stat(ms[:20]).items()},
        "check_ms_fresh": {k: round(v, 1) for k, v in _stat(ms[20:]).items()},
        "rss_before_open_mb": round(rss_before), "rss_after_open_mb": round(rss_open),
        "rss_after_checks_mb": round(rss_after), "peak_rss_mb": round(peak),
        "range_candidates": _stat([r.range_candidates[0] for r in results]),
        "tile_candidates": _stat([r.tile_candidates[0] for r in results]),
        "cell_candidates": _stat([r.cell_candidates[0] for r in results]),
        "false_candidates": sum(r.cell_candidates[0] - r.matches[0] for r in results),
        "planted_found": sum(recall), "planted": 20, "planted_kinds": sorted(set(kinds[:20])),
        "fresh_flagged": sum(f >= 0 for f in found[20:]),
        "stored_rows_equal_items": bool(torch.equal(stored, sources)),
        "fresh_at_looser_thresholds": loose, "peak_rss_after_looser_mb": round(peak_loose),
        "found": found, "distances": [d if d < float("inf") else None for d in dist],
    }


def brute_check(folder: str, n: int, n_brute: int, rows: list[dict]) -> dict:
    """The exact test against every item on n_brute queries (half planted, half fresh): the same
    verdict, item and distance as each backend's guard gave?"""
    import torch
    from nudging_core.guard_index import GuardIndex
    images, _, _ = queries(n)
    pick = list(range(n_brute // 2)) + list(range(20, 20 + n_brute - n_brute // 2))
    t0 = time.perf_counter()
    best, where = brute(GuardIndex.open(folder, backend="torch"), images[pick])
    seconds = time.perf_counter() - t0
    same = {}
    for r in rows:
        same[r["backend"]] = all(
            (float(best[j]) < THRESHOLD) == (r["found"][b] >= 0)
            and (r["found"][b] < 0
                 or (int(where[j]) == r["found"][b] and abs(float(best[j]) - r["distances"][b]) < 1e-6))
            for j, b in enumerate(pick))
    return {"queries": len(pick), "seconds": round(seconds, 1), "same_verdicts": same,
            "nearest_distance_of_fresh": [round(float(best[j]), 4) for j, b in enumerate(pick) if b >= 20]}


def build(n: int, folder: str) -> dict:
    from nudging_core.guard_index import build_sharded_guard
    clock = [0.0]
    t0 = time.perf_counter()
    build_sharded_guard(folder, items(n, clock=clock), shard_size=SHARD_SIZE)
    total = time.perf_counter() - t0
    disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    return {"n": n, "build_s": round(total, 1), "generate_s": round(clock[0], 1),
            "build_items_per_s": round(n / (total - clock[0])), "disk_mb": round(disk / 2**20),
            "shards": -(-n // SHARD_SIZE)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000, 1000000])
    ap.add_argument("--json", default=None)
    ap.add_argument("--dir", default="out/scale_million")
    ap.add_argument("--keep", action="store_true", help="keep the built guards (and reuse kept ones)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backends", nargs="+", default=None, help="default: torch, and faiss when importable")
    ap.add_argument("--brute", type=int, default=6, help="queries checked against every item (N <= --brute-max)")
    ap.add_argument("--brute-max", type=int, default=100000)
    ap.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    if args.one is not None:
        folder, backend = args.one
        n = json.load(open(os.path.join(folder, "guard.json")))["count"]
        print(json.dumps(one(folder, n, backend, args.threads)))
        return
    backends = args.backends
    if backends is None:
        backends = ["torch"]
        try:
            import faiss  # noqa: F401
            backends.append("faiss")
        except ImportError:
            pass
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
               "python": platform.python_version()}
    try:
        import faiss
        machine["faiss"] = faiss.__version__
    except ImportError:
        pass
    print(f"machine: {machine}")
    rows = []
    for n in args.sizes:
        folder = os.path.join(args.dir, f"n{n}")
        if args.keep and os.path.isfile(os.path.join(folder, "guard.json")):
            row = {"n": n, "build_s": None, "note": "kept from an earlier run"}
        else:
            shutil.rmtree(folder, ignore_errors=True)
            row = build(n, folder)
            print(f"N={n}: built in {row['build_s']} s ({row['build_items_per_s']} items/s without generating, "
                  f"{row['generate_s']} s generating), {row['disk_mb']} MB on disk", flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        row["checks"] = []
        for backend in backends:
            out = subprocess.run([sys.executable, "-m", "bench.scale_million", "--one", folder, backend,
                                  "--threads", str(args.threads)],
                                 capture_output=True, text=True, env=env)
            if out.returncode:
                raise SystemExit(out.stderr)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            row["checks"].append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("found", "distances")}), flush=True)
        if n <= args.brute_max and args.brute:
            row["brute_force"] = brute_check(folder, n, args.brute, row["checks"])
            print(f"brute force: {row['brute_force']}", flush=True)
        rows.append(row)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print()
    print("        N  backend  build items/s  open s  check ms median / max  peak RSS MB (before open)  "
          "candidates range/tile/cell (median, max)  false cand.  planted found  fresh flagged  brute force")
    for row in rows:
        for r in row["checks"]:
            cand = "/".join(f"{r[k]['median']}" for k in ("range_candidates", "tile_candidates", "cell_candidates"))
            cmax = "/".join(f"{r[k]['max']}" for k in ("range_candidates", "tile_candidates", "cell_candidates"))
            verdict = row.get("brute_force", {}).get("same_verdicts", {}).get(r["backend"])
            brute = "-" if verdict is None else (f"same on {row['brute_force']['queries']}" if verdict else "DIFFERENT")
            built = str(row.get("build_items_per_s", "-"))
            print(f"{row['n']:9d}  {r['backend']:7s}  {built:>13s}  {r['open_s']:6.1f}  "
                  f"{r['check_ms']['median']:8.1f} / {r['check_ms']['max']:6.1f}  "
                  f"{r['peak_rss_mb']:11d} ({r['rss_before_open_mb']:4d})  {cand:>18s}, {cmax:<18s}  "
                  f"{r['false_candidates']:11d}  {r['planted_found']:6d} of 20  {r['fresh_flagged']:13d}  {brute}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine, "threshold": THRESHOLD, "shard_size": SHARD_SIZE, "rows": rows}, fh,
                      indent=1)


if __name__ == "__main__":
    main()
