"""A config the installed transformers would not honour in full is refused; what it migrates is taken."""

import json
import shutil

import pytest

from sa_export.hf.config_guard import unknown_config_keys
from tests.conftest import TINY_ARCHITECTURES, _tiny_config
from tests.helpers import leftovers, run_cli


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_a_config_saved_by_the_installed_release_has_no_unknown_keys(arch, tmp_path):
    _tiny_config(arch).save_pretrained(tmp_path)
    assert unknown_config_keys(json.loads((tmp_path / "config.json").read_text())) == []


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_an_invented_key_is_named(arch, tmp_path):
    _tiny_config(arch).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(attn_logit_temperature=0.5, transformers_version="6.1.0")
    assert unknown_config_keys(raw) == ["attn_logit_temperature"]


def test_keys_an_older_release_wrote_are_migrated_not_refused():
    """transformers 4.x wrote rope_theta and rope_scaling at the top level; 5.x moves them into rope_parameters."""
    from transformers import LlamaConfig

    raw = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000.0,
        "rope_scaling": None, "torch_dtype": "bfloat16", "pretraining_tp": 1, "transformers_version": "4.40.1",
        "is_llama_config": True, "rope_interleaved": False,  # inert tags of the nanotron trainer (SmolLM2)
    }
    assert unknown_config_keys(raw) == []
    assert LlamaConfig.from_dict(raw).rope_parameters["rope_theta"] == 100000.0


def test_gpt_neox_rope_theta_that_differs_from_rotary_emb_base_is_refused():
    """5.x reads GPT-NeoX's RoPE base from rotary_emb_base: a different rope_theta would be ignored."""
    raw = {"model_type": "gpt_neox", "rotary_emb_base": 10000, "rope_theta": 10000}
    assert unknown_config_keys(raw) == []
    assert unknown_config_keys({**raw, "rope_theta": 500000}) == ["rope_theta"]


@pytest.fixture(scope="module")
def newer_model(tiny_models, tmp_path_factory):
    path = tmp_path_factory.mktemp("newer") / "llama"
    shutil.copytree(tiny_models["llama"], path)
    raw = json.loads((path / "config.json").read_text())
    raw.update(attn_logit_temperature=0.5, transformers_version="6.1.0")
    (path / "config.json").write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("command", ["convert", "eval", "analyze"])
def test_commands_refuse_a_config_with_unknown_keys_and_write_nothing(command, newer_model, tmp_path):
    out = tmp_path / "out"
    args = {"convert": ["--span", "3-4", "-o", out], "eval": ["--span", "3-4"], "analyze": ["-o", out]}[command]
    result = run_cli(command, newer_model, *args)
    assert result.exit_code == 2, result.output + result.stderr
    assert "attn_logit_temperature" in result.stderr and "6.1.0" in result.stderr and "--accept-unknown-config-keys" in result.stderr
    assert result.stderr.count("\n") == 1
    assert leftovers(out) == []


def test_accepting_unknown_keys_converts_and_the_manifest_says_so(newer_model, tmp_path):
    out = tmp_path / "out"
    result = run_cli("convert", newer_model, "--span", "3-4", "-o", out, "--accept-unknown-config-keys")
    assert result.exit_code == 0, result.output + result.stderr
    source = json.loads((out / "sa_manifest.json").read_text())["source"]
    assert source["saved_by_transformers"] == "6.1.0"
    assert source["accepted_unknown_config_keys"] == ["attn_logit_temperature"]
    assert run_cli("check", out, "--decode-steps", "2").exit_code == 0  # the acceptance is recorded


def test_manifest_records_both_transformers_releases(converted_tiny_llama):
    import transformers

    manifest = json.loads((converted_tiny_llama / "sa_manifest.json").read_text())
    assert manifest["tool"]["transformers"] == transformers.__version__
    assert manifest["source"]["saved_by_transformers"] == transformers.__version__
    assert manifest["source"]["accepted_unknown_config_keys"] == []
