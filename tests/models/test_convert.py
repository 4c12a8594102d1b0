"""T2R conversion of tiny, randomly initialized Llama and Mistral models built here (no download):
every source weight is found unchanged, exactly the GSA gate and norm are new, the converted model
runs, keeping every layer as attention reproduces the source, and the command line works."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import assert_rel
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from fla_gsa.models import GSAForCausalLM, convert_from_llama
from fla_gsa.models.convert import gate_bias_init


def tiny_llama(tie=False, bias=False, cls=LlamaForCausalLM, cfg_cls=LlamaConfig, **kw):
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=tie, rms_norm_eps=1e-5,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, **kw)
    if bias:
        cfg.attention_bias = True
        cfg.mlp_bias = True
    model = cls(cfg).eval()
    with torch.no_grad():  # norms away from ones, so a norm left at its init would show
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def check_weights_carried(llama, gsa, report):
    src = llama.state_dict()
    params = dict(gsa.named_parameters())
    used = set(report.copied.values())
    for name, t in src.items():
        if name == "lm_head.weight" and gsa.config.tie_word_embeddings:
            assert torch.equal(gsa.lm_head.weight, t)
            continue
        assert name in used, f"source weight {name} was not carried over"
    for target, source in report.copied.items():
        assert torch.equal(params[target], src[source]), f"{target} differs from {source}"
    n = gsa.config.num_hidden_layers
    expected_new = sorted(f"model.layers.{i}.attn.{p}" for i in range(n)
                          for p in ("f_proj.weight", "f_proj.bias", "g_norm.weight"))
    assert sorted(report.new) == expected_new
    for i in range(n):
        attn = gsa.model.layers[i].attn
        assert torch.equal(attn.g_norm.weight, torch.ones_like(attn.g_norm.weight))
        assert torch.equal(attn.f_proj.weight, torch.zeros_like(attn.f_proj.weight))
        assert attn.num_kv_heads == 2 and attn.head_dim == 16 and attn.num_slots == gsa.config.num_slots
        assert attn.scale == 16 ** -0.5  # the pretrained queries and keys keep their attention scale


@pytest.mark.parametrize("tie,bias", [(False, False), (True, False), (False, True)])
def test_every_llama_weight_is_carried_over(tie, bias):
    llama = tiny_llama(tie=tie, bias=bias)
    gsa, report = convert_from_llama(llama, num_slots=8, return_report=True)
    assert isinstance(gsa, GSAForCausalLM) and gsa.config.layer_types == ["gsa"] * 3
    assert (gsa.lm_head.weight is gsa.model.embeddings.weight) == tie
    check_weights_carried(llama, gsa, report)
    # the source is left as it was (tensors were copied)
    assert gsa.model.embeddings.weight.data_ptr() != llama.model.embed_tokens.weight.data_ptr()


def test_initial_gates_span_the_decay_range():
    b = gate_bias_init(16, 8.0, (0.9, 0.999))
    alpha = torch.sigmoid(b) ** (1 / 8)
    assert_rel("fastest", alpha[:1], torch.tensor([0.9], dtype=torch.float64), 1e-9)
    assert_rel("slowest", alpha[-1:], torch.tensor([0.999], dtype=torch.float64), 1e-9)
    assert (alpha.diff() > 0).all()
    llama = tiny_llama()
    gsa = convert_from_llama(llama, num_slots=16, gate_logit_normalizer=8.0)
    bias = gsa.model.layers[0].attn.f_proj.bias.detach().view(2, 16)
    assert_rel("bias per head", bias, b.float().expand(2, 16), 1e-6)


def test_converted_model_runs_and_generates():
    llama = tiny_llama()
    gsa = convert_from_llama(llama, num_slots=8)
    x = torch.randint(3, 101, (2, 21))
    with torch.no_grad():
        full = gsa(x).logits
        out = gsa(x[:, :15], use_cache=True)
        steps = [out.logits] + [gsa(x[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True).logits
                                for t in range(15, 21)]
    assert torch.isfinite(full).all()
    assert_rel("decode", torch.cat(steps, 1), full, 1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(gsa.generate(x, **kw), gsa.generate(x, use_cache=False, **kw))
    gsa.train()
    gsa(x, labels=x).loss.backward()
    assert gsa.model.layers[0].attn.f_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("source", ["llama", "mistral", "qwen2"])
def test_all_attention_conversion_reproduces_the_source(source):
    """Keeping every layer as softmax attention must give the source model back: this checks the name
    mapping, the norms, GQA, head_dim, RoPE (convention and theta) and the MLP in one go."""
    if source == "llama":
        llama = tiny_llama(rope_theta=50000.0)
    elif source == "mistral":
        llama = tiny_llama(cls=MistralForCausalLM, cfg_cls=MistralConfig, sliding_window=None)
    else:  # biases on q/k/v but not on o: o_proj gets a new zero bias
        llama = tiny_llama(cls=Qwen2ForCausalLM, cfg_cls=Qwen2Config)
    gsa, report = convert_from_llama(llama, num_slots=8, layer_types=["attention"] * 3, return_report=True)
    assert report.new == ([f"model.layers.{i}.attn.o_proj.bias" for i in range(3)] if source == "qwen2" else [])
    x = torch.randint(3, 101, (2, 19))
    mask = torch.ones_like(x)
    mask[1, :6] = 0
    with torch.no_grad():
        assert_rel("logits", gsa(x).logits, llama(x).logits, 1e-5)
        ref = llama(x, attention_mask=mask).logits
        got = gsa(x, attention_mask=mask).logits
    assert_rel("logits, padded row", got[1, 6:], ref[1, 6:], 1e-5)


def test_hybrid_conversion():
    llama = tiny_llama()
    gsa, report = convert_from_llama(llama, num_slots=8, layer_types=["gsa", "attention", "gsa"], return_report=True)
    assert len(report.new) == 6 and not any(".layers.1." in n for n in report.new)
    with pytest.raises(ValueError, match="layer_types"):
        convert_from_llama(llama, layer_types=["gla", "gsa", "gsa"])


def test_cli_converts_a_saved_llama(tmp_path):
    llama = tiny_llama(tie=True)
    src, dst = tmp_path / "llama", tmp_path / "gsa"
    llama.save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-m", "fla_gsa.models.convert", str(src), str(dst), "--num-slots", "8"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "new (9)" in res.stdout and "f_proj" in res.stdout
    assert (dst / "tokenizer_config.json").exists()
    import fla_gsa  # noqa: F401
    gsa = AutoModelForCausalLM.from_pretrained(dst)
    assert type(gsa) is GSAForCausalLM and gsa.config.num_slots == 8
    src_state = llama.state_dict()
    assert torch.equal(gsa.model.embeddings.weight, src_state["model.embed_tokens.weight"])
    assert torch.equal(gsa.model.layers[2].attn.k_proj.weight, src_state["model.layers.2.self_attn.k_proj.weight"])
    assert torch.equal(gsa.model.layers[1].mlp.down_proj.weight, src_state["model.layers.1.mlp.down_proj.weight"])
    with torch.no_grad():
        assert torch.isfinite(gsa(torch.randint(3, 101, (1, 9))).logits).all()
