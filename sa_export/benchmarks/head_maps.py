"""Perplexity of SA spans on the demo model, per head-map mode, side by side in one run.

    python -m sa_export.benchmarks.head_maps [--model smollm2-135m] [--json FILE]

Calibration text and evaluation text come from disjoint parts of the default text
(checked by sa_export.accuracy.texts). The attention statistics are collected once and every
plan is calibrated from them, exactly as `eval --head-map` does for a single plan.
"""

from __future__ import annotations

import argparse
import json

from sa_export.accuracy.calibration import calibrate_head_maps, collect_statistics
from sa_export.accuracy.evaluate import load_for_reference, perplexity
from sa_export.core.plan import build_plan
from sa_export.accuracy.texts import split_texts

SPANS = ("15-18", "20-28", "23-26", "26-29")
MODES = ("identity", "argmax", "argmax-any", "mix")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--spans", default=",".join(SPANS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()

    _, config, model, tokenizer = load_for_reference(args.model)
    evaluation, calibration = split_texts(tokenizer, None, None, args.eval_tokens, args.calib_tokens)
    stats = collect_statistics(model, calibration.ids)
    base = perplexity(model, evaluation.ids, 1024)
    print(f"eval:  {evaluation.source}\ncalib: {calibration.source}\nbase ppl {base:.2f}\n")
    modes = args.modes.split(",")
    print(f"{'span':>7} " + " ".join(f"{m:>16}" for m in modes) + "   penalty kept by mix")
    rows = []
    for span in args.spans.split(","):
        plan = build_plan([span], config.num_hidden_layers)
        row = {"span": span, "base_ppl": base}
        for mode in modes:
            mapped = plan.with_head_maps(calibrate_head_maps(stats, plan, mode))
            row[mode] = perplexity(model, evaluation.ids, 1024, mapped)
        rows.append(row)
        cells = " ".join(f"{row[m]:8.2f} ({row[m] - base:+6.2f})" for m in modes)
        kept = ""
        if "identity" in row and "mix" in row:
            kept = f"   {(row['mix'] - base) / (row['identity'] - base):.2f}"
        print(f"{span:>7} {cells}{kept}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"eval": evaluation.to_json(), "calib": calibration.to_json(), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
