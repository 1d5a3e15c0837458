"""The names the command line offers (head-map modes, exporters, fit steps), kept apart from
the modules that implement them, so that `sa-export --help` and option parsing load
neither torch nor transformers (seconds) and a Ctrl-C before the work starts meets the
command's own handler."""

from __future__ import annotations

HEAD_MAP_MODES = ("identity", "argmax", "argmax-any", "mix", "mix-anchor", "mix-few", "calibrated", "fit")
# Chosen through the model, not from these statistics alone: fit by distillation
# (distill.py, from FIT_START's maps), argmax-out by each head's output error (output_maps.py).
FITTED_MODES = ("fit", "argmax-out")
# What `--head-map calibrated` means: one anchor head per shared head. Mixtures are more
# accurate but cost more at prefill, where the GQA graph recomputes each shared head from
# its source's queries and keys: a mixture of k heads is k attentions, or stored
# probabilities that outgrow the unshared graph's memory (README, "Head maps").
CALIBRATED_DEFAULT = "argmax"

FIT_STEPS = 60
FIT_STEPS_WITH_CORRECTIONS = 120  # the corrections' held-out divergence still falls well past 60 steps (README, heal)

EXPORTER_NAMES = ("dynamo", "genai")  # sa_export.export.EXPORTERS, by name
DEFAULT_EXPORTER = "dynamo"  # the graph family every target takes (and of manifests that name no exporter)
AUTO = "auto"  # convert's default: the fastest graph the target and model allow
REMOVED_EXPORTERS = {
    "optimum": "optimum-onnx (newest release 0.1.0) requires transformers<4.58 and cannot read checkpoints saved by "
    "transformers 5; use the default --exporter dynamo (the same decomposed graph family)",
}
