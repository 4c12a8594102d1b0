"""The Hugging Face models: hybrid ``layer_types``, cached decoding equals the full forward, ``generate()``
with and without the cache, save/load through the Auto classes, the fused loss, gradient
checkpointing, and registration next to flash-linear-attention's model types."""
from __future__ import annotations

import doctest
import importlib
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_rel
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import fla_gsa  # noqa: F401  (registers the Auto classes)
from fla_gsa.layers import ABCAttention, Attention, Cache, GatedLinearAttention, GatedSlotAttention
from fla_gsa.models import (ABCConfig, ABCForCausalLM, GLAConfig, GLAForCausalLM, GSAConfig, GSAForCausalLM,
                            GSAModel, TransformerConfig, TransformerForCausalLM)

V = 97
HYBRID = ["gsa", "gla", "abc", "attention"]
CONFIGS = {
    "gsa": GSAConfig,
    "gla": GLAConfig,
    "abc": ABCConfig,
    "transformer": TransformerConfig,
    "hybrid": GSAConfig,
}


def tiny_config(name="hybrid", **kw):
    fields = dict(vocab_size=V, hidden_size=32, num_hidden_layers=4 if name == "hybrid" else 2, num_heads=4,
                  num_kv_heads=2, num_slots=6, intermediate_size=48, initializer_range=0.3, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if name == "hybrid":
        fields["layer_types"] = HYBRID
    fields.update(kw)
    return CONFIGS[name](**fields)


def tiny_model(name="hybrid", **kw):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(name, **kw)).to(DEVICE).eval()


def tokens(B, T, low=3):
    return torch.randint(low, V, (B, T), device=DEVICE)


def test_hybrid_builds_every_kind_and_registers():
    model = tiny_model()
    assert isinstance(model, GSAForCausalLM)
    kinds = [type(block.attn) for block in model.model.layers]
    assert kinds == [GatedSlotAttention, GatedLinearAttention, ABCAttention, Attention]
    x = tokens(2, 11)
    out = model(x)
    assert out.logits.shape == (2, 11, V) and out.loss is None
    assert isinstance(out.past_key_values, Cache) and out.past_key_values.get_seq_length() == 11
    hs = model(x, output_hidden_states=True).hidden_states
    assert len(hs) == 5 and hs[0].shape == (2, 11, 32)
    # the same numbers from inputs_embeds
    emb = model.get_input_embeddings()(x)
    assert_rel("inputs_embeds", model(inputs_embeds=emb).logits, out.logits, 1e-6)
    assert isinstance(AutoModel.from_config(model.config), GSAModel)


@pytest.mark.parametrize("name,cls", [("gsa", GSAForCausalLM), ("gla", GLAForCausalLM), ("abc", ABCForCausalLM),
                                      ("transformer", TransformerForCausalLM)])
def test_each_model_type(name, cls):
    cfg = tiny_config(name)
    assert cfg.model_type == f"fla_gsa.{name}"
    assert cfg.layer_types == [{"transformer": "attention"}.get(name, name)] * 2
    assert isinstance(AutoModelForCausalLM.from_config(cfg), cls)
    assert isinstance(AutoConfig.for_model(cfg.model_type), type(cfg))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decode_equals_full_forward(name):
    model = tiny_model(name)
    x = tokens(2, 70)  # the prefill crosses a chunk boundary
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :66], use_cache=True)
        cache, logits = out.past_key_values, [out.logits]
        for t in range(66, 70):
            out = model(x[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits)
    assert_rel(f"{name} logits", torch.cat(logits, 1), full, 1e-4)
    assert cache.get_seq_length() == 70


def test_cached_decode_with_left_padding():
    model = tiny_model()
    x = tokens(2, 24)
    mask = torch.ones_like(x)
    mask[1, :9] = 0
    x[1, :9] = 0
    with torch.no_grad():
        out = model(x[:, :20], attention_mask=mask[:, :20], use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for t in range(20, 24):
            out = model(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
        logits = torch.cat(logits, 1)
        assert_rel("padded row", logits[1, 9:], model(x[1:, 9:]).logits[0], 1e-4)
        assert_rel("full row", logits[0], model(x[:1]).logits[0], 1e-4)


@pytest.mark.parametrize("name", ["hybrid", "gsa", "abc"])
def test_generate_greedy_with_and_without_cache(name):
    model = tiny_model(name)
    x = tokens(2, 13)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached = model.generate(x, attention_mask=torch.ones_like(x), **kw)
        uncached = model.generate(x, attention_mask=torch.ones_like(x), use_cache=False, **kw)
    assert cached.shape == (2, 21)
    assert torch.equal(cached, uncached)
    assert len(set(cached[:, 13:].flatten().tolist())) > 1  # not a degenerate model


def test_generate_left_padded_batch():
    model = tiny_model()
    a, b = tokens(1, 12), tokens(1, 7)
    x = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long, device=DEVICE), b], 1)])
    mask = (torch.arange(12, device=DEVICE)[None] >= torch.tensor([[0], [5]], device=DEVICE)).long()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = model.generate(x, attention_mask=mask, **kw)
        nocache = model.generate(x, attention_mask=mask, use_cache=False, **kw)
        alone = [model.generate(s, attention_mask=torch.ones_like(s), **kw) for s in (a, b)]
    assert torch.equal(batch, nocache)

    def same(row, single):
        # a row that ended early (EOS) alone is padded with pad_token_id in the batch
        n = single.shape[0]
        return torch.equal(row[:n], single) and bool((row[n:] == 0).all())

    assert same(batch[0], alone[0][0])
    assert same(batch[1, 5:], alone[1][0])


def test_beam_search_with_and_without_cache():
    model = tiny_model()
    x = tokens(1, 9)
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=3, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached = model.generate(x, attention_mask=torch.ones_like(x), **kw)
        uncached = model.generate(x, attention_mask=torch.ones_like(x), use_cache=False, **kw)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip(tmp_path, tie):
    model = tiny_model(tie_word_embeddings=tie)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "fla_gsa.gsa" and saved["layer_types"] == HYBRID
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).to(DEVICE).eval()
    assert type(loaded) is GSAForCausalLM and loaded.config.layer_types == HYBRID
    assert (loaded.lm_head.weight is loaded.model.embeddings.weight) == tie
    x = tokens(2, 17)
    with torch.no_grad():
        assert_rel("reloaded logits", loaded(x).logits, model(x).logits, 1e-6)
    assert AutoConfig.from_pretrained(tmp_path).to_dict()["layer_types"] == HYBRID


def test_loss_equals_cross_entropy_on_logits():
    model = tiny_model().train()
    x = tokens(2, 19)
    labels = x.clone()
    labels[0, :4] = -100
    out = model(x, labels=labels)
    assert out.logits is None  # the fused loss never forms them
    logits = model(x).logits
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert_rel("loss", out.loss, ref, 1e-5)
    # gradients agree with the unfused path
    out.loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref.backward()
    for n, p in model.named_parameters():
        assert_rel(f"grad {n}", fused[n], p.grad, 1e-4)
    both = model(x, labels=labels, return_logits=True)
    assert_rel("logits on request", both.logits, logits, 1e-6)
    n = int((labels[:, 1:] != -100).sum())
    summed = model(x, labels=labels, num_items_in_batch=2 * n).loss  # the Trainer's token count
    assert_rel("loss / num_items_in_batch", summed, ref / 2, 1e-5)
    model.config.fuse_linear_cross_entropy = False
    assert_rel("unfused loss", model(x, labels=labels).loss, ref, 1e-6)
    assert_rel("unfused, num_items_in_batch", model(x, labels=labels, num_items_in_batch=2 * n).loss, ref / 2, 1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_bad_labels_raise_before_the_loss(fused):
    # the label check (begun before the layers) names the bad label, with the fused loss or the logits
    model = tiny_model(fuse_linear_cross_entropy=fused).train()
    x = tokens(2, 9)
    labels = x.clone()
    labels[1, 5] = V
    with pytest.raises(ValueError, match=f"labels must be in \\[0, {V}\\) or equal ignore_index=-100, got {V}"):
        model(x, labels=labels)
    labels[1, 5] = -7
    with pytest.raises(ValueError, match="got -7"):
        model(x, labels=labels)
    labels[1, 5], labels[0, 0] = 4, V  # the first label is never a target
    assert torch.isfinite(model(x, labels=labels).loss)
    labels[1, 5] = -100  # ignored
    assert torch.isfinite(model(x, labels=labels).loss)


def test_logits_to_keep_and_tuple_output():
    model = tiny_model()
    x = tokens(2, 9)
    with torch.no_grad():
        full = model(x).logits
        assert_rel("last", model(x, logits_to_keep=1).logits, full[:, -1:], 1e-6)
        out = model(x, return_dict=False, use_cache=False)
    assert isinstance(out, tuple)
    assert_rel("tuple logits", out[0], full, 1e-6)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_same_gradients(reentrant):
    model = tiny_model().train()
    x = tokens(2, 23)
    model(x, labels=x).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers 5.23 renames it activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert all(block.gradient_checkpointing for block in model.model.layers)
    model(x, labels=x).loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        assert_rel(f"grad {n}", p.grad, ref[n], 1e-5)


def test_autocast_training_step():
    # bf16 autocast over fp32 weights, as bench_training runs: the residual stream stays fp32 beside
    # the blocks, the final norm hands the fused loss bf16 hidden states with the fp32 head weight.
    # Same loss and gradients as the unfused head (logits, then cross entropy) under the same autocast.
    results = []
    for fused in (True, False):
        model = tiny_model(fuse_linear_cross_entropy=fused).train()
        x = tokens(2, 19)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = model(x, labels=x).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (ref_loss, ref_grads) = results
    assert torch.isfinite(loss)
    assert_rel("loss", loss.float(), ref_loss.float(), 1e-2)
    for n, g in grads.items():
        assert g.dtype == torch.float32, n
        assert_rel(f"grad {n}", g, ref_grads[n], 5e-2)


def test_training_mode_does_not_build_a_cache():
    model = tiny_model().train()
    assert model(tokens(1, 5)).past_key_values is None


def test_config_validation():
    with pytest.raises(ValueError, match="layer_types"):
        GSAConfig(num_hidden_layers=2, layer_types=["gsa", "mamba"])
    with pytest.raises(ValueError, match="one entry per layer"):
        GSAConfig(num_hidden_layers=3, layer_types=["gsa", "gla"])
    with pytest.raises(ValueError, match="attn_mode"):
        GSAConfig(attn_mode="parallel")
    with pytest.raises(ValueError, match="checkpoint_level must be 0 or 1, got 2"):
        GSAConfig(checkpoint_level=2)
    cfg = GSAConfig(num_hidden_layers=2, layer_types=["gsa", "full_attention"])
    assert cfg.layer_types == ["gsa", "attention"]
    model = tiny_model()
    with pytest.raises(TypeError, match="Cache"):
        model(tokens(1, 3), past_key_values=((None, None),))
    with pytest.raises(ValueError, match="attention_mask"):
        model(tokens(1, 3), attention_mask=torch.ones(1, 1, 3, 3, device=DEVICE))


def test_no_collision_with_flash_linear_attention_names():
    """With fla's model types ("gsa", "gla", "abc", "transformer") already registered, as when fla is
    imported first, `import fla_gsa` still registers its own and they load."""
    code = """
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
for name in ("gsa", "gla", "abc", "transformer"):
    cls = type(name.upper() + "FakeConfig", (PretrainedConfig,), {"model_type": name})
    AutoConfig.register(name, cls, exist_ok=True)
import fla_gsa
for name in ("gsa", "gla", "abc", "transformer"):
    assert AutoConfig.for_model(name).__class__.__module__ == "__main__"
    cfg = AutoConfig.for_model("fla_gsa." + name, vocab_size=50, hidden_size=16, num_hidden_layers=1, num_heads=2, num_slots=4)
    model = AutoModelForCausalLM.from_config(cfg)
    assert type(model).__module__ == "fla_gsa.models.modeling", type(model)
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize("name", ["configuration", "modeling"])
def test_docstring_examples(name):
    module = importlib.import_module(f"fla_gsa.models.{name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
