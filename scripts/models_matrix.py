"""Run the model-coverage suite and write its results as the matrix in docs/models.md.

    python scripts/models_matrix.py            # runs tests/models/coverage, rewrites the matrix
    python scripts/models_matrix.py --junit X  # from an earlier run's `pytest --junitxml X`

Each cell is what the suite found, one mark per chat shape (one image, two images, no image, three turns):
`✓` passed, `✗` failed, `skip` not run; `refused` at load (reason below the table). Nothing is filled in by hand.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "models.md"
START, END = "<!-- coverage-matrix:start -->", "<!-- coverage-matrix:end -->"
FEATURES = ["one-image", "multi-image", "no-image", "multi-turn"]
# (column, test name pattern per feature); a cell shows one mark per feature, in FEATURES' order
COLUMNS = [
    ("tokens = processor's", "test_prompt_tokens[{a}-{f}]"),
    ("prefill logits (1e-4)", "test_prefill_logits[{a}-{f}]"),
    ("batch engine, alone", "test_alone[{a}-{f}-batch]"),
    ("batch engine, 4 concurrent shapes", "test_concurrent_shapes[{a}]"),
    ("generate engine, alone", "test_alone[{a}-{f}-generate]"),
]


def run_suite(junit: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/models/coverage",
        f"--junitxml={junit}",
    ]
    subprocess.run(cmd, cwd=ROOT, check=False)


def outcomes(junit: Path) -> dict[str, str]:
    found = {}
    for case in ET.parse(junit).iter("testcase"):
        kids = {child.tag for child in case}
        found[case.get("name", "")] = "✗" if kids & {"failure", "error"} else "skip" if "skipped" in kids else "✓"
    return found


def architectures(found: dict[str, str]) -> tuple[list[str], list[str]]:
    served = sorted({m.group(1) for n in found if (m := re.match(r"test_concurrent_shapes\[(\w+)\]", n))})
    refused = sorted({m.group(1) for n in found if (m := re.match(r"test_refused_\w+\[(\w+)", n))})
    return served, refused


def cell(found: dict[str, str], pattern: str, arch: str) -> str:
    names = [pattern.format(a=arch, f=f) for f in FEATURES] if "{f}" in pattern else [pattern.format(a=arch)]
    return " ".join(found.get(name, "skip") for name in names)


def table(found: dict[str, str]) -> str:
    from llava_serve.models.support import REFUSED

    served, refused = architectures(found)
    lines = ["| architecture | " + " | ".join(name for name, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for arch in served:
        cells = [cell(found, pattern, arch) for _, pattern in COLUMNS]
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    notes = []
    for arch in refused:
        results = [v for n, v in found.items() if re.match(rf"test_refused_\w+\[{arch}\b", n)]
        mark = "refused" if results and all(v == "✓" for v in results) else f"refusal test: {', '.join(results)}"
        lines.append(f"| {arch} | " + " | ".join([mark] * len(COLUMNS)) + " |")
        reasons = REFUSED.get(arch, {})
        why = reasons.get("batch") or "its processor needs torchvision, which is not installed here"
        notes.append(f"- **{arch}**: {why}.")
    legend = "Marks per cell: one image, two images, no image, three turns (the concurrent column: one run)."
    return "\n".join([*lines, "", legend, "", "Refused at load:", "", *notes])


def write(doc: Path, text: str) -> None:
    body = doc.read_text()
    block = f"{START}\n{text}\n{END}"
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, body, flags=re.S)
    doc.write_text(new if START in body else body.rstrip() + "\n\n" + block + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--junit", type=Path, help="results of an earlier run instead of running the suite")
    args = parser.parse_args(argv)
    junit = args.junit
    if junit is None:
        junit = Path(tempfile.mkdtemp()) / "coverage.xml"
        run_suite(junit)
    write(DOC, table(outcomes(junit)))
    print(f"wrote the matrix to {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
