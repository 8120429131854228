"""Assemble BENCHMARKS.md from the sections the benchmark scripts write in benchmarks/results/.

    python benchmarks/assemble.py
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = [  # (section file, script that writes it)
    ("scoring.md", "benchmarks/bench_scoring.py"),
    ("evaluation.md", "benchmarks/bench_eval.py"),
    ("healing.md", "benchmarks/bench_heal.py"),
    ("linear.md", "benchmarks/bench_heal.py"),
    ("efficiency.md", "benchmarks/bench_efficiency.py"),
    ("search.md", "benchmarks/bench_search.py"),
    ("families.md", "benchmarks/survey_archs.py --section benchmarks/results/families.md"),
    ("verify.md", "benchmarks/bench_verify.py --section benchmarks/results/verify.md"),
    ("gguf.md", "benchmarks/bench_gguf.py --demo runs/demo --section benchmarks/results/gguf.md"),
    ("engines.md", "benchmarks/bench_engines.py"),
    ("scale.md", "benchmarks/bench_scale.py --section benchmarks/results/scale.md"),
]

HEADER = """# Benchmarks

Every figure below was measured on the machine named in its section, by the command given with it;
each section is written by its script into `benchmarks/results/` and this file is assembled by
`python benchmarks/assemble.py`. Ratios are measured side by side in one run; absolute times on the shared
2-core development machine are noisy (other jobs ran beside some of these runs, as each section says).
"""


def main() -> None:
    parts = [HEADER]
    for name, script in ORDER:
        path = ROOT / "benchmarks" / "results" / name
        if path.is_file():
            parts.append(path.read_text().strip())
        else:
            parts.append(f"## {name[:-3].capitalize()}\n\nNot measured yet: run `{script}`.")
    (ROOT / "BENCHMARKS.md").write_text("\n\n".join(parts) + "\n")
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
