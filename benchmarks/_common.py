"""What every benchmark script shares: the machine description, alternating timed repeats,
tables, and writing one script's section of ``docs/benchmarks.md``.

Comparisons are always ratios measured in the same run with the sides interleaved
(A, B, A, B, …) after a warm-up, so that load from elsewhere on the machine hits both sides
alike; the reported figure is the median of the repeats.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                     "amx_int8")
DRAFT_NOTE = ("**DRAFT** — measured on a busy shared machine (other jobs running) with tiny "
              "settings; the numbers show that the script works, not how fast anything is.")


def ensure_repo_on_path() -> None:
    """Let ``python benchmarks/x.py`` import ``stethoscope`` from this checkout, and import the
    package before torch, so that whatever runtime settings it makes on import hold here."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import stethoscope  # noqa: F401


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (or platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD/matrix flags that decide CPU deep-learning speed, as present on this CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    present = set(match.group(1).split()) if match else set()
    return [flag for flag in INTERESTING_FLAGS if flag in present]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_line(extra: dict[str, str | None] | None = None) -> str:
    """One Markdown line: CPU, cores, flags, library versions and date of this run."""
    versions = {"python": platform.python_version()}
    for name in ("torch", "numpy"):
        versions[name] = package_version(name)
    versions.update(extra or {})
    flags = ", ".join(cpu_flags()) or "none of " + "/".join(INTERESTING_FLAGS)
    parts = [f"{k} {v}" for k, v in versions.items() if v]
    return (f"*Machine:* {cpu_model()}, {usable_cores()} cores usable "
            f"({os.cpu_count()} online), flags: {flags}. *Versions:* {', '.join(parts)}. "
            f"*Date:* {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}.")


# ----------------------------------------------------------------------------- timing


def alternate(
    sides: dict[str, Callable[[], float]],
    repeats: int,
    warmup: int = 1,
    log: Callable[[str], None] | None = None,
    settle: float = 0.0,
) -> dict[str, list[float]]:
    """Run each side ``warmup`` times, then ``repeats`` rounds of every side in turn.

    Each callable does a fixed amount of work and returns the seconds it took (so it can
    leave set-up out of the timing). Returns every side's list of seconds, warm-up excluded.
    ``settle`` seconds of idling before every timed call, the same for each side, let the
    previous side's helper threads go back to sleep (OpenBLAS threads spin for a while
    after each call and would otherwise compete with whichever side runs next).
    """
    for _ in range(warmup):
        for name, side in sides.items():
            seconds = side()
            if log:
                log(f"  warm-up {name}: {seconds:.3f} s")
    results: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(repeats):
        for name, side in sides.items():
            time.sleep(settle)
            results[name].append(side())
        if log:
            log(f"  round {r + 1}/{repeats}: " +
                ", ".join(f"{n} {v[-1]:.3f} s" for n, v in results.items()))
    return results


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation, as numpy does by default."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ----------------------------------------------------------------------------- output


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table whose columns line up in a terminal too."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def fmt_rate(value: float | None) -> str:
    """Throughput with sensible precision: 1 234, 56.7, 0.89."""
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def section_markers(name: str) -> tuple[str, str]:
    return f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"


DOC_HEADER = """# Benchmarks

Speed and memory of stethoscope on a CPU, each compared with the usual alternative measured
in the same run. Regenerate everything with `python benchmarks/run_all.py` (about 15-20
minutes on 2 cores; see [benchmarks/README.md](../benchmarks/README.md)); each script also
rewrites only its own section below.

How to read these numbers: every ratio is measured in one run with the two sides
alternated (A, B, A, B, …) after a warm-up, and is the ratio of the medians of the repeats.
Each section names the machine it ran on (CPU, cores, bf16/AMX flags, library versions,
date); figures from different machines are not comparable. Run on a quiet machine: when
other processes compete for the cores, PyTorch's OpenMP threads lose far more than
TensorFlow's thread pool, so ratios against Keras taken on a busy machine can understate
stethoscope (compare with `--threads 1` there).
"""


def update_doc_section(name: str, body: str, doc: Path = DOC, draft: bool = False,
                       header: str | None = None) -> Path:
    """Replace (or append) the section of ``doc`` between this script's markers with ``body``.

    A missing ``doc`` starts with ``header`` (default: this document's introduction for
    docs/benchmarks.md, a bare title for any other file).
    """
    ensure_repo_on_path()
    from stethoscope.storage import atomic_write_text

    begin, end = section_markers(name)
    if draft:
        body = f"> {DRAFT_NOTE}\n\n{body}"
    block = f"{begin}\n{body.strip()}\n{end}"
    if header is None:
        header = DOC_HEADER if Path(doc).resolve() == DOC.resolve() else f"# {Path(doc).stem}\n"
    text = doc.read_text() if doc.exists() else header
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(doc, text)
    return doc


def publish(name: str, text: str, args) -> None:
    """Print a script's section on stdout and, unless ``--no-doc``, write it into
    ``args.doc`` (marked a draft with ``--draft``), saying where on stderr."""
    print(text)
    if not args.no_doc:
        path = update_doc_section(name, text, args.doc, draft=args.draft)
        print(f"\nwrote the {name} section of {path}", file=sys.stderr)


def add_common_arguments(parser) -> None:
    """Flags every script takes: where to write, whether to write, draft marking."""
    parser.add_argument("--doc", type=Path, default=DOC, help="Markdown file to update "
                        "(default docs/benchmarks.md)")
    parser.add_argument("--no-doc", action="store_true", help="print the table only")
    parser.add_argument("--draft", action="store_true",
                        help="mark the section as a draft (noisy machine, tiny settings)")
    parser.add_argument("--quiet", action="store_true", help="no per-round progress lines")


def shown_command(script: str, argv: Sequence[str]) -> str:
    """The command line to rerun a script, without the flags that only steer where output goes."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--doc", "--quiet", "--draft", "--no-doc") or arg.startswith("--doc="):
            skip = arg == "--doc"
            continue
        shown.append(arg)
    return " ".join(["python", f"benchmarks/{script}", *shown])


def logger(quiet: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    return log
