"""Would a partly shared layer pay as an anchor? Identity KV-group plans, two ways of anchoring.

    python -m sa_export.benchmarks.partial_anchors [--plan "27.1 28.0 28.1 29.2" ...] [--tokens 4096] [--json FILE]

``convert`` anchors each span on the last layer before it that is not shared at all, so a
layer of which only some KV groups borrow (``--span 27.1``) is never an anchor. Its
probabilities exist all the same: its kept heads' own and, for the heads it borrows, its
anchor's. Anchored on it instead (``nearest_anchors``), a later layer's head in a group the
partly shared layer keeps reads that layer's own head, one layer nearer; a head in a group
it borrows reads what it borrowed, as today. The PyTorch reference runs both plans
(``reference.shared_attention`` stores a partly shared anchor's probabilities as it uses
them), judged on held-out news, code and Wikipedia articles, with identity maps, which
are the plans whose anchors decide every head (calibrated maps already may read kept heads).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from sa_export.accuracy.evaluate import load_for_reference, perplexity
from sa_export.accuracy.texts import other_domain_tokens, read_text, unseen_domain_tokens
from sa_export.core.architectures import ModelShape
from sa_export.core.atomic import write_json_atomic
from sa_export.core.plan import SharingPlan, build_plan

# The KV-group plans of the README: the frontier's 3.3% pick, its 6.7% plan, and two smaller ones.
PLANS = ("24.2 25.2 27.1 28.0 28.1 29.2", "25 26.0 26.1 27.0 27.1 28 29.0 29.2", "26.0 27", "27.1 28.0 28.1 29.2")


def nearest_anchors(plan: SharingPlan) -> SharingPlan:
    """The plan with every shared layer anchored on the last earlier layer not shared whole."""
    whole = set(plan.whole_layers)
    anchors = {}
    for layer in plan.anchors:
        anchor = layer - 1
        while anchor in whole:
            anchor -= 1
        anchors[layer] = anchor
    return dataclasses.replace(plan, anchors=anchors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--plan", action="append", default=[], help="units of one plan, space-separated (default: the README's KV-group plans)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of each judged text")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    _, config, model, tokenizer = load_for_reference(args.model)
    texts = {
        "news": tokenizer(read_text(None)[0])["input_ids"][: args.tokens],  # the head, which calibration never reads
        "code": other_domain_tokens(tokenizer, None, args.tokens).ids,
        "wiki": unseen_domain_tokens(tokenizer, None, args.tokens).ids,
    }
    base = {name: perplexity(model, ids, 1024) for name, ids in texts.items()}
    print("base ppl " + ", ".join(f"{name} {value:.2f}" for name, value in base.items()), flush=True)
    rows = []
    for units in args.plan or PLANS:
        today = build_plan(units.split(), config.num_hidden_layers, **ModelShape.from_config(config).head_groups)
        for anchoring, plan in (("last unshared", today), ("nearest", nearest_anchors(today))):
            started = time.perf_counter()
            ppl = {name: perplexity(model, ids, 1024, plan) for name, ids in texts.items()}
            row = {"plan": units, "anchoring": anchoring, "anchors": dict(sorted(plan.anchors.items())), "ppl": ppl,
                   "penalty": {name: ppl[name] / base[name] - 1 for name in texts}, "seconds": time.perf_counter() - started}
            rows.append(row)
            cells = "  ".join(f"{name} {ppl[name]:.2f} ({row['penalty'][name]:+.1%})" for name in texts)
            print(f"{units} | {anchoring:>13} {row['anchors']}: {cells}", flush=True)
    if args.json:
        write_json_atomic(args.json, {"base": base, "rows": rows})


if __name__ == "__main__":
    main()
