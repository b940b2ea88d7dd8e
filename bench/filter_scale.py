"""Cost of the memorization filter against guarded sets of growing size (exact tiled-L2 path).

For each N a set of N generated 512 x 512 items (smooth random images; one of them planted as a
noisy copy among the queries) is saved with save_set; a fresh process loads it the way
LoadEmbeddingSet does and times check_pixels on single 512 x 512 generated images: the first call
(which makes the set's comparison copies, once per set) and the median of the next ones. Peak
memory is the process's peak resident size (VmHWM, reset before loading) above what it held before
loading the set, compared with the set's uint8 pixel bytes.

  python -m bench.filter_scale [--sizes 100 500 1000] [--threads 1] [--json bench/filter_scale.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

SIZE = 512


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Start the peak resident size (VmHWM) afresh: importing torch alone peaks near 1 GB here."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def build(n: int, path: str) -> None:
    """A set of n smooth random 512 x 512 items (a photo's spectrum, not white noise), made in blocks."""
    import torch
    from nudging_core.embedding_set import EmbeddingSet, save_set
    g = torch.Generator().manual_seed(n)
    pixels = torch.empty(n, SIZE, SIZE, 3, dtype=torch.uint8)
    for i in range(0, n, 64):
        low = torch.rand(min(64, n - i), 3, 16, 16, generator=g)
        big = torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        pixels[i:i + 64] = (big * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    save_set(EmbeddingSet(latents=torch.zeros(n, 4, 1, 1), names=[f"item_{i}" for i in range(n)], pixels=pixels), path)


def one(path: str, threads: int, checks: int = 11) -> dict:
    """Load the set as LoadEmbeddingSet does and time checks of single images (run in its own process,
    so the peak resident size is the filter's, not the builder's)."""
    import torch
    from nudging_core.embedding_set import load_set
    from nudging_core.memorization import check_pixels

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(1)
    queries = [torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=g), size=(SIZE, SIZE), mode="bilinear",
                                               align_corners=False)[0].permute(1, 2, 0) for _ in range(checks - 1)]
    _reset_peak()
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    guarded = load_set(path)
    load_s = time.perf_counter() - t0
    n = len(guarded)
    planted = n // 2
    queries.insert(0, (guarded.pixels[planted].float() / 255 + 0.03 * torch.randn(SIZE, SIZE, 3, generator=g)).clamp(0, 1))
    times, verdicts = [], []
    for q in queries:
        t0 = time.perf_counter()
        verdicts.append(check_pixels(q[None], guarded, 0.1))
        times.append(time.perf_counter() - t0)
    peak_mb = _status_mb("VmHWM")
    set_mb = n * SIZE * SIZE * 3 / 2**20
    later = sorted(times[1:])
    return {"n": n, "size": SIZE, "threads": threads, "load_s": round(load_s, 3),
            "first_check_ms": round(times[0] * 1000, 1), "check_ms_median": round(later[len(later) // 2] * 1000, 2),
            "check_ms_max": round(later[-1] * 1000, 2), "set_uint8_mb": round(set_mb, 1),
            "peak_above_base_mb": round(peak_mb - base, 1), "peak_ratio": round((peak_mb - base) / set_mb, 3),
            "planted_copy_flagged": verdicts[0].flagged[0] and verdicts[0].nearest[0] == f"item_{planted}",
            "others_flagged": sum(v.flagged[0] for v in verdicts[1:])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.one, args.threads)))
        return
    rows = []
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch threads {args.threads}")
    print("    N  set MB  load s  first ms  median ms  max ms  peak MB above base  ratio  planted copy  false flags")
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "guarded.safetensors")
            build(n, path)
            out = subprocess.run([sys.executable, "-m", "bench.filter_scale", "--one", path, "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{n:5d}  {r['set_uint8_mb']:6.0f}  {r['load_s']:6.2f}  {r['first_check_ms']:8.1f}  {r['check_ms_median']:9.2f}  "
              f"{r['check_ms_max']:6.2f}  {r['peak_above_base_mb']:18.0f}  {r['peak_ratio']:5.2f}  "
              f"{'flagged' if r['planted_copy_flagged'] else 'MISSED':>12}  {r['others_flagged']:11d}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(), "rows": rows},
                      fh, indent=1)


if __name__ == "__main__":
    main()
