"""Markdown table of a pytest-benchmark JSON file (``--benchmark-json``)::

    python -m benchmarks.cpu_table bench.json > bench.md

Times in milliseconds: median, the interquartile range (q1-q3), rounds; within each group, ``vs
first`` is the first row's median divided by the row's (above 1: faster than the first row).
"""
from __future__ import annotations

import json
import sys
from typing import Any, Dict, List


def table(data: Dict[str, Any]) -> str:
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {}) if isinstance(mi.get("cpu"), dict) else {}
    lines = ["# audiomae CPU benchmarks (pytest-benchmark)", ""]
    facts = [("CPU", cpu.get("brand_raw")), ("cores", mi.get("cpu_count") or cpu.get("count")),
             ("torch threads", mi.get("torch_threads")), ("torch", mi.get("torch")), ("triton", mi.get("triton")),
             ("python", mi.get("python_version")), ("date", data.get("datetime")),
             ("commit", (data.get("commit_info") or {}).get("id", "")[:7] or None)]
    lines += [f"- {k}: {v}" for k, v in facts if v is not None]
    lines.append("")
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for b in data.get("benchmarks", []):
        groups.setdefault(b.get("group") or "", []).append(b)
    for group, rows in groups.items():
        lines += [f"## {group}" if group else "## (no group)", "",
                  "| benchmark | median ms | q1-q3 ms | rounds | vs first |", "|---|---|---|---|---|"]
        first = rows[0]["stats"]["median"]
        for b in rows:
            s = b["stats"]
            lines.append(f"| {b['name']} | {s['median'] * 1e3:.3g} | {s['q1'] * 1e3:.3g}-{s['q3'] * 1e3:.3g} | "
                         f"{s['rounds']} | {first / s['median']:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        sys.stdout.write(table(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
