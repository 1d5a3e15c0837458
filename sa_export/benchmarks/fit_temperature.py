"""Does a per-head temperature on the fitted maps' probabilities pay, on both texts?

    python -m sa_export.benchmarks.fit_temperature [--spans 23-26,...] [--fit-steps N] [--json FILE]

For each span, the `fit` head maps (from `mix-few`, distilled on the calibration text) are
fitted twice side by side: as shipped, and with each shared head's mixture raised to a
fitted power and renormalized (``reference.mix_probs``). Both are judged on held-out
text of the calibration's domain and on text of another domain. The temperature exists
only in the PyTorch reference: this measures whether it would be worth a graph op.
"""

from __future__ import annotations

import argparse
import math
import time

from sa_export.accuracy.calibration import FIT_START, calibrate_head_maps, collect_statistics
from sa_export.accuracy.distill import FIT_STEPS, fit_maps_and_temperatures
from sa_export.accuracy.evaluate import load_for_reference, perplexity
from sa_export.accuracy.texts import other_domain_tokens, split_texts
from sa_export.core.plan import build_plan
from sa_export.core.atomic import write_json_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--spans", default="23-26")
    parser.add_argument("--fit-steps", type=int, default=FIT_STEPS)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    _, config, model, tokenizer = load_for_reference(args.model)
    evaluation, calibration = split_texts(tokenizer, None, None, 4096, 4096)
    texts = {"calib-domain": evaluation.ids, "other-domain": other_domain_tokens(tokenizer, None, 4096).ids}
    stats = collect_statistics(model, calibration.ids)
    base = {name: perplexity(model, ids, 1024) for name, ids in texts.items()}
    print("base ppl " + ", ".join(f"{name} {value:.2f}" for name, value in base.items()))
    rows = []
    for span in args.spans.split(","):
        plan = build_plan([span], config.num_hidden_layers)
        identity = {name: perplexity(model, ids, 1024, plan) for name, ids in texts.items()}
        start = calibrate_head_maps(stats, plan, FIT_START)
        for temperature in (False, True):
            started = time.perf_counter()
            maps, log_temperatures = fit_maps_and_temperatures(model, plan, calibration.ids, start, args.fit_steps, temperature=temperature)
            seconds = time.perf_counter() - started
            fitted = plan.with_head_maps(maps)
            row = {"span": span, "temperature": temperature, "fit_s": seconds}
            for name, ids in texts.items():
                ppl = perplexity(model, ids, 1024, fitted, log_temperatures)
                row[name] = {"ppl": ppl, "penalty": ppl - base[name], "of_identity": (ppl - base[name]) / (identity[name] - base[name])}
            if log_temperatures:
                row["temperatures"] = {layer: [round(math.exp(t), 3) for t in values.tolist()] for layer, values in log_temperatures.items()}
            rows.append(row)
            cells = "  ".join(f"{name} {row[name]['ppl']:.2f} ({row[name]['penalty']:+.2f}, {row[name]['of_identity']:.2f} of identity)" for name in texts)
            print(f"{span} {'fit + temperature' if temperature else 'fit':>17}: {cells}  [{seconds:.0f} s]", flush=True)
    if args.json:
        write_json_atomic(args.json, {"base": base, "rows": rows})


if __name__ == "__main__":
    main()
