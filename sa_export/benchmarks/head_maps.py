"""Perplexity of SA spans on the demo model, per head-map mode, side by side in one run.

    python -m sa_export.benchmarks.head_maps [--model smollm2-135m] [--spans A-B,...] [--modes M,...] [--fit-steps N] [--other-text FILE] [--json FILE]

Calibration text and evaluation text come from disjoint parts of the default text
(checked by sa_export.accuracy.texts); every mode is also evaluated on text of another
domain (by default Python source), which calibration never sees. The attention statistics
are collected once and every plan is calibrated from them, exactly as `eval --head-map`
does for a single plan.
"""

from __future__ import annotations

import argparse
import time

from sa_export.accuracy.calibration import collect_statistics
from sa_export.accuracy.distill import FIT_STEPS
from sa_export.accuracy.evaluate import calibrated_plan, load_for_reference, perplexity
from sa_export.core.plan import build_plan
from sa_export.accuracy.texts import other_domain_tokens, split_texts
from sa_export.core.atomic import write_json_atomic

SPANS = ("15-18", "20-28", "23-26", "26-29")
MODES = ("identity", "argmax", "argmax-out", "argmax-group", "argmax-any", "mix", "mix-anchor", "mix-few", "fit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--spans", default=",".join(SPANS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--fit-steps", type=int, default=FIT_STEPS, help="Steps of the fit mode's distillation.")
    parser.add_argument("--other-text", help="Text of another domain (default: torch.nn.Module's Python source).")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()

    _, config, model, tokenizer = load_for_reference(args.model)
    evaluation, calibration = split_texts(tokenizer, None, None, args.eval_tokens, args.calib_tokens)
    texts = {"calib-domain": evaluation, "other-domain": other_domain_tokens(tokenizer, args.other_text, args.eval_tokens)}
    started = time.perf_counter()
    stats = collect_statistics(model, calibration.ids)
    base = {name: perplexity(model, text.ids, 1024) for name, text in texts.items()}
    print(f"calib: {calibration.source}")
    for name, text in texts.items():
        print(f"{name}: {text.source}, base ppl {base[name]:.2f}")
    modes = args.modes.split(",")
    print(f"\n{'span':>7} {'text':>12} " + " ".join(f"{m:>16}" for m in modes) + "   penalty / identity's")
    rows = []
    for span in args.spans.split(","):
        plan = build_plan([span], config.num_hidden_layers)
        mapped = {mode: calibrated_plan(model, plan, mode, calibration, stats=stats, fit_steps=args.fit_steps) for mode in modes}
        for name, text in texts.items():
            row = {"span": span, "text": name, "base_ppl": base[name]}
            for mode in modes:
                row[mode] = perplexity(model, text.ids, 1024, mapped[mode])
            penalty = {mode: row[mode] - base[name] for mode in modes}
            if "identity" in penalty and penalty["identity"] > 0:
                row["penalty_ratio"] = {mode: penalty[mode] / penalty["identity"] for mode in modes}
            rows.append(row)
            cells = " ".join(f"{row[m]:8.2f} ({penalty[m]:+6.2f})" for m in modes)
            ratios = " ".join(f"{m} {r:.2f}" for m, r in row.get("penalty_ratio", {}).items() if m != "identity")
            print(f"{span:>7} {name:>12} {cells}   {ratios}", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        write_json_atomic(args.json, {"calib": calibration.to_json(), "texts": {k: v.to_json() for k, v in texts.items()}, "rows": rows})


if __name__ == "__main__":
    main()
