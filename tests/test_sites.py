from __future__ import annotations

import pytest
import torch

from emocircuits import sites
from emocircuits.prompts import tokenize


def _cache(model, names):
    b = tokenize(model, ["The quick brown fox jumps over the lazy dog.", "Hi."])
    with torch.no_grad():
        _, cache = model.run_with_cache(b.tokens, attention_mask=b.attention_mask,
                                        names_filter=names)
    return cache


@pytest.mark.parametrize("layer", [0, 2])
def test_site_identities(tiny, layer):
    h = {s: sites.hook_name(tiny, s, layer) for s in
         ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "mlp_post",
          "attn_o_out", "mlp_down_out")}
    c = _cache(tiny, list(h.values()))
    # resid_mid = resid_pre + attn_out ; resid_post = resid_mid + mlp_out
    assert torch.allclose(c[h["resid_mid"]], c[h["resid_pre"]] + c[h["attn_out"]], atol=1e-5)
    assert torch.allclose(c[h["resid_post"]], c[h["resid_mid"]] + c[h["mlp_out"]], atol=1e-5)
    # heads' results sum to the attention output (pre post-norm on Gemma)
    res = sites.head_result_from_z(tiny, layer, c[h["z"]]).sum(-2)
    b_O = tiny.blocks[layer].attn.b_O
    if b_O is not None:
        res = res + b_O
    assert torch.allclose(res, c[h["attn_o_out"]], atol=1e-5)
    # neuron activations @ W_out = MLP output (pre post-norm on Gemma)
    out = c[h["mlp_post"]] @ sites.W_out(tiny, layer)
    assert torch.allclose(out, c[h["mlp_down_out"]], atol=1e-5)


def test_llama_attn_out_is_head_sum(tiny_llama):
    h = sites.hook_name(tiny_llama, "attn_out", 1)
    z = sites.hook_name(tiny_llama, "z", 1)
    c = _cache(tiny_llama, [h, z])
    assert torch.allclose(sites.head_result_from_z(tiny_llama, 1, c[z]).sum(-2), c[h], atol=1e-5)


def test_final_norm_equals_hf_last_hidden(tiny):
    b = tokenize(tiny, ["Some words here."])
    with torch.no_grad():
        _, c = tiny.run_with_cache(b.tokens, names_filter=[sites.hook_name(tiny, "final_norm")])
        hs = tiny.original_model(b.tokens, output_hidden_states=True).hidden_states
    assert torch.allclose(c["ln_final.hook_out"], hs[-1], atol=1e-5)


def test_bad_site_and_layer(tiny_llama):
    with pytest.raises(KeyError, match="unknown site 'resid_middle'"):
        sites.hook_name(tiny_llama, "resid_middle", 0)
    with pytest.raises(IndexError, match="out of range: the model has 3 layers"):
        sites.hook_name(tiny_llama, "resid_post", 7)
    with pytest.raises(ValueError, match="pass a layer"):
        sites.hook_name(tiny_llama, "resid_post")
