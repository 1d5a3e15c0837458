"""How long must the blocks of a penalty's interval be? Its standard error by block length.

    python -m sa_export.benchmarks.interval_blocks [--span 26-29] [--tokens 16384] [--blocks 32,64,128,256,512,1023]

The batch-means interval (``accuracy.intervals``) holds if block means are nearly
independent. Blocks too short for the passages over which the SA model's extra loss
moves together give too small an error; long enough, the error stops growing with the
block. For a plan with identity maps, on the default news text and on gensim's
Wikipedia articles, this prints the penalty and, for each block length, the number of
blocks, the standard error of the mean loss difference, and the interval's half-width
(Student's t) in log-perplexity.
"""

from __future__ import annotations

import argparse
import math

from sa_export.accuracy.evaluate import load_for_reference, token_nlls
from sa_export.accuracy.intervals import block_error, half_width
from sa_export.accuracy.texts import split_texts, unseen_domain_tokens
from sa_export.core.plan import build_plan

WINDOW = 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--span", default="26-29")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens of each text")
    parser.add_argument("--blocks", default="32,64,128,256,512,1023", help="block lengths, comma-separated")
    args = parser.parse_args()
    try:
        lengths = [int(n) for n in args.blocks.split(",")]
    except ValueError:
        parser.error(f"--blocks takes comma-separated numbers of tokens, not {args.blocks!r}")
    if any(n < 1 or args.tokens // n < 2 for n in lengths):
        parser.error("every block length must be at least 1 and leave two blocks of --tokens")
    _, config, model, tokenizer = load_for_reference(args.model)
    news, _ = split_texts(tokenizer, None, None, args.tokens, 1024)
    texts = {"news": news.ids, "wiki": unseen_domain_tokens(tokenizer, None, args.tokens).ids}
    plan = build_plan([args.span], config.num_hidden_layers)
    for name, ids in texts.items():
        differences = (token_nlls(model, ids, WINDOW, plan) - token_nlls(model, ids, WINDOW)).double().numpy()
        print(f"{name}: {differences.size} tokens, {args.span} identity penalty {100 * math.expm1(differences.mean()):+.1f}%", flush=True)
        for length in lengths:
            blocks, error = block_error(differences, length)
            print(f"  blocks of {length:>5}: {blocks:>4}, standard error {error:.5f}, 95% half-width {half_width(blocks, error):.5f}", flush=True)


if __name__ == "__main__":
    main()
