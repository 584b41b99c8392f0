"""Run every speed and memory benchmark in turn and regenerate ``docs/benchmarks.md``.

Each script runs in its own process (fresh memory, fresh thread pools) and writes its
section into a new copy of the document, which replaces the old one at the end. A section
whose script failed keeps its previous text, marked stale; sections that other scripts
wrote into the same document are kept as they are. (Detection quality is not measured here:
``quality.py`` writes ``docs/quality.md``.)

    python benchmarks/run_all.py            # the full run: about 15-20 minutes on 2 cores
    python benchmarks/run_all.py --quick    # smoke run of every script: a few minutes
    python benchmarks/run_all.py --only features,latency
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DOC, DOC_HEADER, REPO, ensure_repo_on_path, section_markers

HERE = REPO / "benchmarks"
SCRIPTS = {  # section name → script, in the order of the document
    "train_throughput": "train_throughput.py",
    "features": "features.py",
    "end_to_end": "end_to_end.py",
    "latency": "latency.py",
}
SECTION_RE = re.compile(r"<!-- BEGIN (?P<name>[\w-]+) -->\n.*?<!-- END (?P=name) -->", re.DOTALL)


def sections(text: str) -> dict[str, str]:
    """Every marked section of a document: name → the whole block, markers included."""
    return {m["name"]: m.group(0) for m in SECTION_RE.finditer(text)}


def stale(block: str, name: str) -> str:
    begin, _ = section_markers(name)
    note = (f"> **Stale:** `benchmarks/{SCRIPTS[name]}` failed in the last `run_all.py`; "
            "this is the previous run's text.\n\n")
    return block if "**Stale:**" in block else block.replace(begin + "\n", begin + "\n" + note, 1)


def run_script(name: str, doc: Path, extra: list[str]) -> tuple[bool, float]:
    argv = [sys.executable, str(HERE / SCRIPTS[name]), "--doc", str(doc), *extra]
    print(f"\n=== {' '.join(argv[1:])}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO)
    return done.returncode == 0, time.perf_counter() - start


def assemble(new: dict[str, str], old: dict[str, str], failed: list[str]) -> str:
    """The header, hand-written sections of the old document (e.g. the summary), then this
    run's sections in order (stale old ones for failures)."""
    blocks = [block for name, block in old.items() if name not in SCRIPTS]
    for name in SCRIPTS:
        if name in new:
            blocks.append(new[name])
        elif name in old:
            blocks.append(stale(old[name], name) if name in failed else old[name])
    return DOC_HEADER.rstrip() + "\n\n" + "\n\n".join(blocks) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(SCRIPTS)}")
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--draft", action="store_true",
                        help="mark every section as a draft (busy machine)")
    parser.add_argument("--doc", type=Path, default=DOC, help="document to regenerate")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = list(SCRIPTS) if not args.only else [s.strip() for s in args.only.split(",")]
    unknown = [s for s in chosen if s not in SCRIPTS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(SCRIPTS)}")
    extra = ["--quiet"] + (["--quick"] if args.quick else []) + (["--draft"] if args.draft else [])
    old = sections(args.doc.read_text()) if args.doc.exists() else {}
    failed, timings = [], {}
    with tempfile.TemporaryDirectory(prefix="stethoscope-bench-doc-") as tmp:
        scratch = Path(tmp) / "benchmarks.md"
        for name in chosen:
            ok, timings[name] = run_script(name, scratch, extra)
            if not ok:
                failed.append(name)
        new = sections(scratch.read_text()) if scratch.exists() else {}
    ensure_repo_on_path()
    from stethoscope.storage import atomic_write_text

    atomic_write_text(args.doc, assemble(new, old, failed))
    print("\n" + "\n".join(f"{name:<18} {timings[name]:7.1f} s  "
                           f"{'FAILED' if name in failed else 'ok'}" for name in chosen))
    print(f"total {sum(timings.values()):.0f} s; wrote {args.doc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
