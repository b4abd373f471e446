"""models.py: offline SmolLM2 conversion and loading, random init, RoPE scaling, clear offline errors."""
from __future__ import annotations

import os

import pytest
import torch

from longalign_lib.io import LongAlignError
from longalign_lib.models import (
    apply_rope_scaling,
    auto_dtype,
    convert_bundled,
    load_model_and_tokenizer,
    longalign_home,
    resolve,
)


def test_bundled_model_is_a_plain_local_checkpoint():
    path = convert_bundled()
    assert path == longalign_home() / "models" / "smollm2-135m-instruct"
    assert (path / "config.json").exists() and list(path.glob("*.safetensors"))
    mtime = os.path.getmtime(path / "config.json")
    assert convert_bundled() == path and os.path.getmtime(path / "config.json") == mtime  # converted once
    assert resolve("smollm2-135m-instruct") == str(path)


def test_loaded_model_generates_through_chat_template(smol_model_and_tokenizer):
    from longalign_lib.generate import generate_reply

    model, tok = smol_model_and_tokenizer
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert "<|im_start|>" in tok.chat_template
    reply = generate_reply(model, tok, [{"role": "user", "content": "What is 2 + 2? Answer with a number."}],
                           max_new_tokens=12)
    assert "4" in reply


def test_local_path_loads_same_weights(smol_model_and_tokenizer):
    model, _ = smol_model_and_tokenizer
    m2, _ = load_model_and_tokenizer(str(convert_bundled()), dtype="fp32", device="cpu")
    assert torch.equal(model.model.embed_tokens.weight, m2.model.embed_tokens.weight)


def test_random_init_has_same_shape_different_weights(smol_model_and_tokenizer):
    model, _ = smol_model_and_tokenizer
    torch.manual_seed(0)
    rnd, _ = load_model_and_tokenizer("random:smollm2-135m-instruct", dtype="fp32", device="cpu")
    assert rnd.model.embed_tokens.weight.shape == model.model.embed_tokens.weight.shape
    assert not torch.equal(rnd.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def test_rope_base_scaling_and_window(smol_model_and_tokenizer):
    model, _ = smol_model_and_tokenizer
    import copy

    cfg = copy.deepcopy(model.config)
    base = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or cfg.rope_theta
    new = apply_rope_scaling(cfg, 200.0, 65536)
    assert new == pytest.approx(base * 200) and cfg.max_position_embeddings == 65536
    m, _ = load_model_and_tokenizer("random:smollm2-135m-instruct", dtype="fp32", device="cpu",
                                    rope_base_factor=8.0, max_position_embeddings=16384)
    theta = (getattr(m.config, "rope_parameters", None) or {}).get("rope_theta") or m.config.rope_theta
    assert theta == pytest.approx(base * 8) and m.config.max_position_embeddings == 16384
    # the rotary embedding really uses the new base: inverse frequencies shrink
    inv = m.model.rotary_emb.inv_freq
    assert inv[1].item() == pytest.approx((base * 8) ** (-2 / (m.config.head_dim)), rel=1e-4)


def test_unreachable_hub_id_says_how_to_use_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LongAlignError, match="model.name=DIR"):
        load_model_and_tokenizer("no-such-org/no-such-model-xyz", device="cpu")


def test_dtype_choice():
    assert auto_dtype("auto", "cpu") == torch.float32
    assert auto_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(LongAlignError):
        auto_dtype("int3", "cpu")


def test_converted_bundled_model_ends_turns_with_im_end():
    """The saved tokenizer and generation config say what the official SmolLM2 tokenizer_config says, so a chat
    turn ends with the eos token and generation stops there (transformers 5.17 read another eos from GGUF)."""
    from transformers import AutoTokenizer, GenerationConfig

    path = convert_bundled()
    tok = AutoTokenizer.from_pretrained(path)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == tok.pad_token_id == im_end != tok.convert_tokens_to_ids("<|endoftext|>")
    gen = GenerationConfig.from_pretrained(path)
    assert gen.eos_token_id == gen.pad_token_id == im_end
    full = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                   tokenize=False)
    start = full.index("Hello")
    assert full[start:full.index(tok.eos_token, start)] == "Hello"


def test_set_special_tokens_repairs_a_wrong_eos(tmp_path):
    from transformers import AutoTokenizer

    from longalign_lib.models import BUNDLED, set_special_tokens

    tok = AutoTokenizer.from_pretrained(convert_bundled())
    tok.eos_token = tok.pad_token = "<|endoftext|>"  # what a GGUF read may give
    assert tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert set_special_tokens(tok, BUNDLED["smollm2-135m-instruct"].special_tokens) is tok
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == tok.pad_token_id == im_end
    assert tok.bos_token_id == tok.convert_tokens_to_ids("<|im_start|>")
    tok.save_pretrained(tmp_path)  # as convert_bundled saves it
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.eos_token_id == again.pad_token_id == im_end and again.unk_token == "<|endoftext|>"
    with pytest.raises(LongAlignError, match="not in the tokenizer's vocabulary"):
        set_special_tokens(tok, {"eos": "<|no_such_token|>"})
    with pytest.raises(LongAlignError, match="choose bos, eos, pad or unk"):
        set_special_tokens(tok, {"sep": "<|im_end|>"})
