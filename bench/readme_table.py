"""Print the README's shapes-fixture table from bench/results.json (python -m bench.readme_table)."""
from __future__ import annotations

import argparse
import json
import os

from host.comfy_host import REPO

METHOD_NAMES = {"off": "loop off", "two_pass": "two-pass (`memorization_guard.json`)",
                "single_pass": "single-pass (`single_pass_guard.json`)"}


def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def shapes_table(results: dict) -> str:
    shapes = results["shapes_world"]
    table = shapes["table"]
    lines = ["| captions | method | memorized | near-copy | copied tiles (mean) | relevance (reader) "
             "| relevance / plain | quality (reader confidence) / plain |",
             "|---|---|---|---|---|---|---|---|"]
    for group, label in (("duplicated", "duplicated (flagged)"), ("plain", "plain (clean)")):
        for method, name in METHOD_NAMES.items():
            row = table[f"{group}/{method}"]
            lines.append(f"| {label} | {name} | {pct(row['memorized_rate'])} | {pct(row['near_copy_rate'])} | "
                         f"{pct(row['copied_tiles_mean'])} | {pct(row['relevance_rate'])} | "
                         f"{row.get('relevance_vs_plain', '') if group == 'duplicated' else ''} | "
                         f"{row.get('quality_vs_plain', '') if group == 'duplicated' else ''} |")
    lines += ["", "| cost against one plain generation (median of per-prompt ratios) | two-pass | single-pass |",
              "|---|---|---|",
              f"| flagged prompts | {shapes['overhead_ratio_flagged']} | {shapes['overhead_ratio_flagged_single']} |",
              f"| clean prompts | {shapes['overhead_ratio_clean']} | {shapes['overhead_ratio_clean_single']} |"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default=os.path.join(REPO, "bench", "results.json"))
    args = parser.parse_args(argv)
    with open(args.results) as f:
        print(shapes_table(json.load(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
