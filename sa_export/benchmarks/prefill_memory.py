"""Peak memory and time of a long prefill, each model in its own process, side by side.

    python -m sa_export.benchmarks.prefill_memory OUT_DIR [OUT_DIR ...] [--tokens 8000] [--chunk 512] [--no-arena] [--json FILE]

Each model runs `SAModel(OUT).prefill` on the same random prompt, then 4 decode steps,
in a fresh Python process, and reports that process's peak RSS (getrusage) and the
prefill time. Chunk 0 feeds the whole prompt in one call.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = """
import json, resource, sys, time
import numpy as np
from sa_export.runtime import SAModel
out, tokens, chunk, arena = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) or None, sys.argv[4] == "1"
model = SAModel(out, spin=False, arena=arena)
ids = np.random.default_rng(0).integers(0, 100, (1, tokens))
mask = np.ones_like(ids)
cache = model.empty_cache(1, tokens + 4)
start = time.perf_counter()
logits, cache, _ = model.prefill(ids, mask, cache, chunk)
prefill_s = time.perf_counter() - start
for _ in range(4):
    mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
    logits, cache, _ = model.forward(logits[:, -1:].argmax(-1), mask, cache)
print(json.dumps({"dir": out, "prefill_s": prefill_s, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def measure(out_dir: str, tokens: int, chunk: int, arena: bool = True) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, out_dir, str(tokens), str(chunk), "1" if arena else "0"], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--chunk", type=int, action="append", help="Chunk sizes to measure (repeatable; 0: whole prompt).")
    parser.add_argument("--no-arena", action="store_true", help="ONNX Runtime without its CPU memory arena.")
    parser.add_argument("--json", dest="json_file")
    args = parser.parse_args()
    rows = []
    for chunk in args.chunk or [0, 512]:
        for out_dir in args.dirs:
            row = {**measure(out_dir, args.tokens, chunk, not args.no_arena), "tokens": args.tokens, "chunk": chunk, "arena": not args.no_arena}
            rows.append(row)
            print(f"{out_dir}: {args.tokens} tokens, chunk {chunk or 'whole'}{'' if not args.no_arena else ', no arena'}: prefill {row['prefill_s']:.1f} s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    if args.json_file:
        with open(args.json_file, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
