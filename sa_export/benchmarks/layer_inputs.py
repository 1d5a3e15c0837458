"""What running a plan from its first changed layer saves, side by side with whole runs.

    python -m sa_export.benchmarks.layer_inputs [--model smollm2-135m] [--span 26-29] [--fit-steps 20] [--tokens 2048]

Two measures, each timed both ways in one run (``accuracy.layer_inputs``):

- the fit as `convert --head-map fit --lora-rank 8` runs it (news and code, 16,384 tokens
  of each, corrections of the shared layers and of the Q/K projections their maps read),
  for ``--fit-steps`` steps from the same start and seed: seconds, and the held-out
  divergence at the start and at the end, which must agree;
- the frontier's search: every single layer shared alone (identity maps), perplexity on
  ``--tokens`` of news: seconds and the largest difference in perplexity.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from unittest import mock

from sa_export.accuracy.adapters import LowRankAdapters
from sa_export.accuracy.calibration import FIT_START, calibrate_head_maps, collect_statistics
from sa_export.accuracy.distill import fit_maps_and_temperatures
from sa_export.accuracy.evaluate import layer_inputs_of, load_for_reference, perplexity
from sa_export.accuracy.layer_inputs import LayerInputs, first_changed_layer
from sa_export.accuracy.texts import LORA_CALIB_TOKENS, other_domain_text_path, split_texts
from sa_export.core.plan import build_plan

WINDOW = 1024


def _whole_runs():
    """Every run starts at layer 0, as before layer inputs were kept."""
    return mock.patch.object(LayerInputs, "start_for", lambda self, first_changed: 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--span", default="26-29")
    parser.add_argument("--fit-steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of news each single-layer plan is measured on")
    args = parser.parse_args()
    if min(args.fit_steps, args.rank, args.tokens) < 1:
        parser.error("--fit-steps, --rank and --tokens must be at least 1")

    _, config, model, tokenizer = load_for_reference(args.model)
    news, news_calib = split_texts(tokenizer, None, None, args.tokens, LORA_CALIB_TOKENS)
    code_file = other_domain_text_path()
    _, code_calib = split_texts(tokenizer, code_file, code_file, args.tokens, LORA_CALIB_TOKENS)
    calibration = news_calib.ids + code_calib.ids
    plan = build_plan(args.span.split("+"), config.num_hidden_layers)
    start = calibrate_head_maps(collect_statistics(model, calibration), plan, FIT_START)

    fit_seconds, heard = {}, {}
    for way, patch in (("whole", _whole_runs), ("from the first changed layer", contextlib.nullcontext)):
        adapters = LowRankAdapters(model, plan.shared_layers, args.rank)
        adapters.add_sources(model, plan.with_head_maps(start))
        heard[way] = []
        started = time.perf_counter()
        with patch():
            fit_maps_and_temperatures(model, plan, calibration, start, args.fit_steps, adapters=adapters, on_validate=lambda step, kl: heard[way].append(kl))
        fit_seconds[way] = time.perf_counter() - started
        print(f"fit {args.span}, {args.fit_steps} steps, {way}: {fit_seconds[way]:.1f} s (first changed layer "
              f"{first_changed_layer(plan.with_head_maps(start), adapters.layers)}); held-out KL "
              + " -> ".join(f"{kl:.5f}" for kl in heard[way]), flush=True)
    print(f"fit: from the first changed layer / whole = {fit_seconds['from the first changed layer'] / fit_seconds['whole']:.3f}")

    singles = [build_plan([f"{layer}-{layer}"], config.num_hidden_layers) for layer in range(1, config.num_hidden_layers)]
    started = time.perf_counter()
    whole = [perplexity(model, news.ids, WINDOW, single) for single in singles]  # no layer inputs: whole runs
    whole_seconds = time.perf_counter() - started
    started = time.perf_counter()
    inputs = layer_inputs_of(model, news.ids, WINDOW)
    kept = time.perf_counter() - started
    started = time.perf_counter()
    skipped = [perplexity(model, news.ids, WINDOW, single, inputs=inputs) for single in singles]
    skipped_seconds = time.perf_counter() - started
    print(f"search: {len(singles)} single-layer plans on {len(news.ids)} tokens of news: whole {whole_seconds:.1f} s; "
          f"layer inputs {kept:.1f} s, then {skipped_seconds:.1f} s; (inputs + plans) / whole = {(kept + skipped_seconds) / whole_seconds:.3f}; "
          f"largest perplexity difference {max(abs(a - b) for a, b in zip(whole, skipped)):.2e}")


if __name__ == "__main__":
    main()
