"""Peak RSS of the shard writer, the verifier and the cache builder at two data-set sizes (issue 13.6).

    python bench/data_memory.py                       # 500 and 2000 synthetic ImageNet-like JPEGs
    python bench/data_memory.py --sizes 1000 4000 --out bench/data_memory.md

Each tool runs as its own process under /usr/bin/time (peak resident set size, "%M" KB): the writer CLI
(--workers 0 and 2: workers are separate processes, so their peak is reported apart by /usr/bin/time only for
the parent; the workers' own peak is read from RUSAGE_CHILDREN inside a wrapper), the verifier CLI, and
build_cache with the stand-in pooling encoder of bench/data_throughput.py. A streaming tool's peak does not grow
with the data set: compare the two columns.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from data_throughput import write_folder  # noqa: E402

# Runs a command and prints the peak RSS (KB) of itself plus, separately, the largest of its children.
_WRAPPER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
print("CHILD_PEAK_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)
sys.exit(code)
"""

_CACHE = """
import sys
sys.path.insert(0, {bench!r})
from data_throughput import PoolingEncoder
from visgen.data.cache import build_cache
assert build_cache(PoolingEncoder(), {src!r}, {out!r}, 256, batch_size=32, num_workers={workers}) is not None
"""


def peak_kb(command: list[str]) -> tuple[float, float]:
    """(peak RSS of the process tree's largest process in MB, seconds), via the RUSAGE_CHILDREN wrapper."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _WRAPPER, *command], capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("CHILD_PEAK_KB"))
    return int(line.split()[1]) / 1024, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    python = sys.executable
    rows: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="visgen-bench-mem-") as tmp:
        for size in args.sizes:
            root = Path(tmp) / str(size)
            folder, mean_kb = write_folder(root / "folder", size)
            print(f"{size} images, mean {mean_kb:.0f} KB", flush=True)
            shards = str(root / "train" / f"train-{{000000..{(size - 1) // 100:06d}}}.tar")
            jobs = {
                "python + imports only (baseline)": [python, "-c", "import visgen.data.cache, visgen.data.verify"],
                "writer --workers 0": [python, "-m", "visgen.data.writer", "--src", str(folder), "--out",
                                       str(root / "train"), "--samples-per-shard", "100", "--quiet"],
                "writer --workers 2 --resize 256 (largest process)": [
                    python, "-m", "visgen.data.writer", "--src", str(folder), "--out", str(root / "train256"),
                    "--samples-per-shard", "100", "--resize", "256", "--workers", "2", "--quiet"],
                "verify --workers 0": [python, "-m", "visgen.data.verify", shards, "--workers", "0"],
                "cache (build_cache, 0 loader workers)": [
                    python, "-c", _CACHE.format(bench=str(ROOT / "bench"), src=shards, out=str(root / "cache"),
                                                workers=0)],
            }
            for name, command in jobs.items():
                mb, seconds = peak_kb(command)
                rows.setdefault(name, []).append(f"{mb:.0f} MB ({seconds:.0f} s)")
                print(f"  {name}: {mb:.0f} MB peak RSS, {seconds:.1f} s", flush=True)
    header = "| tool | " + " | ".join(f"{size} images" for size in args.sizes) + " |"
    lines = [header, "|---|" + "---:|" * len(args.sizes)]
    lines += [f"| {name} | " + " | ".join(values) + " |" for name, values in rows.items()]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(f"<!-- python bench/data_memory.py {' '.join(sys.argv[1:])} -->\n{text}\n")


if __name__ == "__main__":
    main()
