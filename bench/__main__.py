"""Run every benchmark module, write bench/results.json and print a table.

Each result is {"name", "ratio", "target", "passed", "detail"}: a ratio of two arms measured side by side in
this run (never an absolute time compared to a constant), passed = ratio >= target.
Usage: python -m bench [NAME_SUBSTRING ...]   (only modules whose name contains one of the substrings)
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    modules = sorted(p.stem for p in HERE.glob("bench_*.py"))
    if argv:
        modules = [m for m in modules if any(a in m for a in argv)]
    results: list[dict] = []
    for name in modules:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            rows = importlib.import_module(f"bench.{name}").run()
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            rows = [{"name": name, "ratio": None, "target": None, "passed": False, "detail": f"error: {exc}"}]
        for row in rows:
            row["passed"] = bool(row.get("ratio") is not None and row["ratio"] >= row["target"])
            results.append(row)
        print(f"   {time.perf_counter() - start:.1f} s", flush=True)
    out = HERE / "results.json"
    out.write_text(json.dumps({"benchmarks": results}, indent=2, default=str))
    print(format_table(results))
    print(f"written {out}")
    return 0 if all(r["passed"] for r in results) else 1


def format_table(rows: list[dict]) -> str:
    head = f"{'benchmark':<28} {'ratio':>8} {'target':>8}  {'ok':<4} detail"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.3f}"
        target = "-" if r.get("target") is None else f"{r['target']:.2f}"
        lines.append(f"{r['name']:<28} {ratio:>8} {target:>8}  {'yes' if r['passed'] else 'NO':<4} {r.get('detail', '')}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
