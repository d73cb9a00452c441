"""Peak memory and wall time of `fluid prepare-data` on a large generated JSONL source.

Writes --rows prompt_response rows (a few hundred characters each) to a temporary folder, then runs
`fluid prepare-data` on them in a fresh child process (a character tokenizer, no download; template = "none",
num_proc = 1) and prints the child's peak resident memory (ru_maxrss) and its wall time:

    OMP_NUM_THREADS=1 python bench/prepare_memory.py --rows 200000

The child process is measured alone (RUSAGE_CHILDREN), so writing the input file does not count. ru_maxrss also
counts the pages of memory-mapped files the process has read, so the peaks of its two parts are printed too:
anonymous memory (what the process itself allocates; about 320 MiB are the imports of torch, transformers and
datasets) and file-backed memory (shared libraries, and the Arrow files `datasets` memory-maps, which the kernel
can drop at any time like any page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("apple river stone quick brown lazy seven eleven twenty count add take give find book page class "
         "student money left pen cap ball kite mug hat morning evening because then so there").split()

RECIPE = """\
[model.scratch]
tokenizer = "char"

[data]
output_dir = "out"
template = "none"
cutoff_len = 1024
validation = 0.01
num_proc = 1
seed = 0

[[data.sources]]
path = "big.jsonl"
format = "prompt_response"
"""


def sentence(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)


def write_rows(path: Path, n: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    size = 0
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            row = {"id": i, "prompt": sentence(rng, rng.randint(120, 240)) + "?",
                   "response": sentence(rng, rng.randint(80, 200)) + "."}
            line = json.dumps(row) + "\n"
            size += len(line)
            f.write(line)
    return size


def watch(pid: int, done, interval: float = 0.02) -> dict[str, int]:
    """Peak RssAnon/RssFile (KiB) of process `pid`, sampled from /proc until `done()`.

    ru_maxrss counts both: the process's own memory (anonymous) and the pages of memory-mapped files it has read,
    which the kernel can drop at any time (they are the page cache) but which stay counted while mapped.
    """
    peaks = {"RssAnon": 0, "RssFile": 0}
    while not done():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(interval)
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fluid-prepare-bench-"))
    try:
        size = write_rows(tmp / "big.jsonl", args.rows)
        (tmp / "recipe.toml").write_text(RECIPE)
        env = os.environ | {"OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp / "hf-cache"),
                            "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "fluid_cli", "prepare-data", "recipe.toml"], cwd=tmp, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peaks = watch(child.pid, lambda: child.poll() is not None)
        output = child.stdout.read()
        child.wait()
        wall = time.perf_counter() - started
        if child.returncode != 0:
            sys.exit(f"prepare-data failed ({child.returncode}):\n{output}")
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
        stats = json.loads((tmp / "out" / "stats.json").read_text())
        print(f"rows: {args.rows:,} ({size / 2**20:.1f} MiB of JSONL); examples out: {stats['examples_out']}; "
              f"tokens: {stats['tokens']['total']:,}")
        print(f"peak RSS: {peak_kib / 1024:.1f} MiB (ru_maxrss)")
        print(f"  of which, sampled every 20 ms: anonymous (heap) peak {peaks['RssAnon'] / 1024:.1f} MiB, "
              f"file-backed (memory-mapped Arrow files, reclaimable page cache) peak {peaks['RssFile'] / 1024:.1f} MiB")
        print(f"wall time: {wall:.1f} s")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
