"""Peak memory and time of a long prefill, each model in its own process, side by side.

    python -m sa_export.benchmarks.prefill_memory OUT_DIR [OUT_DIR ...] [--tokens 8000] [--chunk 512] [--memory arena|system|lean] [--json FILE]

Each model runs `SAModel(OUT).prefill` on the same random prompt, then 4 decode steps,
in a fresh Python process, and reports that process's RSS once the model is loaded, its
peak RSS (VmHWM) and the prefill time. Chunk 0 feeds the whole prompt in one call.
"""

from __future__ import annotations

import argparse

from sa_export.runtime.memory import MEMORY_MODES
from sa_export.stages.prefill import peak_memory
from sa_export.core.atomic import write_json_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--chunk", type=int, action="append", help="Chunk sizes to measure (repeatable; 0: whole prompt).")
    parser.add_argument("--memory", default="arena", choices=list(MEMORY_MODES), help="; ".join(f"{k}: {v}" for k, v in MEMORY_MODES.items()))
    parser.add_argument("--json", dest="json_file")
    args = parser.parse_args()
    rows = []
    for chunk in args.chunk or [0, 512]:
        for out_dir in args.dirs:
            row = {**peak_memory(out_dir, args.tokens, chunk, args.memory), "tokens": args.tokens, "chunk": chunk, "memory": args.memory}
            rows.append(row)
            loaded = row["loaded_rss_bytes"]  # None without procfs
            loaded_text = f"{loaded / 2**20:.1f} MiB" if loaded is not None else "unknown"
            print(f"{out_dir}: {args.tokens} tokens, chunk {chunk or 'whole'}{'' if args.memory == 'arena' else ', memory ' + args.memory}: prefill {row['prefill_s']:.1f} s, RSS after loading {loaded_text}, peak {row['peak_rss_bytes'] / 2**20:.1f} MiB", flush=True)
    if args.json_file:
        write_json_atomic(args.json_file, rows)


if __name__ == "__main__":
    main()
