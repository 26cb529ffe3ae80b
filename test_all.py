"""
Every test of the project, one file: `python -m pytest -q test_all.py`.

Tiny random models on CPU, checked against independent oracles: transformers (LlavaForConditionalGeneration,
CLIPImageProcessor, logits warpers), PEFT (LoRA), sentencepiece (the tokenizer conversion), LLaVA-Med's metric
definitions worked by hand, a fake OpenAI-compatible server on 127.0.0.1, and formulas computed another way.
Sections follow the files: model, checkpoint, lora, data, synth, train and sft, dpo, judge, selector,
evaluate, bench, then the README and the import rules.
"""
import ast
import base64
import copy
import html.parser
import io
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, fields, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import peft
import pytest
import requests
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.tensor import DTensor

import bench
import checkpoint as C
import data as D
import dpo
import evaluate as E
import judge
import lora as L
import metrics as MET
import model as M
import report as R


import runs
import selector as SEL
import sft
import synth as SY
import train as T
from data import ALIGN_BRIEF, ALIGN_DETAILED, caption_to_alignment
from lora import LoRALinear


# ----------------------------------------------------------------------------- model.py

def tiny_hf_llava(theta=500000.0, kv_heads=2, vocab=120, image_token_id=119, tie=False, seed=0):
    """A random-weight transformers LlavaForConditionalGeneration with GQA and rope theta != 10000."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=28, patch_size=7, projection_dim=16)
    tc = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=kv_heads, vocab_size=vocab, rope_theta=theta,
                     tie_word_embeddings=tie, max_position_embeddings=256)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=image_token_id, image_seq_length=16,
                      vision_feature_layer=-2, tie_word_embeddings=tie)
    hf = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # make every weight non-trivial (norms and biases start at 1/0)
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


def padded_batch(image_token_id=119, L=16, vocab=118, seed=1):
    """Two rows, left-padded: [pad, pad, t, <image>*16, t, t, t] and [t, <image>*16, t x 5]."""
    g = torch.Generator().manual_seed(seed)

    def r(n):
        return torch.randint(3, vocab, (n,), generator=g)
    img = torch.full((L,), image_token_id)
    row0 = torch.cat([torch.zeros(2, dtype=torch.long), r(1), img, r(3)])
    row1 = torch.cat([r(1), img, r(5)])
    ids = torch.stack([row0, row1])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    pixels = torch.randn(2, 3, 28, 28, generator=g)
    return ids, mask, pixels


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    hf = tiny_hf_llava()
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(d)
    ours = C.from_pretrained(str(d), dtype=torch.float32)
    return hf, ours, d


def hf_logits(hf, ids, mask, pixels):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=pos).logits


def test_logits_match_transformers_llava_hf_layout(hf_and_ours):
    hf, ours, _ = hf_and_ours
    assert ours.config.text.num_kv_heads == 2 and ours.config.text.rope_theta == 500000.0
    ids, mask, pixels = padded_batch()
    ref = hf_logits(hf, ids, mask, pixels)
    with torch.no_grad():
        out = ours(ids, pixels, mask)
    valid = mask.bool()
    assert (out[valid] - ref[valid]).abs().max() < 1e-4
    with torch.no_grad():  # text-only forward
        t = torch.randint(3, 118, (2, 7))
        assert (ours(t) - hf(input_ids=t).logits).abs().max() < 1e-4


def test_greedy_generate_matches_transformers(hf_and_ours):
    hf, ours, _ = hf_and_ours
    ids, mask, pixels = padded_batch()
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=12,
                          do_sample=False, eos_token_id=5, pad_token_id=0)[:, ids.shape[1]:]
    out = M.generate(ours, ids, pixels, mask, max_new_tokens=12, eos_token_id=5, pad_token_id=0)
    assert out.shape == ref.shape and torch.equal(out, ref)
    # a row that hits EOS is padded afterwards and stops early when every row is done
    eos = int(out[0, 3])
    out2 = M.generate(ours, ids, pixels, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    for row in out2:
        hits = (row == eos).nonzero()
        if len(hits):
            assert (row[hits[0, 0] + 1:] == 0).all()


def test_kv_cache_decoding_equals_full_forward(hf_and_ours):
    _, ours, _ = hf_and_ours
    ids, mask, pixels = padded_batch()
    cache = ours.new_cache(2, ids.shape[1] + 6)
    with torch.no_grad():
        step_logits = [ours(ids, pixels, mask, cache=cache)[:, -1]]
        seq, m = ids, mask
        for _ in range(5):
            nxt = step_logits[-1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
            step_logits.append(ours(nxt, attention_mask=m, cache=cache)[:, -1])
        full = ours(seq, pixels, m)
    for i, lg in enumerate(step_logits):
        assert (lg - full[:, ids.shape[1] - 1 + i]).abs().max() < 1e-5


def test_static_decode_step_equals_growing_cache(hf_and_ours):
    """generate's decode step (whole-cache mask, tensor slot) gives the logits of the growing-slice path, left
    padding included."""
    _, ours, _ = hf_and_ours
    ids, mask, pixels = padded_batch()
    B, T, n = ids.shape[0], ids.shape[1], 5
    grow, static = ours.new_cache(B, T + n), ours.new_cache(B, T + n)
    with torch.no_grad():
        ours(ids, pixels, mask, cache=grow)
        ours(ids, pixels, mask, cache=static)
        # (B, max_len), as generate builds it
        full_mask = torch.cat([mask, torch.ones(B, n, dtype=mask.dtype)], 1)
        token, m = torch.tensor([7, 9]), mask
        for i in range(n):
            m = torch.cat([m, torch.ones(B, 1, dtype=m.dtype)], 1)
            want = M.mask_image_token(ours(token[:, None], attention_mask=m, cache=grow)[:, -1],
                                      ours.config.image_token_id)
            got = M.decode_one_token(ours, token, torch.tensor([T + i]), full_mask, static)
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=1e-5, rtol=0)  # -inf at the image token
            token = want.argmax(-1)
    assert static.seen == T  # the static path leaves the count to its caller


def test_compiled_generate_equals_eager_and_transformers(hf_and_ours):
    """compile=<backend>: one graph for every decode step (static shapes), and the same greedy tokens as eager
    and HF."""
    hf, ours, _ = hf_and_ours
    ids, mask, pixels = padded_batch()
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=10,
                          do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    graphs = []

    def counting_backend(gm, example_inputs):  # what dynamo hands to a backend: one call per (re)compile
        graphs.append(gm)
        return gm.forward

    eager = M.generate(ours, ids, pixels, mask, max_new_tokens=10)
    compiled = M.generate(ours, ids, pixels, mask, max_new_tokens=10, compile=counting_backend)
    assert torch.equal(eager, ref) and torch.equal(compiled, ref)
    # 9 decode steps, one graph: nothing in the step changes shape or guards on the step
    assert len(graphs) == 1
    again = M.generate(ours, ids[:, 1:], pixels, mask[:, 1:], max_new_tokens=6, compile=counting_backend)
    assert len(graphs) == 1
    assert ours.decode_cache.k[0].shape[2] == ids.shape[1] + 10  # shorter call: cache reused
    assert torch.equal(again, M.generate(ours, ids[:, 1:], pixels, mask[:, 1:], max_new_tokens=6))
    # functionalized in-place writes
    out = M.generate(ours, ids, pixels, mask, max_new_tokens=10, compile="aot_eager")
    assert torch.equal(out, ref)
    del ours.decode_cache


def test_logits_and_generate_match_transformers_without_gqa(tmp_path):
    """num_kv_heads == num_heads (LLaVA-1.5) takes SDPA's enable_gqa=False branch: same logits and greedy
    tokens."""
    hf = tiny_hf_llava(kv_heads=4)
    hf.save_pretrained(tmp_path)
    ours = C.from_pretrained(str(tmp_path), dtype=torch.float32)
    ids, mask, pixels = padded_batch()
    with torch.no_grad():
        out = ours(ids, pixels, mask)
        ref = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=8,
                          do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    assert (out - hf_logits(hf, ids, mask, pixels))[mask.bool()].abs().max() < 1e-4
    assert torch.equal(M.generate(ours, ids, pixels, mask, max_new_tokens=8), ref)


def test_sampling_filter_matches_transformers_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        logits = torch.randn(4, 300, generator=g) * (1 + trial % 4)
        if trial % 5 == 0:
            logits[:, :10] = logits[:, :1]  # ties
        for temp, k, p in [(1.2, 100, 0.95), (0.7, 5, 1.0), (1.0, None, 0.5), (2.0, 300, 0.01),
                           (1.0, 1, 0.9)]:
            ref = TemperatureLogitsWarper(temp)(None, logits.clone())
            if k:
                ref = TopKLogitsWarper(k)(None, ref)
            if p < 1.0:
                ref = TopPLogitsWarper(p)(None, ref)
            ours = M.filter_logits(logits.clone(), temp, k, p)
            assert torch.equal(torch.isinf(ours), torch.isinf(ref))
            assert (torch.isfinite(ours).sum(-1) >= 1).all()


def cluster_by_definition(p, x):
    """SQ-LLaVA's Clustering, computed step by step with loops (one image at a time)."""
    outs = []
    for b in range(x.shape[0]):
        X = x[b]  # (L, D)
        L, D = X.shape
        N = p.num_centers
        V, Fe = p.v(X), p.f(X)
        V = V / V.norm(dim=0, keepdim=True).clamp(min=1e-12)  # per channel, over the tokens
        # adaptive average pooling: bin i covers [floor(i L / N), ceil((i + 1) L / N))
        bins = [(i * L // N, -(-(i + 1) * L // N)) for i in range(N)]
        C = torch.stack([X[s:e].mean(0) for s, e in bins])
        CF = torch.stack([Fe[s:e].mean(0) for s, e in bins])
        for _ in range(p.iters):
            C = p.c(C)
            Cn = C / C.norm(dim=1, keepdim=True).clamp(min=1e-12)
            S = torch.softmax(Cn @ V.T, dim=0)  # (N, L), normalised over centres
            C = S @ Fe
        cos = torch.zeros(N, L)
        for n in range(N):
            for t in range(L):
                cos[n, t] = torch.dot(C[n], X[t]) / (C[n].norm().clamp(min=1e-12)
                                                     * X[t].norm().clamp(min=1e-12))
        sim = torch.sigmoid(p.sim_beta.flatten() + p.sim_alpha.flatten() * cos)
        assign = sim.argmax(0)  # (L,) each token's centre
        out = X.clone()
        for n in range(N):
            members = (assign == n).nonzero().flatten()
            upd = (sum((sim[n, t] * Fe[t] for t in members), torch.zeros(D)) + CF[n]) / (len(members) + 1.0)
            for t in members:
                out[t] = out[t] + sim[n, t] * upd
        outs.append(p.mlp(out))
    return torch.stack(outs), assign


def test_cluster_projector_matches_step_by_step_definition():
    torch.manual_seed(0)
    p = M.ClusterProjector(8, 12, num_centers=4, iters=2)
    with torch.no_grad():
        p.sim_alpha.fill_(3.0)
        p.sim_beta.fill_(-0.5)
        x = torch.randn(2, 10, 8)
        ref, assign = cluster_by_definition(p, x)
        out = p(x)
    assert out.shape == (2, 10, 12)
    assert len(set(assign.tolist())) > 1  # the example really has several clusters
    assert (out - ref).abs().max() < 1e-5


# ----------------------------------------------------------------------------- checkpoint.py
# Oracle: transformers reads what checkpoint.py writes and writes what it reads.

def write_original_layout(hf, d, vision_dir, clip_model_form=False):
    """Save `hf` as an original-LLaVA checkpoint (LLaMA keys + mm_projector) and its tower as a
    CLIPVisionModel."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel
    sd = hf.state_dict()
    out = {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            out["model." + k[len("model.language_model."):]] = v
        elif k.startswith("model.multi_modal_projector.linear_1."):
            out["model.mm_projector.0." + k.split(".")[-1]] = v
        elif k.startswith("model.multi_modal_projector.linear_2."):
            out["model.mm_projector.2." + k.split(".")[-1]] = v
        elif k == "lm_head.weight":
            out[k] = v
    tc = hf.config.text_config
    os.makedirs(d, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(d, "model.safetensors"))
    cfg = dict(model_type="llava_llama", hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
               num_hidden_layers=tc.num_hidden_layers, num_attention_heads=tc.num_attention_heads,
               num_key_value_heads=tc.num_key_value_heads, vocab_size=tc.vocab_size - 1,
               rms_norm_eps=tc.rms_norm_eps, rope_theta=500000.0, mm_projector_type="mlp2x_gelu",
               mm_vision_tower="my-local/clip", mm_hidden_size=32, mm_vision_select_layer=-2,
               mm_vision_select_feature="patch")
    # the original layout has no image-token row in the vocabulary: drop the last row (id 119)
    out["model.embed_tokens.weight"] = out["model.embed_tokens.weight"][:-1].contiguous()
    out["lm_head.weight"] = out["lm_head.weight"][:-1].contiguous()
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    tower_sd = {k[len("model.vision_tower."):]: v for k, v in sd.items()
                if k.startswith("model.vision_tower.")}
    if clip_model_form:  # what the hub's openai/clip-* checkpoints hold: a whole CLIPModel
        os.makedirs(vision_dir, exist_ok=True)
        clip = {"vision_model." + k: v.contiguous() for k, v in tower_sd.items()}
        clip.update({"text_model.embeddings.token_embedding.weight": torch.zeros(3, 4),
                     "logit_scale": torch.ones(())})
        save_file(clip, os.path.join(vision_dir, "model.safetensors"))
        with open(os.path.join(vision_dir, "config.json"), "w") as f:
            json.dump({"model_type": "clip", "vision_config": hf.config.vision_config.to_dict()}, f)
    else:  # a CLIPVisionModel saved by transformers
        tower = CLIPVisionModel(hf.config.vision_config)
        tower.load_state_dict(tower_sd)
        tower.save_pretrained(vision_dir)


@pytest.mark.parametrize("clip_model_form", [False, True])
def test_logits_match_original_layout_with_separate_clip(hf_and_ours, tmp_path, clip_model_form):
    hf, _, _ = hf_and_ours
    write_original_layout(hf, tmp_path / "llava", tmp_path / "clip", clip_model_form)
    with pytest.raises(ValueError, match="pass vision_path"):
        C.from_pretrained(str(tmp_path / "llava"), dtype=torch.float32)
    ours = C.from_pretrained(str(tmp_path / "llava"), vision_path=str(tmp_path / "clip"), dtype=torch.float32)
    assert ours.config.image_token_id == -200 and ours.config.text.vocab_size == 119
    ids, mask, pixels = padded_batch()
    ref = hf_logits(hf, ids, mask, pixels)[..., :119]
    with torch.no_grad():
        out = ours(ids.masked_fill(ids == 119, -200), pixels, mask)
    valid = mask.bool()
    assert (out[valid] - ref[valid]).abs().max() < 1e-4


def test_save_pretrained_roundtrips_both_layouts(hf_and_ours, tmp_path):
    from transformers import LlavaForConditionalGeneration
    hf, ours, _ = hf_and_ours
    ids, mask, pixels = padded_batch()
    with torch.no_grad():
        want = ours(ids, pixels, mask)
    C.save_pretrained(ours, tmp_path / "hf", max_shard_bytes=40_000)  # force shards + index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    hf2 = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    valid = mask.bool()
    assert (hf_logits(hf2, ids, mask, pixels)[valid] - want[valid]).abs().max() < 1e-4
    for layout in ("llava-hf", "llava"):
        C.save_pretrained(ours, tmp_path / layout, layout=layout)
        back = C.from_pretrained(str(tmp_path / layout), dtype=torch.float32)
        with torch.no_grad():
            assert torch.equal(back(ids, pixels, mask), want)


def test_tied_embeddings_roundtrip(tmp_path):
    hf = tiny_hf_llava(tie=True)
    hf.save_pretrained(tmp_path / "t")
    ours = C.from_pretrained(str(tmp_path / "t"), dtype=torch.float32)
    assert ours.lm_head.weight is ours.language_model.embed_tokens.weight
    ids, mask, pixels = padded_batch()
    with torch.no_grad():
        assert (ours(ids, pixels, mask)[mask.bool()]
                - hf_logits(hf, ids, mask, pixels)[mask.bool()]).abs().max() < 1e-4


def test_cluster_projector_roundtrips_in_llava_layout(tmp_path):
    cfg = M.LlavaConfig(vision=M.VisionConfig(32, 64, 2, 4, 28, 7), text=M.TextConfig(
        vocab_size=50, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2),
        projector_type="cluster", image_token_id=49, cluster_centers=4)
    torch.manual_seed(0)
    m = M.Llava(cfg).eval()
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, 16), 49), torch.tensor([[5, 6]])], 1)
    px = torch.randn(1, 3, 28, 28)
    with pytest.raises(ValueError, match="use layout='llava'"):
        C.save_pretrained(m, tmp_path / "x", layout="llava-hf")
    C.save_pretrained(m, tmp_path / "c", layout="llava")
    from safetensors.torch import load_file
    keys = load_file(tmp_path / "c" / "model.safetensors").keys()
    assert {"model.mm_projector.sim_alpha", "model.mm_projector.c.weight", "model.mm_projector.mlp.2.bias",
            "model.mm_projector.ln_1.weight"} <= set(keys)
    back = C.from_pretrained(str(tmp_path / "c"), dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(back(ids, px), m(ids, px))


def test_bad_inputs_give_clear_errors(hf_and_ours, tmp_path):
    _, ours, d = hf_and_ours
    ids, mask, pixels = padded_batch()
    with pytest.raises(ValueError,
                       match=r"image token count mismatch: input_ids hold 32 .* 1 image\(s\) x 16"):
        ours(ids, pixels[:1], mask)
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(ids, None, mask)
    with pytest.raises(ValueError, match="left-padded"):
        M.generate(ours, ids.flip(1), pixels, mask.flip(1))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        C.from_pretrained(str(tmp_path), dtype=torch.float32) if (tmp_path / "config.json").write_text(
            json.dumps({"text_config": {}, "vision_config": {}})) else None
    from safetensors.torch import load_file, save_file
    sd = load_file(d / "model.safetensors")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text((d / "config.json").read_text())
    head = next(k for k in sd if k.endswith("lm_head.weight"))  # key scheme depends on transformers' version
    broken = dict(sd)
    broken.pop(head)
    broken["model.extra.weight"] = torch.zeros(1)
    save_file(broken, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\], "
                                         r"unexpected \['language_model.extra.weight'\]"):
        C.from_pretrained(str(tmp_path / "bad"), dtype=torch.float32)
    broken = dict(sd)
    broken[head] = torch.zeros(3, 3)
    save_file(broken, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(ValueError, match=r"shape mismatch .* lm_head.weight: "
                                         r"checkpoint \(3, 3\) vs model \(120, 48\)"):
        C.from_pretrained(str(tmp_path / "bad"), dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown projector_type 'mlp3'"):
        M.Llava(M.LlavaConfig(projector_type="mlp3", vision=M.VisionConfig(8, 8, 1, 2, 14, 7),
                              text=M.TextConfig(10, 8, 8, 1, 2, 2)))


def test_unknown_tower_hub_id_error_says_how_to_fix(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_llama",
                                                       "mm_vision_tower": "someone/medclip"}))
    with pytest.raises(ValueError, match=r"'someone/medclip'.*pass vision_path="):
        C.from_pretrained(str(tmp_path))



def save_tiny(d, synth, model_type="llama", **save_kw):
    """tiny_dir's random LLaVA (the synthetic tokenizer, 48x48 images) with a Llama or Mistral decoder."""
    tok = D.load_tokenizer(synth / "tokenizer.json")
    cfg = M.LlavaConfig(vision=M.VisionConfig(32, 64, 2, 4, 48, 8), text=M.TextConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
        num_kv_heads=2, model_type=model_type), image_token_id=SY.SYNTH_IMAGE_TOKEN_ID)
    torch.manual_seed(0)
    C.save_pretrained(sft.init_weights(M.Llava(cfg)), d, **save_kw)
    (Path(d) / "tokenizer.json").write_text((synth / "tokenizer.json").read_text())
    return Path(d)


def test_template_travels_with_the_model(synth, tmp_path):
    """config.json's conv_template: the decoder family's default at save, kept through a reload and a
    re-save in the other layout, or as given; a checkpoint written elsewhere gets its family's default."""
    conf = lambda d: json.loads((d / "config.json").read_text())  # noqa: E731
    mistral = save_tiny(tmp_path / "mistral", synth, "mistral")
    assert conf(mistral)["conv_template"] == "mistral_instruct" == C.template_of(str(mistral))
    model = C.from_pretrained(str(mistral), dtype=torch.float32)
    assert model.template == "mistral_instruct"
    C.save_pretrained(model, tmp_path / "again", layout="llava")
    assert C.template_of(str(tmp_path / "again")) == "mistral_instruct"
    llama = save_tiny(tmp_path / "llama", synth)
    assert C.template_of(str(llama)) == "vicuna_v1"
    sq = save_tiny(tmp_path / "sq", synth, template="vicuna_v1_sq")
    assert C.from_pretrained(str(sq), dtype=torch.float32).template == "vicuna_v1_sq"
    for d, want in ((mistral, "mistral_instruct"), (llama, "vicuna_v1")):  # no key: the family's default
        c = conf(d)
        del c["conv_template"]
        (d / "config.json").write_text(json.dumps(c))
        assert C.template_of(str(d)) == want == C.from_pretrained(str(d), dtype=torch.float32).template


# ----------------------------------------------------------------------------- lora.py
# Oracle: PEFT's LoRA on transformers' LlavaForConditionalGeneration, with the same base weights.

IMG_ID, N_IMG_TOKENS = 119, 16


def lora_hf_llava(text_hidden=48, seed=0):
    """Random transformers LlavaForConditionalGeneration: CLIP 3 layers (the last one unused, feature layer
    -2), Llama 2 layers with GQA."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=28, patch_size=7, projection_dim=16)
    tc = LlamaConfig(hidden_size=text_hidden, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=120,
                     max_position_embeddings=256)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG_ID, image_seq_length=N_IMG_TOKENS,
                      vision_feature_layer=-2)
    hf = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # norms and biases start at 1/0: make every weight non-trivial
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


def batch(seed=1):
    """Two rows of [t, <image>*16, t x 5] and their images."""
    g = torch.Generator().manual_seed(seed)
    img = torch.full((N_IMG_TOKENS,), IMG_ID)
    ids = torch.stack([torch.cat([torch.randint(3, 118, (1,), generator=g), img,
                                  torch.randint(3, 118, (5,), generator=g)])
                       for _ in range(2)])
    return ids, torch.randn(2, 3, 28, 28, generator=g)


def authors_targets(hf):
    """STLLaVA-Med train.py `find_all_linear_names`: last name component of every Linear, per tower."""
    def last_names(module, skip=()):
        return {n.split(".")[-1] for n, m in module.named_modules()
                if isinstance(m, nn.Linear) and not any(s in n for s in skip)}
    return sorted(last_names(hf.model.language_model) | last_names(hf.model.vision_tower))


def peft_paper_config(**kw):
    """The paper's two LoRAs as one PEFT config: LLM r128/a256, ViT r32/a64 via rank/alpha patterns."""
    vit = r"model\.vision_tower\..*"
    return peft.LoraConfig(r=128, lora_alpha=256, rank_pattern={vit: 32}, alpha_pattern={vit: 64}, **kw)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(hf, dir): transformers' model and its llava-hf checkpoint that our from_pretrained reads."""
    hf = lora_hf_llava()
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(d)
    return hf, str(d)


def ours_from(d):
    return C.from_pretrained(d, dtype=torch.float32)


def randomize_lora(model, seed=0):
    """Non-zero B (and a perturbed projector) so that every comparison below can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in L.lora_layers(model).values():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.02)
        for p in model.projector.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def peft_like_ours(hf, ours, config):
    """PEFT model on a copy of `hf`, with our A, B and projector copied into it by name."""
    pm = peft.get_peft_model(copy.deepcopy(hf), config)
    lora_params = {n: m for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.Linear)}
    assert len(lora_params) == len(L.lora_layers(ours))
    with torch.no_grad():
        for name, m in L.lora_layers(ours).items():
            p = lora_params[L.PEFT_PREFIX + L.to_hf_name(name)]
            p.lora_A["default"].weight.copy_(m.lora_a)
            p.lora_B["default"].weight.copy_(m.lora_b)
        mts = pm.base_model.model.model.multi_modal_projector.modules_to_save["default"]
        mts.load_state_dict(ours.projector.state_dict())
    return pm.eval()


def logits(model, ids, pixels):
    with torch.no_grad():
        if isinstance(model, M.Llava):
            return model(ids, pixels)
        return model(input_ids=ids, pixel_values=pixels).logits


def test_lora_linear_matches_peft_layer():
    torch.manual_seed(0)
    base_lin = nn.Linear(64, 48)
    ours = L.LoRALinear(copy.deepcopy(base_lin), r=8, alpha=16, dropout=0.5)
    pm = peft.get_peft_model(nn.Sequential(copy.deepcopy(base_lin)),
                             peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.5, target_modules=["0"]))
    theirs = pm.base_model.model[0]
    # init: B = 0, A ~ U(+-1/sqrt(in)) in both (kaiming_uniform, a=sqrt(5))
    bound = 64 ** -0.5
    for a, b in [(ours.lora_a, ours.lora_b),
                 (theirs.lora_A["default"].weight, theirs.lora_B["default"].weight)]:
        assert (b == 0).all()
        assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
        assert a.std() > 0.5 * bound / 3 ** 0.5
    assert not ours.weight.requires_grad and ours.lora_a.requires_grad and ours.lora_b.requires_grad
    with torch.no_grad():
        ours.lora_b.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_a)
        theirs.lora_B["default"].weight.copy_(ours.lora_b)
    x = torch.randn(3, 5, 64)
    ours.eval(), pm.eval()
    assert (ours(x) - pm(x)).abs().max() < 1e-5
    ours.train(), pm.train()  # same dropout mask from the same seed: dropout sits where PEFT puts it
    torch.manual_seed(1)
    y_ours = ours(x)
    torch.manual_seed(1)
    y_peft = pm(x)
    assert (y_ours - y_peft).abs().max() < 1e-5 and (y_ours - ours.eval()(x)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="rank must be positive"):
        L.LoRALinear(nn.Linear(4, 4), r=0, alpha=1)


def test_half_precision_base_keeps_fp32_adapters_as_peft_does():
    torch.manual_seed(0)
    base_lin = nn.Linear(32, 16).to(torch.bfloat16)
    ours = L.LoRALinear(copy.deepcopy(base_lin), r=4, alpha=8)
    pm = peft.get_peft_model(nn.Sequential(copy.deepcopy(base_lin)),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    theirs = pm.base_model.model[0]
    assert ours.weight.dtype == torch.bfloat16
    assert ours.lora_a.dtype == theirs.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        ours.lora_b.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_a)
        theirs.lora_B["default"].weight.copy_(ours.lora_b)
    x = torch.randn(7, 32, dtype=torch.bfloat16)
    y = ours(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, pm(x))


def test_lora_linear_merge_unmerge():
    torch.manual_seed(0)
    m = L.LoRALinear(nn.Linear(32, 16), r=4, alpha=8)
    with torch.no_grad():
        m.lora_b.normal_()
    w0, x = m.weight.clone(), torch.randn(7, 32)
    y = m(x)
    m.merge()
    assert m.merged and (m(x) - y).abs().max() < 1e-5 and (m.weight - w0).abs().max() > 1e-2
    m.merge()  # idempotent
    assert (m(x) - y).abs().max() < 1e-5
    m.unmerge()
    assert not m.merged and (m.weight - w0).abs().max() < 1e-6 and (m(x) - y).abs().max() < 1e-5


def test_paper_targets_are_the_authors_modules(base):
    hf, d = base
    ours = L.add_lora(ours_from(d), L.PAPER_TARGETS)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft_paper_config(target_modules=authors_targets(hf)))
    theirs = {n[len(L.PEFT_PREFIX):]: m for n, m in pm.named_modules()
              if isinstance(m, peft.tuners.lora.Linear)}
    layers = L.lora_layers(ours)
    assert {L.to_hf_name(n) for n in layers} == set(theirs) and len(layers) == 2 * 7 + 3 * 6
    for n, m in layers.items():
        t = theirs[L.to_hf_name(n)]
        assert (m.r, m.alpha, m.scale) == (t.r["default"], t.lora_alpha["default"], t.scaling["default"])
        assert m.dropout_p == (0.2 if n.startswith("vision_tower") else 0.05)
    assert all(m.dropout_p == 0.1
               for n, m in L.lora_layers(L.add_lora(ours_from(d), L.PAPER_TARGETS_DPO)).items()
               if n.startswith("vision_tower"))


def test_forward_matches_peft_on_both_towers(base):
    hf, d = base
    ours = randomize_lora(L.add_lora(ours_from(d), L.PAPER_TARGETS)).eval()
    pm = peft_like_ours(hf, ours, peft_paper_config(target_modules=authors_targets(hf),
                                                    modules_to_save=["multi_modal_projector"]))
    ids, pixels = batch()
    want, got = logits(pm, ids, pixels), logits(ours, ids, pixels)
    assert (got - want).abs().max() < 1e-5
    assert (want - logits(hf, ids, pixels)).abs().max() > 1e-3  # the adapters do change the output
    for tower in ("vision_tower", "language_model"):  # and each tower's adapters matter on their own
        with torch.no_grad():
            for n, m in L.lora_layers(ours).items():
                if n.startswith(tower):
                    m.disabled = True
        assert (logits(ours, ids, pixels) - got).abs().max() > 1e-4
        for m in L.lora_layers(ours).values():
            m.disabled = False


def test_disable_lora_is_base_and_merge_equals_unmerged(base, tmp_path):
    hf, d = base
    ids, pixels = batch()
    plain = ours_from(d)
    want_base = logits(plain, ids, pixels)
    ours = L.add_lora(ours_from(d), L.PAPER_TARGETS).eval()
    with torch.no_grad():  # B only: disable_lora turns LoRA off, not the (fully trained) projector
        for m in L.lora_layers(ours).values():
            m.lora_b.normal_(std=0.02)
    lora_out = logits(ours, ids, pixels)
    with L.disable_lora(ours):
        assert torch.equal(logits(ours, ids, pixels), want_base)
    assert torch.equal(logits(ours, ids, pixels), lora_out)  # back on after the block
    assert (lora_out - want_base).abs().max() > 1e-3
    L.merge_lora(ours)
    assert not L.lora_layers(ours) and set(ours.state_dict()) == set(plain.state_dict())
    assert all(type(m) is nn.Linear for m in ours.modules() if "Linear" in type(m).__name__)
    assert (logits(ours, ids, pixels) - lora_out).abs().max() < 1e-5
    C.save_pretrained(ours, str(tmp_path))  # merged checkpoint loads in transformers and computes the same
    hf_merged = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert (logits(hf_merged, ids, pixels) - lora_out).abs().max() < 1e-4


def test_only_lora_and_projector_get_gradients(base):
    hf, d = base
    ours = L.mark_trainable(randomize_lora(L.add_lora(ours_from(d), L.PAPER_TARGETS)).train())
    ids, pixels = batch()
    ours(ids, pixels).logsumexp(-1).mean().backward()
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in ours.named_parameters() if p.grad is not None}
    expected = {n for n in dict(ours.named_parameters())
                if n.endswith((".lora_a", ".lora_b")) or n.startswith("projector.")}
    assert trainable == expected and len(expected) == 2 * len(L.lora_layers(ours)) + 4
    # the last CLIP layer is past the feature layer (-2): never run, so no gradient, as in LLaVA
    assert with_grad == {n for n in expected if not n.startswith("vision_tower.encoder.layers.2.")}
    assert all(ours.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)
    assert L.param_report(ours).startswith(
        f"trainable params: {sum(ours.get_parameter(n).numel() for n in expected):,} / ")
    L.mark_trainable(ours, lora=False, full=("vision_tower",))
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n in dict(ours.named_parameters()) if n.startswith("vision_tower.")}


def test_param_report_counts_like_peft(base):
    hf, d = base
    ours = L.mark_trainable(L.add_lora(ours_from(d), L.PAPER_TARGETS), full=())
    pm = peft.get_peft_model(copy.deepcopy(hf), peft_paper_config(target_modules=authors_targets(hf)))
    trainable, total = pm.get_nb_trainable_parameters()
    assert L.param_report(ours) == (
        f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.4f}%)")


def test_adapter_saved_here_loads_in_peft(base, tmp_path):
    hf, d = base
    ours = randomize_lora(L.add_lora(ours_from(d), L.PAPER_TARGETS)).eval()
    L.save_adapter(ours, str(tmp_path / "ours"))
    # same file layout as PEFT's own save of the equivalent model
    pm = peft_like_ours(hf, ours, peft_paper_config(target_modules=authors_targets(hf),
                                                    modules_to_save=["multi_modal_projector"]))
    pm.save_pretrained(str(tmp_path / "peft"))
    mine, theirs = (load_file(str(tmp_path / s / "adapter_model.safetensors")) for s in ("ours", "peft"))
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert "base_model.model.model.multi_modal_projector.linear_1.weight" in mine
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in mine
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ours")).eval()
    ids, pixels = batch()
    assert (logits(loaded, ids, pixels) - logits(ours, ids, pixels)).abs().max() < 1e-5
    # the projector comes back as a PEFT modules_to_save module (trainable there, saved again), not by
    # accident
    assert isinstance(loaded.base_model.model.model.multi_modal_projector,
                      peft.utils.other.ModulesToSaveWrapper)
    loaded.save_pretrained(str(tmp_path / "resaved"))
    resaved = load_file(str(tmp_path / "resaved" / "adapter_model.safetensors"))
    assert sorted(resaved) == sorted(mine) and all(torch.equal(mine[k], resaved[k]) for k in mine)


def test_adapter_saved_by_peft_loads_here(base, tmp_path):
    hf, d = base
    pm = peft.get_peft_model(copy.deepcopy(hf), peft_paper_config(
        target_modules=authors_targets(hf), modules_to_save=["multi_modal_projector"], lora_dropout=0.05))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    pm.save_pretrained(str(tmp_path))
    ours = L.load_adapter(ours_from(d), str(tmp_path)).eval()
    layers = L.lora_layers(ours)
    assert len(layers) == 2 * 7 + 3 * 6 and layers["vision_tower.encoder.layers.0.mlp.fc1"].scale == 2.0
    assert (layers["vision_tower.encoder.layers.0.mlp.fc1"].r,
            layers["language_model.layers.0.mlp.up_proj"].r) == (32, 128)
    ids, pixels = batch()
    assert (logits(ours, ids, pixels) - logits(pm.eval(), ids, pixels)).abs().max() < 1e-5
    adapted = L.add_lora(ours_from(d), {p: L.LoRASpec(s.r, 1.0) for p, s in L.PAPER_TARGETS.items()})
    L.load_adapter(adapted, str(tmp_path))  # into existing LoRA layers: PEFT's alpha replaces theirs
    assert (logits(adapted.eval(), ids, pixels) - logits(ours, ids, pixels)).abs().max() < 1e-5
    L.save_adapter(ours, str(tmp_path / "again"))  # and round-trips through our writer unchanged
    again = L.load_adapter(ours_from(d), str(tmp_path / "again")).eval()
    assert torch.equal(logits(again, ids, pixels), logits(ours, ids, pixels))


def test_lora_bad_inputs_give_clear_errors(base, tmp_path):
    hf, d = base
    ours = ours_from(d)
    typo = r"language_model\.layer\.\d+\.q_proj"  # "layer", not "layers"
    with pytest.raises(ValueError, match=re.escape(f"LoRA target {typo!r} matches no nn.Linear of Llava")):
        L.add_lora(ours, {typo: L.LoRASpec(8, 16)})
    with pytest.raises(ValueError, match="rank must be positive, got r=0"):
        L.add_lora(ours, {r"q_proj": L.LoRASpec(0, 16)})
    with pytest.raises(ValueError, match="has no LoRA layers"):
        L.save_adapter(ours, str(tmp_path / "none"))
    L.add_lora(ours, {r"q_proj": L.LoRASpec(4, 8)})
    with pytest.raises(ValueError, match="matches no nn.Linear"):  # twice: already adapted
        L.add_lora(ours, {r"q_proj": L.LoRASpec(4, 8)})
    with pytest.raises(ValueError, match="'projector' has LoRA layers"):
        L.save_adapter(L.add_lora(ours_from(d), {r"projector\.linear_1": L.LoRASpec(4, 8)}),
                       str(tmp_path / "x"))
    # an adapter for another architecture: PEFT LoRA of a LlamaForCausalLM
    llama = transformers.LlamaForCausalLM(hf.config.text_config)
    peft.get_peft_model(llama, peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path / "llama"))
    with pytest.raises(ValueError,
                       match="adapter for LlamaForCausalLM; expected LORA for LlavaForConditionalGeneration"):
        L.load_adapter(ours_from(d), str(tmp_path / "llama"))
    cfg_path = tmp_path / "llama" / "adapter_config.json"  # the same without the class name in its config
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_mapping"] = None
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj' "
                                         r"is not a LlavaForConditionalGeneration name"):
        L.load_adapter(ours_from(d), str(tmp_path / "llama"))
    # a Llava adapter of another size
    other = lora_hf_llava(text_hidden=64)
    peft.get_peft_model(other, peft.LoraConfig(r=4, target_modules=["o_proj"])).save_pretrained(
        str(tmp_path / "big"))
    target = ours_from(d)
    with pytest.raises(ValueError,
                       match=r"shape mismatch at 'model\.language_model\.layers\.0\.self_attn\.o_proj'"):
        L.load_adapter(target, str(tmp_path / "big"))
    assert not L.lora_layers(target)  # checked before anything changed
    peft.get_peft_model(lora_hf_llava(text_hidden=64), peft.LoraConfig(  # ViT fits, projector does not
        r=4, target_modules=["fc1"], modules_to_save=["multi_modal_projector"])).save_pretrained(
        str(tmp_path / "proj"))
    with pytest.raises(ValueError,
                       match=r"'projector\.linear_1\.(weight|bias)' \(64.*has no parameter of that shape"):
        L.load_adapter(target, str(tmp_path / "proj"))
    assert not L.lora_layers(target)
    with pytest.raises(RuntimeError, match="unmerge"):
        ours.language_model.layers[0].self_attn.q_proj.merge()
        with L.disable_lora(ours):
            pass


# ----------------------------------------------------------------------------- data.py
# Tests for data.py's parts 1-5 below, against oracles: sentencepiece for the tokenizer conversion, the
# authors' tokenizer_image_token + preprocess_v1_sq2 masking (ported below) run on transformers' slow
# sentencepiece tokenizer for the tokens and labels, and transformers' CLIPImageProcessorPil for the pixels.
# sentencepiece and transformers are test-only. Real questions and images come from ../shared/data.

SHARED = Path(__file__).resolve().parent.parent / "shared" / "data"


needs_shared = pytest.mark.skipif(not (SHARED / "vqa_rad").is_dir(),
                                  reason="needs ../shared/data (VQA-RAD, SLAKE)")


# a short image placeholder run; an id just past the test vocabulary, as llava-hf's 32000
DATA_N_IMG, DATA_IMG_ID = 7, 1500


# -----------------------------------------------------------------------------
# Oracles: a SentencePiece model trained here, and the authors' code ported line by line
def _vqa_rad():
    return json.loads((SHARED / "vqa_rad" / "VQA_RAD_Dataset_Public.json").read_text())


def _corpus():
    rad, slake = _vqa_rad(), json.loads((SHARED / "slake" / "test.json").read_text())
    qa = [(r["question"], str(r["answer"])) for r in rad + slake]  # SLAKE has Chinese questions too
    lines = [q for q, _ in qa] + [a for _, a in qa]
    lines += [f"USER: {q} ASSISTANT: {a}" for q, a in qa[:4000:3]] + [f"VUSER: {q}" for q, _ in qa[1:4000:5]]
    lines += [D.QUESTIONER_SYSTEM] * 20 + ["  two  spaces,\ttabs\t\tand", "line one\nline two\n\n",
                                           "code:    indented"] * 10
    return lines


def _train_sp(path, lines, **kw):
    import sentencepiece as spm
    f = io.BytesIO()
    spm.SentencePieceTrainer.train(  # LLaMA's trainer settings, small
        sentence_iterator=iter(lines), model_writer=f, model_type="bpe", vocab_size=1500, byte_fallback=True,
        character_coverage=0.9995, split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, num_threads=1, minloglevel=2, **kw)
    path.write_bytes(f.getvalue())
    return path


@pytest.fixture(scope="module")
def llama_sp(tmp_path_factory):
    """A BPE tokenizer.model normalised as LLaMA's: identity, whitespace kept, dummy prefix."""
    return _train_sp(tmp_path_factory.mktemp("sp") / "tokenizer.model", _corpus(),
                     normalization_rule_name="identity", remove_extra_whitespaces=False)


@pytest.fixture(scope="module")
def oracle(llama_sp):
    """LLaVA's tokenizer: LlamaTokenizer(use_fast=False), i.e. sentencepiece per text piece between special
    tokens (legacy); in transformers 5 that is SentencePieceBackend. pad = unk as LLaVA sets it."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    return SentencePieceBackend(vocab_file=str(llama_sp), legacy=True, bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>", pad_token="<unk>", special_tokens_pattern="bos")


def authors_tokenizer_image_token(prompt, tokenizer, image_token_index=-200):
    """STLLaVA-Med llava/mm_utils.py tokenizer_image_token, verbatim logic."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]
    input_ids, offset = [], 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def authors_labels(conversation, input_ids, tokenizer, roles=("USER", "ASSISTANT", "VUSER")):
    """STLLaVA-Med train.py preprocess_v1_sq2 masking (L555-610, has_image=True), on one sample."""

    def tii(text):
        return authors_tokenizer_image_token(text, tokenizer)
    target = list(input_ids)
    total_len = sum(t != tokenizer.pad_token_id for t in target)
    sep, sep_vur = " " + roles[1] + ": ", roles[2] + ": "
    cur_len = 1
    target[:cur_len] = [-100]
    for i, rou in enumerate(conversation.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) == 2:
            parts[0] += sep
            round_len = len(tii(rou))
            instruction_len = len(tii(parts[0])) - 2
            target[cur_len:cur_len + instruction_len] = (
                [-100] * len(target[cur_len:cur_len + instruction_len]))
        else:
            round_len = len(tii(rou))
            if i == 0:
                parts = rou.split("<image>\n")
                sep_len = len(tii(parts[0] + "<image>\n"))
            else:
                sep_len = len(tii(sep_vur)) - 2
            target[cur_len:cur_len + sep_len] = [-100] * len(target[cur_len:cur_len + sep_len])
        cur_len += round_len
    target[cur_len:] = [-100] * len(target[cur_len:])
    if cur_len != total_len:  # "WARNING: tokenization mismatch" -> the whole sample is ignored
        target = [-100] * len(target)
    return target


def expand_images(ids, labels=None):
    """What llava_arch.prepare_inputs_labels_for_multimodal does with the -200 placeholder (ids side:
    ours)."""
    out_ids, out_labels = [], []
    for k, t in enumerate(ids):
        out_ids += [DATA_IMG_ID] * DATA_N_IMG if t == -200 else [t]
        if labels is not None:
            out_labels += [-100] * DATA_N_IMG if t == -200 else [labels[k]]
    return (out_ids, out_labels) if labels is not None else out_ids


def loss_runs(labels):
    """[(start, end)] of the contiguous runs of positions with loss."""
    runs, start = [], None
    for k, label in enumerate(labels + [-100]):
        if label != -100 and start is None:
            start = k
        elif label == -100 and start is not None:
            runs, start = runs + [(start, k)], None
    return runs


# -----------------------------------------------------------------------------
# 1. Tokenizer
VARIED = ["", " ", "   ", "\t", "\n", "a", "  leading spaces", "trailing spaces   ", "tabs\tin\t\tthe middle",
          "multi\nline\n\ntext\n", " \t \n mixed whitespace", "naïve café, Ångström, façade",
          "Ça va? Ñandú über", "这张图片的成像方式是什么?", "肺部 CT 显示 左下叶 结节", "emoji 😀🫀🩻 test",
          "ﬁ ligature ① Ⅻ", "\u00a0nbsp\u3000ideographic space", "x-ray: 12345 67.8% (p<0.05)",
          "<0x0A> literal", "▁ literal metaspace ▁▁", "ASSISTANT:  two spaces", "VUSER:\tQ",
          "Is there a mass?\n\n\n"]


@needs_shared
def test_tokenizer_matches_sentencepiece(llama_sp, tmp_path):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(llama_sp))
    tok = D.load_tokenizer(llama_sp)
    texts = VARIED + [line for line in _corpus()[::23]]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), repr(text)
    assert any(3 <= i < 259 for t in VARIED for i in sp.encode(t))  # byte fallback was exercised
    assert ((tok.token_to_id("<unk>"), tok.token_to_id("<s>"), tok.token_to_id("</s>"))
            == (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2))
    assert tok.encode("Is the liver normal?").ids == [1] + sp.encode("Is the liver normal?")  # BOS, no EOS
    assert tok.padding["pad_id"] == 0 and tok.padding["pad_token"] == "<unk>"  # LLaVA pads with unk
    for text in ["naïve café 😀", "Is there a mass?", "肺部 CT"]:
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)) == text
    tok.save(str(tmp_path / "tokenizer.json"))
    tok2 = D.load_tokenizer(tmp_path)  # a folder: tokenizer.json
    for text in texts:
        assert tok2.encode(text, add_special_tokens=False).ids == sp.encode(text), repr(text)
    # the layout transformers 5's LlamaTokenizer writes: no normaliser, Metaspace(prepend_scheme="first")
    from tokenizers import Tokenizer, pre_tokenizers
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(
        " x", add_special_tokens=False).ids != sp.encode(" x")
    tok3 = D.load_tokenizer(tmp_path / "tokenizer.json")
    for text in texts + ["a</s> b</s>c"]:
        assert (tok3.encode(text, add_special_tokens=False).ids
                == tok2.encode(text, add_special_tokens=False).ids), repr(text)


@needs_shared
def test_tokenizer_nfkc_normalizer(tmp_path):
    """sentencepiece's defaults (nmt_nfkc, remove_extra_whitespaces) convert too, via the precompiled
    charsmap."""
    import sentencepiece as spm
    path = _train_sp(tmp_path / "tokenizer.model", _corpus()[::2])
    pieces, trainer, norm = D.read_sentencepiece(path)
    assert norm["name"] == "nmt_nfkc" and norm["remove_extra_whitespaces"] and trainer["byte_fallback"]
    sp, tok = spm.SentencePieceProcessor(model_file=str(path)), D.load_tokenizer(path)
    for text in VARIED:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), repr(text)


@pytest.mark.skipif(not os.environ.get("STLLAVA_LLAMA_TOKENIZER"),
                    reason="set STLLAVA_LLAMA_TOKENIZER=<LLaMA tokenizer.model>")
def test_real_llama_tokenizer():
    """Optional: the real LLaMA/Vicuna tokenizer.model (32000 pieces), against sentencepiece and the authors'
    code."""
    import sentencepiece as spm
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    path = os.environ["STLLAVA_LLAMA_TOKENIZER"]
    sp, tok = spm.SentencePieceProcessor(model_file=path), D.load_tokenizer(path)
    for text in VARIED + [D.QUESTIONER_SYSTEM, "    def f(x):\n        return x"]:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), repr(text)
    slow = SentencePieceBackend(vocab_file=path, legacy=True, bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>", pad_token="<unk>", special_tokens_pattern="bos")
    ref_ids = authors_tokenizer_image_token(TURNS_PROMPT, slow)
    assert D.encode_conversation(TURNS, tok, "vicuna_v1_sq", DATA_N_IMG, DATA_IMG_ID) == expand_images(
        ref_ids, authors_labels(TURNS_PROMPT, ref_ids, slow))


def test_tokenizer_errors(tmp_path):
    import sentencepiece as spm
    f = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["is there a mass in the left lung"] * 50),
                                   model_writer=f, model_type="unigram", vocab_size=20, minloglevel=2,
                                   num_threads=1)
    (tmp_path / "uni.model").write_bytes(f.getvalue())
    with pytest.raises(ValueError, match="only SentencePiece BPE"):
        D.load_tokenizer(tmp_path / "uni.model")
    (tmp_path / "junk.model").write_bytes(b"\xff\xff\xff not a protobuf")
    with pytest.raises(ValueError, match="junk.model: not a readable SentencePiece model"):
        D.load_tokenizer(tmp_path / "junk.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no tokenizer.json or tokenizer.model"):
        D.load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="tokenizer file .*nope.json not found"):
        D.load_tokenizer(tmp_path / "nope.json")


# -----------------------------------------------------------------------------
# 2. Templates and questioner roles
SQ_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
             "gives helpful, detailed, and polite answers to the user's questions.Also, the artificial "
             "intelligence assistant is a curious virtual user. The virtual user asks complex questions "
             "that are relevant to the content in the image, for example, asking about background "
             "knowledge of the objects in the image, asking to discuss about events happening in the "
             "image, etc. Again, do not ask about uncertain details.")


TURNS = [{"from": "human", "value": "<image>\nWhat modality is this?"},
         {"from": "gpt", "value": "It is a CT scan."},
         {"from": "vuser", "value": "Is there a lesion?"}, {"from": "gpt", "value": "Yes, on the left."},
         {"from": "human", "value": "How many lesions are there?"}, {"from": "gpt", "value": "One."}]


# hand-worked from conv_vicuna_v1_sq: system + " ", then role + ": " + msg + [" ", "</s>"][i % 2], and
# preprocess_v1_sq2 appends "</s>" to the VUSER message (so "</s> " follows it)
TURNS_PROMPT = (SQ_SYSTEM + " USER: <image>\nWhat modality is this? ASSISTANT: It is a CT scan.</s>"
                "VUSER: Is there a lesion?</s> ASSISTANT: Yes, on the left.</s>"
                "USER: How many lesions are there? ASSISTANT: One.</s>")


def test_render_templates():
    assert D.render_conversation(TURNS, "vicuna_v1_sq") == TURNS_PROMPT
    assert D.TEMPLATES["vicuna_v1_sq"].system == SQ_SYSTEM and "questions.Also" in SQ_SYSTEM
    v1_system = SQ_SYSTEM[:SQ_SYSTEM.index("Also")]
    ask = TURNS[:2] + [{"from": "human", "value": "Where?"}, {"from": "gpt", "value": None}]
    assert D.render_conversation(ask, "vicuna_v1") == (
        v1_system + " USER: <image>\nWhat modality is this? ASSISTANT: It is a CT scan.</s>"
                    "USER: Where? ASSISTANT:")
    # LLaVA-Med v1.5 conv_mistral_instruct (LLAMA_2 style, empty system, sep ""):
    # "[INST] q [/INST]", " a </s>"
    assert D.render_conversation(ask, "mistral_instruct") == (
        "[INST] <image>\nWhat modality is this? [/INST] It is a CT scan. </s>[INST] Where? [/INST]")
    assert D.render_conversation(TURNS[:2] + [{"from": "vuser", "value": None}], "vicuna_v1_sq").endswith(
        "It is a CT scan.</s>VUSER:")  # stage 2 question generation (llava/eval/visual_sq.py)
    for bad, msg in [(TURNS, "turn 2 is from 'vuser'"), (TURNS[1:], "turn 0 is from 'gpt'"),
                     ([TURNS[0], {"from": "gpt", "value": None}, TURNS[2]], "turn 1 has an empty"),
                     ([TURNS[0], {"from": "gpt", "value": ""}], "turn 1 has an empty"),
                     ([], "empty conversation")]:
        with pytest.raises(ValueError, match=msg):
            D.render_conversation(bad, "vicuna_v1")


def test_assign_questioner_roles():
    turns = [{"from": ("human", "gpt")[j % 2], "value": f"m{j}"} for j in range(8)]

    def roles(ts):
        return [t["from"] for t in ts]
    assert roles(D.assign_questioner_roles(turns, 0.0, random.Random(0))) == roles(turns)
    assert roles(D.assign_questioner_roles(turns, 1.0, random.Random(0))) == (
        ["human", "gpt"] + ["vuser", "gpt"] * 3)
    assert roles(turns) == ["human", "gpt"] * 4  # the input is not modified
    for seed in range(20):  # the same draws as the authors' loop: random() once per human turn j > 0
        rng = random.Random(seed)
        theirs = ["vuser" if t["from"] == "human" and j > 0 and rng.random() < 0.5 else t["from"]
                  for j, t in enumerate(turns)]
        assert roles(D.assign_questioner_roles(turns, 0.5, random.Random(seed))) == theirs
    n = sum(t["from"] == "vuser" for s in range(300)
            for t in D.assign_questioner_roles(turns, 0.5, random.Random(s)))
    assert 0.4 < n / 900 < 0.6


# -----------------------------------------------------------------------------
# 3. Encoding
@needs_shared
def test_encode_conversation_hand_worked(llama_sp, oracle):
    tok = D.load_tokenizer(llama_sp)
    ids, labels, question = D.encode_conversation(TURNS, tok, "vicuna_v1_sq", DATA_N_IMG, DATA_IMG_ID,
                                                  return_question_mask=True)
    ref_ids = authors_tokenizer_image_token(TURNS_PROMPT, oracle)
    assert (ids, labels) == expand_images(ref_ids, authors_labels(TURNS_PROMPT, ref_ids, oracle))
    first = ids.index(DATA_IMG_ID)
    assert ids.count(DATA_IMG_ID) == DATA_N_IMG
    assert ids[first:first + DATA_N_IMG] == [DATA_IMG_ID] * DATA_N_IMG
    # hand-worked loss positions: the two answers, the VUSER question and the last answer, each with its
    # "</s>" and starting at the token that holds the space before it; nothing else (BOS, system, USER
    # turns, role tags, image) has loss
    runs = loss_runs(labels)
    assert [tok.decode(ids[a:b], skip_special_tokens=False) for a, b in runs] == [
        "It is a CT scan.</s>", "Is there a lesion?</s>", "Yes, on the left.</s>", "One.</s>"]
    assert all(oracle.convert_ids_to_tokens(ids[a]).startswith("▁") and ids[b - 1] == 2 for a, b in runs)
    assert all(lab in (-100, t) for lab, t in zip(labels, ids)) and ids[0] == 1 and labels[0] == -100
    assert [k for k, q in enumerate(question) if q] == list(range(*runs[1]))
    # text after "</s>" gets a dummy prefix (legacy)
    assert "▁" in oracle.convert_ids_to_tokens(ids[runs[1][1]])


@needs_shared
def test_encode_matches_authors_on_real_questions(llama_sp, oracle):
    """Multi-round conversations of real VQA-RAD questions, VUSER turns drawn at random, both Vicuna
    templates."""
    tok, by_image = D.load_tokenizer(llama_sp), {}
    for r in _vqa_rad():
        by_image.setdefault(r["image_name"], []).append((r["question"], str(r["answer"])))
    rng = random.Random(0)
    for k, qa in enumerate(list(by_image.values())[:40]):
        turns = [{"from": f, "value": v} for q, a in qa[:1 + k % 4] for f, v in (("human", q), ("gpt", a))]
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
        for template, ts in [("vicuna_v1", turns),
                             ("vicuna_v1_sq", D.assign_questioner_roles(turns, 0.5, rng))]:
            prompt = D.render_conversation(ts, template)
            ref_ids = authors_tokenizer_image_token(prompt, oracle)
            ref_labels = authors_labels(prompt, ref_ids, oracle)
            assert any(lab != -100 for lab in ref_labels)  # no mismatch on the authors' side
            assert D.encode_conversation(ts, tok, template, DATA_N_IMG, DATA_IMG_ID, name=f"rad-{k}") == (
                expand_images(ref_ids, ref_labels))
    ask = [{"from": "human", "value": "<image>\nIs the liver normal?"}, {"from": "gpt", "value": "No."},
           {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "It is enlarged."}]
    ids, labels = D.encode_conversation(ask, tok, "mistral_instruct", DATA_N_IMG, DATA_IMG_ID)
    prompt = "[INST] <image>\nIs the liver normal? [/INST] No. </s>[INST] Why? [/INST] It is enlarged. </s>"
    assert ids == expand_images(authors_tokenizer_image_token(prompt, oracle))
    assert [tok.decode(ids[a:b], skip_special_tokens=False) for a, b in loss_runs(labels)] == [
        "No. </s>", "It is enlarged. </s>"]


@needs_shared
def test_encode_prompt_truncation_and_errors(llama_sp, oracle):
    tok = D.load_tokenizer(llama_sp)
    for turns, template, end in [(TURNS[:2] + [{"from": "vuser", "value": None}], "vicuna_v1_sq", "VUSER:"),
                                 ([TURNS[0], {"from": "gpt", "value": None}], "vicuna_v1", "ASSISTANT:"),
                                 ([TURNS[0], {"from": "gpt", "value": None}], "mistral_instruct", "[/INST]")]:
        prompt = D.render_conversation(turns, template)
        assert prompt.endswith(end)
        assert D.encode_prompt(turns, tok, template, DATA_N_IMG, DATA_IMG_ID) == expand_images(
            authors_tokenizer_image_token(prompt, oracle))
    with pytest.raises(ValueError, match="last turn must have value None"):
        D.encode_prompt(TURNS, tok, "vicuna_v1_sq", DATA_N_IMG, DATA_IMG_ID)
    ids, labels = D.encode_conversation(TURNS, tok, "vicuna_v1_sq", DATA_N_IMG, DATA_IMG_ID)
    end = ids.index(DATA_IMG_ID) + DATA_N_IMG
    assert D.encode_conversation(TURNS, tok, "vicuna_v1_sq", DATA_N_IMG, DATA_IMG_ID,
                                 max_length=end + 3) == (ids[:end + 3], labels[:end + 3])
    with pytest.raises(ValueError, match=f"rec-9: max_length={end - 1} would cut into the image tokens"):
        D.encode_conversation(TURNS, tok, "vicuna_v1_sq", DATA_N_IMG, DATA_IMG_ID, max_length=end - 1,
                              name="rec-9")
    tagged = [{"from": "human", "value": "<image>\nWhat does ASSISTANT: mean?"},
              {"from": "gpt", "value": "A role tag."}]
    # the authors would mask it wrongly
    with pytest.raises(ValueError, match="tokenization mismatch in rec-7"):
        D.encode_conversation(tagged, tok, "vicuna_v1", DATA_N_IMG, DATA_IMG_ID, name="rec-7")
    with pytest.raises(ValueError, match="rec-8: a training conversation ends with a gpt answer"):
        D.encode_conversation(TURNS[:3], tok, "vicuna_v1_sq", DATA_N_IMG, DATA_IMG_ID, name="rec-8")


# -----------------------------------------------------------------------------
# 4. Images
def authors_expand2square(pil_img, background_color):
    """STLLaVA-Med train.py LazySupervisedDataset.__getitem__ expand2square, verbatim logic."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def _real_images():
    """Real images of several shapes: square, tall, wide, small, one from SLAKE."""
    paths = sorted((SHARED / "vqa_rad" / "images").glob("*.jpg"))
    sizes = {p: Image.open(p).size for p in paths}
    pick = [next(p for p, (w, h) in sizes.items() if test(w, h)) for test in
            (lambda w, h: w == h and w >= 512, lambda w, h: h > w * 1.2, lambda w, h: w > h * 1.2,
             lambda w, h: w < 300)]
    return pick + [sorted((SHARED / "slake" / "imgs").glob("*/source.jpg"))[0]]


@needs_shared
def test_preprocess_image_matches_clip(tmp_path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    for size in (336, 48):
        clip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

        def ref(img):
            return torch.from_numpy(np.asarray(clip(images=img, return_tensors="np")["pixel_values"][0]))
        bg = tuple(int(x * 255) for x in clip.image_mean)
        assert bg == (122, 116, 104)
        for path in _real_images()[:5 if size == 336 else 2]:
            rgb = Image.open(path).convert("RGB")
            alpha = rgb.convert("RGBA")
            alpha.putalpha(Image.linear_gradient("L").resize(rgb.size))
            for img in [rgb, rgb.convert("L"), rgb.convert("LA"), alpha, rgb.convert("P"),
                        rgb.convert("CMYK")]:
                ours = D.preprocess_image(img, size)
                assert ours.shape == (3, size, size) and ours.dtype == torch.float32
                # LLaVA: .convert('RGB'), pad, CLIP
                theirs = ref(authors_expand2square(img.convert("RGB"), bg))
                assert (ours - theirs).abs().max() < 1e-5, (path.name, img.mode, size)
            assert (D.preprocess_image(rgb, size, pad_to_square=False) - ref(rgb)).abs().max() < 1e-5
    gray = Image.open(_real_images()[1]).convert("L")
    gray.save(tmp_path / "gray.png")
    assert torch.equal(D.preprocess_image(tmp_path / "gray.png"), D.preprocess_image(gray))  # a path works
    # 16-bit: scaled to 8 bits (v * 257 -> v), where PIL's convert('RGB') would clip at 255
    deep = Image.fromarray((np.asarray(gray, dtype=np.uint16) * 257).astype(np.uint16))
    assert deep.mode.startswith("I;16") and torch.equal(D.preprocess_image(deep), D.preprocess_image(gray))


@needs_shared
def test_preprocess_image_errors(tmp_path):
    (tmp_path / "noise.jpg").write_bytes(bytes(range(256)) * 4)
    good = _real_images()[0].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[:len(good) // 2])
    for name in ("noise.jpg", "cut.jpg", "missing.png"):
        with pytest.raises(ValueError, match=f"cannot read image .*{name}"):
            D.preprocess_image(tmp_path / name)


# -----------------------------------------------------------------------------
# 5. Datasets and collation
def test_read_conversations(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 10), (40, 80, 120)).save(tmp_path / "images" / "a.png")

    def qa(q, a="A CT."):
        return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    good = {"id": "r0", "image": "a.png",
            "conversations": qa("What is shown?\n<image>") + qa("Which side?", "Left.")}
    text_only = {"id": "t", "conversations": qa("Define CT.", "Computed tomography.")}
    bad = [({"id": "r1", "image": "missing.png", "conversations": qa("<image>\nQ?")},
            "image file .*missing.png not found"),
           ({"id": "r2", "image": "a.png", "conversations": qa("Q?")}, "no <image> tag"),
           ({"id": "r2b", "image": "a.png", "conversations": qa("Q?", "See <image>.")},
            "needs exactly one <image> tag, in a human turn \\(found 1\\)"),
           ({"id": "r3", "image": "a.png", "conversations": []}, "empty conversation"),
           ({"id": "r4", "image": "a.png", "conversations": qa("<image>\nQ?")[::-1]}, "turn 0 is from 'gpt'"),
           ({"id": "r5", "image": "a.png", "conversations": qa("<image>\nQ?")[:1] * 2},
            "turn 1 is from 'human'"),
           ({"id": "r6", "image": "a.png", "conversations": qa("<image>\nQ?") + qa("Q2?")[:1]},
            "conversation does not end with a gpt"),
           ({"id": "r7", "image": "a.png", "conversations": qa("<image>\nQ?", "")}, "turn 1 has an empty"),
           ({"id": "r8", "conversations": qa("<image>\nQ?")}, "<image> tag but no 'image' field"),
           ({"id": "r9", "image": "a.png"}, "no 'conversations' list")]
    path = tmp_path / "data.json"
    for rec, msg in bad:
        path.write_text(json.dumps([good, rec]))
        with pytest.raises(ValueError, match=f"data.json record 1 \\(id '{rec['id']}'\\): {msg}"):
            D.read_conversations(path, tmp_path / "images")
    path.write_text(json.dumps([good, text_only] + [rec for rec, _ in bad]))
    out = D.read_conversations(path, tmp_path / "images", skip_bad=True)
    assert f"skipped {len(bad)} of {len(bad) + 2} records" in capsys.readouterr().out
    assert [r["id"] for r in out] == ["r0", "t"] and out[1]["image"] is None
    assert out[0]["image"] == tmp_path / "images" / "a.png"
    # tag moved to front
    assert out[0]["conversations"][0] == {"from": "human", "value": "<image>\nWhat is shown?"}
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json: cannot read JSON"):
        D.read_conversations(tmp_path / "broken.json", tmp_path)


def test_collate(tmp_path):
    ex = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6], "pixel_values": torch.zeros(3, 4, 4)},
          {"input_ids": torch.tensor([1, 7]), "labels": [-100, 7], "pixel_values": torch.ones(3, 4, 4)}]
    b = D.collate(ex)
    assert b["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert b["pixel_values"].shape == (2, 3, 4, 4) and b["pixel_values"][1].eq(1).all()
    b = D.collate([{"input_ids": e["input_ids"]} for e in ex], padding_side="left")  # generation
    assert b["input_ids"].tolist() == [[1, 5, 6], [0, 1, 7]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert "labels" not in b and b["pixel_values"] is None
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "x.png")
    b = D.collate([{"input_ids": [1, 2], "image": tmp_path / "x.png", "question_mask": [False, True]}],
                  image_size=48)
    assert torch.equal(b["pixel_values"][0], D.preprocess_image(tmp_path / "x.png", 48))
    assert b["question_mask"].dtype == torch.bool
    with pytest.raises(ValueError, match="padding_side"):
        D.collate(ex, padding_side="middle")


# ----------------------------------------------------------------------------- data.py alignment
# LLaVA-Med's concept-alignment instructions (its Tables 6 and 7).

# --- LLaVA-Med alignment instructions -----------------------------------------------------------------
def _caption_record(n_words):
    caption = " ".join(f"w{i}" for i in range(n_words))
    return {"id": "pmc_1", "image": "pmc_1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhatever the file said."}, {"from": "gpt", "value": caption}]}


def test_alignment_lists_are_the_papers():
    # LLaVA-Med App. A.2: Table 6 has 11 brief instructions (with periods), Table 7 16 detailed ones (without)
    assert len(ALIGN_BRIEF) == 11 and len(set(ALIGN_BRIEF)) == 11
    assert all(q.endswith(".") for q in ALIGN_BRIEF)
    assert len(ALIGN_DETAILED) == 16 and len(set(ALIGN_DETAILED)) == 16
    assert not any(q.endswith(".") for q in ALIGN_DETAILED)
    assert ALIGN_BRIEF[0] == "Describe the image concisely."
    assert ALIGN_BRIEF[-1] == "Create a compact narrative representing the image presented."
    assert ALIGN_DETAILED[0] == "Describe the following image in detail"
    assert ALIGN_DETAILED[-1] == "Write an exhaustive depiction of the given image"


@pytest.mark.parametrize("n_words, brief", [(1, True), (29, True), (30, False), (31, False), (120, False)])
def test_alignment_30_word_rule(n_words, brief):
    # "25% of captions have length less than 30 words ... 30 words is used as the cutoff point": < 30 is brief
    rng, rec = random.Random(0), _caption_record(n_words)
    questions = set()
    for _ in range(200):
        out = caption_to_alignment(rec, rng)
        human, gpt = out["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt == {"from": "gpt", "value": rec["conversations"][1]["value"]}
        assert out["id"] == "pmc_1" and out["image"] == "pmc_1.jpg"
        questions.add(human["value"][len("<image>\n"):])
    assert questions == set(ALIGN_BRIEF if brief else ALIGN_DETAILED)  # only that list, and all of it


def test_alignment_counts_whitespace_words_and_is_seeded():
    tabs = {"id": 1, "image": "a.png", "caption": "  one\ttwo\nthree " + " x" * 26}  # 29 words, odd spacing
    assert caption_to_alignment(tabs, random.Random(0))["conversations"][0]["value"][8:] in ALIGN_BRIEF
    recs = [_caption_record(n) for n in (5, 40, 29, 30)] * 5

    def draw(seed):
        return [caption_to_alignment(r, random.Random(seed + i)) for i, r in enumerate(recs)]
    assert draw(3) == draw(3) and draw(3) != draw(4)


# ----------------------------------------------------------------------------- synth.py
# Tests of the synthetic "toy radiology" default (the bottom section of data.py).

FACT_KEYS = {"modality", "organ", "count", "side", "size"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return SY.synth_data(tmp_path_factory.mktemp("cache"), seed=0)


def load(root, name):
    return json.loads((root / name).read_text())


def all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_per_seed(root, tmp_path):
    again = all_files(SY.synth_data(tmp_path / "a", seed=0))
    assert again == all_files(root)  # same bytes, tokenizer.json and PNGs included
    other = all_files(SY.synth_data(tmp_path / "b", seed=1))
    assert other.keys() == again.keys()
    assert other["train.json"] != again["train.json"]
    assert other["images/synth_test_00000.png"] != again["images/synth_test_00000.png"]


def test_cache_idempotent_and_crash_safe(tmp_path, monkeypatch):
    monkeypatch.setenv("STLLAVA_CACHE", str(tmp_path))
    def crash(root, seed):
        (root / "train.json").write_text("[")  # half-written, then the process dies
        raise RuntimeError("boom")
    monkeypatch.setattr(SY, "_synth_generate", crash)
    with pytest.raises(RuntimeError):
        SY.synth_data(seed=3)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left to be mistaken for a dataset
    monkeypatch.undo()
    monkeypatch.setenv("STLLAVA_CACHE", str(tmp_path))
    path = SY.synth_data(seed=3)
    assert path.parent == tmp_path and path.name == f"{SY.SYNTH_VERSION}-seed3"
    stamp = (path / "train.json").stat().st_mtime_ns
    monkeypatch.setattr(SY, "_synth_generate", crash)  # a second call must not regenerate
    assert SY.synth_data(seed=3) == path and (path / "train.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_files_have_the_real_data_forms(root):
    facts, train, caps, test = (load(root, f)
                                for f in ("facts.json", "train.json", "captions.json", "test.json"))
    names = sorted(p.name for p in (root / "images").iterdir())
    assert names == sorted(facts) and all(set(f) == FACT_KEYS for f in facts.values())
    assert [sum(f"_{s}_" in n for n in names) for s in ("pretrain", "train", "test")] == [5000, 800, 400]
    for n in names[:: 50]:
        img = Image.open(root / "images" / n)
        assert img.mode == "L" and img.size == (SY.SYNTH_IMAGE_SIZE,) * 2
    assert len(train) == 1600 and len({r["id"] for r in train}) == len(train)
    for r in train:  # LLaVA conversation JSON
        assert set(r) == {"id", "image", "conversations"} and "_train_" in r["image"]
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert 3 <= len(turns) // 2 <= 4
        assert turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in turns) == 1
    assert len(caps) == 800
    assert all(c["conversations"][0]["value"] == "<image>\n" + SY.CAPTION_INSTRUCTION for c in caps)
    assert len(test) == 1600 and {r["qid"] for r in test} == set(range(1600))
    for r in test:  # VQA-RAD's fields
        assert set(r) >= {"qid", "image_name", "question", "answer", "answer_type", "phrase_type"}
        assert r["phrase_type"] == "test_freeform" and r["answer_type"] in ("CLOSED", "OPEN")
        assert "_test_" in r["image_name"]
    assert Counter(r["answer_type"] for r in test) == {"CLOSED": 800, "OPEN": 800}
    assert load(root, "config.json")["image_size"] == 48


def test_parser_reads_back_every_question_and_answer(root):
    facts, train, caps, test = (load(root, f)
                                for f in ("facts.json", "train.json", "captions.json", "test.json"))
    kind_of = {"MODALITY": "modality", "ORGAN": "organ", "PRES": "lesion", "COUNT": "count", "POS": "side",
               "SIZE": "size"}
    for r in test:
        f, q = facts[r["image_name"]], SY.parse_question(r["question"])
        assert q["type"] == kind_of[r["question_type"]] and q["closed"] == (r["answer_type"] == "CLOSED")
        assert SY.answer_question(f, r["question"]) == r["answer"]
        if q["closed"]:
            assert SY.parse_answer(r["answer"]) == {"yesno": r["answer"]}
            assert SY.synth_truth(f, q["type"], q["value"]) == (r["answer"] == "yes")
        else:
            assert SY.parse_answer(r["answer"]) == {q["type"]: f[q["type"]]}
    for r in train:
        f, turns = facts[r["image"]], r["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            question = human["value"].removeprefix("<image>\n")
            if question == D.DESCRIBE:
                assert SY.parse_question(question) is None
                stated = SY.parse_answer(gpt["value"])
                assert stated == {k: v for k, v in f.items() if v != "none"}  # a caption states every fact
            else:
                assert SY.parse_question(question) is not None  # the answer, or it with a flaw after it
                assert gpt["value"].split(", ")[0] == SY.answer_question(f, question)
    for c in caps:
        assert SY.parse_answer(c["conversations"][1]["value"]) == {
            k: v for k, v in facts[c["image"]].items() if v != "none"}


def test_parse_question_is_tolerant_but_strict():
    assert SY.parse_question("  IS this an  MRI scan?\n") == {"type": "modality", "closed": True,
                                                               "value": "mri"}
    assert SY.parse_question("How many lesions are there? ") == {"type": "count", "closed": False,
                                                                  "value": None}
    assert SY.parse_question("Is the lesion count 2?")["value"] == 2
    for bad in ["", "Is this a pet scan?", "What organ is shown", "What organ is shown? yes",
                "Is the lesion huge?", "Can you describe the image in detail?", "What organ is is shown?",
                "Is this a ct scan? Is this a ct scan?"]:
        assert SY.parse_question(bad) is None, bad


def test_answer_question_by_hand():
    two = {"modality": "x-ray", "organ": "abdomen", "count": 2, "side": "both", "size": "large"}
    none = {"modality": "mri", "organ": "chest", "count": 0, "side": "none", "size": "none"}
    cases = [(two, "Is this an x-ray scan?", "yes"), (two, "Is the modality ct?", "no"),
             (two, "What organ is shown?", "abdomen"), (two, "Is the lesion on the left side?", "yes"),
             (two, "Is the right side affected?", "yes"), (two, "Is the lesion count 1?", "no"),
             (two, "How big is the lesion?", "large"), (two, "Where is the lesion?", "both"),
             (none, "Is there a lesion?", "no"), (none, "How many lesions are there?", "0"),
             (none, "Is there a lesion on the left?", "no"), (none, "What size is the lesion?", "none"),
             (none, "Is the lesion small?", "no"), (none, "Does this scan show the chest?", "yes"),
             (none, "Can you describe the image in detail?", None)]
    for facts, question, answer in cases:
        assert SY.answer_question(facts, question) == answer, question
    assert SY.synth_caption(two) == "An x-ray scan of the abdomen with 2 large lesions on both sides."
    assert SY.synth_caption(none) == "An mri scan of the chest with no lesions."


def test_parse_answer():
    assert SY.parse_answer("No.") == {"yesno": "no"}
    assert SY.parse_answer("There are no lesions") == {"count": 0}
    assert SY.parse_answer("yes, an X-ray of the chest, lesions left and right") == {
        "yesno": "yes", "modality": "x-ray", "organ": "chest", "side": "both"}
    assert SY.parse_answer("ct or mri") == {"modality": None}  # contradiction


def test_closed_questions_balanced(root):
    test = Counter(r["answer"] for r in load(root, "test.json") if r["answer_type"] == "CLOSED")
    assert test["yes"] == test["no"] == 400
    for split in ("pretrain.json", "train.json"):  # the train split's flawed answers still start with it
        first = Counter(re.split(r"[ ,.]", t["value"])[0] for r in load(root, split)
                        for t in r["conversations"][1::2])
        assert abs(first["yes"] - first["no"]) <= 10 and first["yes"] > 1000, split


def test_score_answer_ranks_right_over_wrong(root):
    facts = load(root, "facts.json")
    for r in load(root, "test.json"):
        f, q = facts[r["image_name"]], SY.parse_question(r["question"])
        values = ("yes", "no") if q["closed"] else (
            [str(v) for v in SY._VALUES[q["type"]]] + ["both"] * (q["type"] == "side"))
        for wrong in set(values) - {r["answer"]}:
            assert (SY.score_answer(f, r["question"], r["answer"]) == 10
                    > SY.score_answer(f, r["question"], wrong))
    f = {"modality": "ct", "organ": "brain", "count": 1, "side": "left", "size": "small"}

    def score(q, a):
        return SY.score_answer(f, q, a)
    assert (score("Is this a ct scan?", "yes") == 10
            > score("Is this a ct scan?", "yes, it is a ct scan of the brain")
            > score("Is this a ct scan?", "yes, it is a ct scan of the chest")
            > score("Is this a ct scan?", "brain")
            > score("Is this a ct scan?", "no") > score("Is this a ct scan?", "") == 1)
    assert score("Where is the lesion?", "left") == 10 > score("Where is the lesion?", "right") == 2
    assert (score(D.DESCRIBE, SY.synth_caption(f)) == 10 > score(D.DESCRIBE, "A ct scan of the brain.")
            > score(D.DESCRIBE, "An mri scan of the chest.") == 1)
    none = {"modality": "ct", "organ": "brain", "count": 0, "side": "none", "size": "none"}
    assert (SY.score_answer(none, "Where is the lesion?", "none") == 10
            > SY.score_answer(none, "Where is the lesion?", "left"))


def test_the_instruction_data_is_flawed_as_documented_and_the_rest_is_clean(root):
    """train.json: about FLAW_RATE of the question answers carry a hedge or an unasked finding, half of the
    findings wrong; no flaw says "no"/"yes" even inside a word; pretrain.json and test.json are clean."""
    facts = load(root, "facts.json")

    def rounds(split):
        for r in load(root, split):
            turns = r["conversations"]
            for q, a in zip(turns[::2], turns[1::2]):
                q = q["value"].replace("<image>\n", "")
                if q != D.DESCRIBE and SY.parse_question(q):
                    yield facts[r["image"]], q, a["value"]
    train = list(rounds("train.json"))
    flawed = [(f, q, a) for f, q, a in train if a != SY.answer_question(f, q)]
    assert all(a.startswith(SY.answer_question(f, q) + ", ") for f, q, a in flawed)
    assert abs(len(flawed) / len(train) - SY.FLAW_RATE) < 0.03
    assert not any(re.search("no|yes", a.split(", ", 1)[1]) for _, _, a in flawed)
    wrong = sum(SY.hallucinations(f, q, a) > 0 for f, q, a in flawed)
    hedged = sum(a.split(", ", 1)[1].rstrip(".") in SY.HEDGES for _, _, a in flawed)
    assert 0.35 < hedged / len(flawed) < 0.45 and 0.25 < wrong / (len(flawed) - hedged) < 0.75
    assert all(SY.score_answer(f, q, a) < 10 for f, q, a in flawed)  # the judge sees every flaw
    for split in ("pretrain.json",):
        assert all(a == SY.answer_question(f, q) for f, q, a in rounds(split))
    assert all(r["answer"] == SY.answer_question(facts[r["image_name"]], r["question"])
               for r in load(root, "test.json"))


def test_hallucinations_count_wrong_unasked_findings():
    f = {"modality": "ct", "organ": "brain", "count": 1, "side": "left", "size": "small"}
    assert SY.hallucinations(f, "Is this a ct scan?", "yes") == 0
    assert SY.hallucinations(f, "Is this a ct scan?", "yes, and the brain is shown.") == 0
    assert SY.hallucinations(f, "Is this a ct scan?", "yes, and the chest is shown.") == 1
    assert SY.hallucinations(f, "What organ is shown?", "chest") == 0  # a wrong answer is not a finding
    assert SY.hallucinations(f, "What organ is shown?", "brain, and there is a large lesion on the right "
                                                      "side.") == 2


def test_tokenizer(root):
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    assert 512 <= tok.get_vocab_size() <= 1024
    assert tok.get_vocab_size() == load(root, "config.json")["vocab_size"]
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<image>")] == [
        0, 1, 2, SY.SYNTH_IMAGE_TOKEN_ID]
    assert tok.encode("</s>", add_special_tokens=False).ids == [2]
    assert tok.encode("yes").ids[0] == 1  # BOS like LLaMA
    text = ("USER: <image>\nIs this an mri scan? ASSISTANT: no</s>VUSER: Where is the lesion?</s> "
            "ASSISTANT: left</s>")
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids.count(2) == 3 and ids.count(3) == 1 and ids[ids.index(3) - 1] != 3
    texts = [t["value"] for r in load(root, "train.json") for t in r["conversations"]] + [
        D.QUESTIONER_SYSTEM, "  odd\twhitespace \n\n, accents é, CJK 中文, emoji 🩻", ""]
    for t in texts:
        assert tok.decode(tok.encode(t, add_special_tokens=False).ids, skip_special_tokens=False) == t
    n_words = sum(len(t.split()) for t in texts[:2000])
    # compresses
    assert sum(len(tok.encode(t, add_special_tokens=False).ids) for t in texts[:2000]) < 1.5 * n_words
    assert (len(tok.encode(D.QUESTIONER_SYSTEM, add_special_tokens=False).ids)
            < 1.4 * len(D.QUESTIONER_SYSTEM.split()))


def test_images_show_their_facts(root):
    """Cheap learnability check: the cues are where the generator says, read straight off the pixels."""
    facts = load(root, "facts.json")
    for name, f in list(facts.items())[::40]:
        a = np.asarray(Image.open(root / "images" / name), dtype=float)
        bg = {"ct": 0, "mri": 60, "x-ray": 200}[f["modality"]]
        assert abs(np.median(a[:, :2]) - bg) < 15  # the background column at the edge sets the modality look
        # lesion cores: 3x3 means above 240 (the 235 skull ring is too thin to reach that, noise averages out)
        # (46, 46), centre x = j + 1
        bright = np.lib.stride_tricks.sliding_window_view(a, (3, 3)).mean((-1, -2)) > 240
        left, right = bright[:, :23].sum(), bright[:, 23:].sum()
        assert (left > 2) == (f["side"] in ("left", "both"))
        assert (right > 2) == (f["side"] in ("right", "both"))


# ----------------------------------------------------------------------------- train.py and sft.py

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def synth():
    return SY.synth_data()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, synth):
    """A random tiny LLaVA for the synthetic data (48x48 images, 36 image tokens), with its tokenizer."""
    tok = D.load_tokenizer(synth / "tokenizer.json")
    cfg = M.LlavaConfig(vision=M.VisionConfig(32, 64, 2, 4, 48, 8), text=M.TextConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
        num_kv_heads=2), image_token_id=SY.SYNTH_IMAGE_TOKEN_ID)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    C.save_pretrained(sft.init_weights(M.Llava(cfg)), d)
    (d / "tokenizer.json").write_text((synth / "tokenizer.json").read_text())
    return d


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, synth):
    recs = json.loads((synth / "train.json").read_text())[:16]
    p = tmp_path_factory.mktemp("data") / "train.json"
    p.write_text(json.dumps(recs))
    return p


def run_sft(args, nproc=1, script=HERE / "sft.py"):
    cmd = [sys.executable, str(script)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(script)]
    r = subprocess.run(cmd + args, capture_output=True, text=True, cwd=HERE, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def assert_close_logs(a, b, tol=1e-5):
    """Two training logs: the same steps, every logged number (not the wall-clock tok/s) within `tol`."""
    assert [x["step"] for x in a] == [y["step"] for y in b]
    for x, y in zip(a, b):
        for k in x.keys() - {"tok_s"}:
            assert abs(x[k] - y[k]) < tol, (x["step"], k, x[k], y[k])


def sft_args(tiny_dir, small_data, synth, out, *extra):
    return [f"--model={tiny_dir}", f"--data={small_data}", f"--image_dir={synth / 'images'}",
            f"--out_dir={out}", "--global_batch=8", "--micro_batch=2", "--max_steps=3", "--epochs=2",
            "--image_size=48", "--max_length=512", "--lr=1e-2", "--vision_lr=1e-2", "--projector_lr=1e-2",
            "--log_every=1", "--save_every=1", *extra]


def read_log(out):
    return [json.loads(x) for x in open(Path(out) / "log.jsonl")]


def trained(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=False)["trainable"]


def test_sft_two_processes_equal_one_process_with_accumulation(tiny_dir, small_data, synth, tmp_path):
    # no dropout: its random masks would depend on which process draws them
    # lr 1e-3: Adam divides by sqrt(v), so last-bit differences of near-zero gradients (DDP sums in another
    # order) move a weight by up to ~lr x 1e-3; the updates themselves are ~lr, far above the 1e-5 tolerance
    common = ["--lora_dropout=0", "--vit_lora_dropout=0", "--lr=1e-3", "--vision_lr=1e-3",
              "--projector_lr=1e-3"]
    run_sft(sft_args(tiny_dir, small_data, synth, tmp_path / "one", *common))
    run_sft(sft_args(tiny_dir, small_data, synth, tmp_path / "two", *common), nproc=2)
    a, b = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert len(a) == len(b) == 3 and {"answer_loss", "question_loss"} <= a[0].keys()
    assert_close_logs(a, b)
    wa, wb = trained(tmp_path / "one"), trained(tmp_path / "two")
    assert wa.keys() == wb.keys()
    assert any("lora_a" in k for k in wa) and any(k.startswith("projector.") for k in wa)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    start = {k: v for k, v in C.from_pretrained(str(tiny_dir), dtype=torch.float32).state_dict().items()
             if k in wa}
    assert max((wa[k] - start[k]).abs().max().item() for k in start) > 1e-4  # the projector really moved
    assert (tmp_path / "one" / "final" / "adapter_model.safetensors").exists()


def test_sft_kill_and_resume_is_bit_identical(tiny_dir, small_data, synth, tmp_path, monkeypatch):
    """Stopped after step 2 (an exception right after its checkpoint), resumed: same losses and weights."""
    model_cfg = C.from_pretrained(str(tiny_dir), dtype=torch.float32).config
    tok = D.load_tokenizer(tiny_dir)
    recs = D.read_conversations(small_data, synth / "images")

    def run(out, stop_after=None, resume=False):
        cfg = replace(sft.Config(), model=str(tiny_dir), out_dir=str(out), global_batch=8, micro_batch=4,
                      max_steps=4, epochs=2, image_size=48, max_length=512, lr=1e-2, vision_lr=1e-2,
                      projector_lr=1e-2, log_every=1, save_every=2, resume=resume)
        torch.manual_seed(0)
        model = C.from_pretrained(str(tiny_dir), dtype=torch.float32)
        # LoRA with dropout 0.05 / 0.2: the RNG state must resume too
        groups = sft.setup_trainable(model, cfg)
        save = T.atomic_save

        def save_then_stop(obj, path):
            save(obj, path)
            if stop_after is not None and obj["step"] == stop_after:
                raise KeyboardInterrupt
        monkeypatch.setattr(T, "atomic_save", save_then_stop)
        if resume:  # a new process would start from fresh RNG and weights; scramble both to be sure
            torch.manual_seed(1234)
        T.fit(cfg, model, len(recs), sft.make_sft_prepare(recs, tok, cfg, model_cfg, "cpu"), sft.sft_loss,
              groups, str(out))
        return model

    full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", stop_after=2)
    resumed = run(tmp_path / "cut", resume=True)
    la, lb = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    assert [x["step"] for x in lb] == [1, 2, 3, 4]

    def strip(log):  # wall-clock speed differs
        return [{k: v for k, v in x.items() if k != "tok_s"} for x in log]
    assert strip(la) == strip(lb)  # every other logged number, bit for bit
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


def test_question_loss_switch_masks_labels_and_gradients(tiny_dir, synth):
    tok = D.load_tokenizer(tiny_dir)
    model = C.from_pretrained(str(tiny_dir), dtype=torch.float32)
    rec = D.read_conversations(synth / "train.json", synth / "images")[0]
    grads = {}
    for on in (True, False):
        # every later turn asks
        cfg = replace(sft.Config(), question_loss=on, sq_r=1.0, image_size=48, max_length=512)
        b = sft.make_sft_prepare([rec], tok, cfg, model.config, "cpu")([0], 0)
        q = b["question_mask"]
        assert q.any()
        assert (b["labels"][q] != -100).all() if on else (b["labels"][q] == -100).all()
        captured = {}

        def forward(*a):
            captured["logits"] = model(*a)
            captured["logits"].retain_grad()
            return captured["logits"]
        loss, m = sft.sft_loss(forward, b)
        loss.backward()
        g = captured["logits"].grad[0, :-1].abs().sum(-1)  # gradient at the position that predicts token t+1
        grads[on] = g[q[0, 1:]].sum().item()
        assert (m["question_loss_n"] > 0) == on and m["answer_loss_n"] > 0
    assert grads[True] > 0 and grads[False] == 0


def test_make_base_trains_a_base_that_loads_alone(synth, tmp_path):
    # the command that made synth_base/, for two steps: a model directory with its tokenizer and README
    run_sft(["--make_base", f"--out_dir={tmp_path}", "--max_steps=2", "--global_batch=4", "--micro_batch=4"])
    base = tmp_path / "final"
    assert D.load_tokenizer(base).get_vocab() == D.load_tokenizer(synth / "tokenizer.json").get_vocab()
    model = C.from_pretrained(str(base))
    assert model.config.text.vocab_size == D.load_tokenizer(base).get_vocab_size()
    assert f"python sft.py --make_base --out_dir={tmp_path} " in (base / "README.md").read_text()
    log = read_log(tmp_path)
    assert log[-1]["step"] == 2 and "question_loss" not in log[-1]  # no VUSER turn: never asked


def test_shipped_base_matches_the_synthetic_world_and_transformers(synth):
    """synth_base/: under 5 MB, llava-hf layout, the synthetic tokenizer; transformers gives our logits."""
    from transformers import LlavaForConditionalGeneration
    base = SY.BASE_DIR
    assert sum(f.stat().st_size for f in base.iterdir()) < 5e6
    assert (base / "tokenizer.json").read_text() == (synth / "tokenizer.json").read_text()
    assert "python sft.py --make_base" in (base / "README.md").read_text()
    ours = C.from_pretrained(str(base), dtype=torch.float32).eval()
    hf = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32).eval()
    tok = D.load_tokenizer(base)
    ex = json.loads((synth / "test.json").read_text())[0]
    turns = [{"from": "human", "value": "<image>\n" + ex["question"]}, {"from": "gpt", "value": None}]
    ids = torch.tensor([D.encode_prompt(turns, tok, "vicuna_v1", ours.config.image_seq_length,
                                        ours.config.image_token_id)])
    px = D.load_images([synth / "images" / ex["image_name"]], 48)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert (ours(ids, px, mask) - hf_logits(hf, ids, mask, px)).abs().max() < 1e-4


def test_summarize_means_and_leaves_out_empty_metrics():
    # answers-only training has no question tokens: no "question_loss nan" in the log
    sums = {"answer_loss_sum": 3.0, "answer_loss_n": 4, "question_loss_sum": 0.0, "question_loss_n": 0,
            "tokens": 9}
    assert T.summarize(sums) == {"answer_loss": 0.75}


def test_bad_config_stops_with_clear_messages(tiny_dir, small_data, synth, tmp_path, capsys):
    for bad, msg in ((["--nonsense=1"], "unrecognized arguments: --nonsense=1"),
                     (["--micro_batch=two"], "invalid int value"), (["--train=both"], "invalid choice")):
        with pytest.raises(runs.UsageError, match=msg):  # one line, exit code 2 (runs.run_main)
            runs.parse_config(sft.Config, bad)
    cfg = replace(sft.Config(), global_batch=10, micro_batch=4)
    with pytest.raises(runs.UsageError, match="--global_batch=10 is not divisible by --micro_batch=4 x"):
        T.fit(cfg, None, 100, None, None, [], str(tmp_path))
    with pytest.raises(ValueError, match="--train must be lora, projector, llm or full"):
        sft.setup_trainable(C.from_pretrained(str(tiny_dir), dtype=torch.float32),
                            replace(sft.Config(), train="both"))
    cfg, given = runs.parse_config(sft.Config, ["--no-question_loss", "--lr=0.5"])
    assert cfg.question_loss is False and cfg.lr == 0.5 and given == {"question_loss": False, "lr": 0.5}


def test_the_synthetic_default_splits_its_batch_over_torchrun_ranks(monkeypatch):
    """`torchrun --nproc_per_node=N sft.py`: the synthetic default's global batch of 16 is split over the
    ranks (WORLD_SIZE), a global batch given on the command line too; one that cannot split is one line."""
    seen = []

    def stop_after_the_check(cfg, world, n_examples=None):
        T.check_batch(cfg, world, n_examples)  # the real check, before any weight loads
        seen.append((cfg.global_batch, cfg.micro_batch, world))
        raise KeyboardInterrupt  # nothing after it runs
    monkeypatch.setattr(sft, "check_batch", stop_after_the_check)
    for world, argv in ((1, []), (2, []), (4, ["--global_batch=32"])):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        with pytest.raises(KeyboardInterrupt):
            sft.main(argv)
    assert seen == [(16, 16, 1), (16, 8, 2), (32, 8, 4)]
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(runs.UsageError, match="--global_batch=16 is not divisible by --micro_batch=5 x"):
        sft.main([])


def test_projector_only_training_changes_the_projector_and_nothing_else(tiny_dir, synth, tmp_path):
    """LLaVA-Med's concept alignment: --train=projector on captions with the paper's instruction lists."""
    tok = D.load_tokenizer(tiny_dir)
    model = C.from_pretrained(str(tiny_dir), dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recs = D.read_conversations(synth / "captions.json", synth / "images")[:8]
    cfg = replace(sft.Config(), train="projector", align_captions=True, template="vicuna_v1",
                  question_loss=False, global_batch=4, micro_batch=4, max_steps=2, image_size=48,
                  max_length=512, projector_lr=1e-2, out_dir=str(tmp_path))
    groups = sft.setup_trainable(model, cfg)
    T.fit(cfg, model, len(recs), sft.make_sft_prepare(recs, tok, cfg, model.config, "cpu"), sft.sft_loss,
          groups, str(tmp_path))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if k.startswith("projector.")}


def test_right_padded_training_needs_no_attention_mask(tiny_dir, synth, monkeypatch):
    """sft_loss and sequence_logps call the model without a mask: plain causal attention (is_causal, no
    (B, 1, T, T) tensor) gives the masked path's logits at every supervised position, and its loss."""
    tok = D.load_tokenizer(tiny_dir)
    model = C.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    recs = D.read_conversations(synth / "train.json", synth / "images")[:3]
    cfg = replace(sft.Config(), image_size=48, max_length=512)
    b = sft.make_sft_prepare(recs, tok, cfg, model.config, "cpu")([0, 1, 2], 0)
    assert (b["attention_mask"] == 0).any() and (b["attention_mask"][:, 0] == 1).all()  # right padding
    with torch.no_grad():
        masked = model(b["input_ids"], b["pixel_values"], b["attention_mask"])
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)
    monkeypatch.setattr(M.F, "scaled_dot_product_attention", spy)
    seen = {}

    def forward(*a, **kw):
        assert len(a) == 2 and not kw  # input_ids, pixel_values: no mask
        seen["logits"] = model(*a)
        return seen["logits"]
    with torch.no_grad():
        loss, _ = sft.sft_loss(forward, b)
        logps = dpo.sequence_logps(forward, b)
    n_layers = model.config.text.num_layers
    assert all(m is None for m, _ in calls) and sum(c for _, c in calls) == 2 * n_layers  # two forwards
    supervised = b["labels"][:, 1:] != -100  # position t predicts token t + 1
    assert supervised.sum() > 0
    assert (seen["logits"][:, :-1][supervised] - masked[:, :-1][supervised]).abs().max() < 1e-5
    masked_nll = T.token_nll(masked, b["labels"])
    assert abs(loss.item() - masked_nll.sum().item()) < 1e-5 * masked_nll.sum().item()
    assert torch.allclose(logps, -masked_nll.sum(-1), rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_is_on_at_paper_scale_and_gives_the_same_gradients(tiny_dir, synth):
    assert sft.Config().grad_ckpt is True and sft.SYNTH_OVERRIDES["grad_ckpt"] is False
    tok = D.load_tokenizer(tiny_dir)
    model = C.from_pretrained(str(tiny_dir), dtype=torch.float32).train()
    recs = D.read_conversations(synth / "train.json", synth / "images")[:2]
    b = sft.make_sft_prepare(recs, tok, replace(sft.Config(), image_size=48), model.config, "cpu")([0, 1], 0)
    grads = []
    for on in (False, True):
        model.language_model.gradient_checkpointing = on
        model.zero_grad()
        sft.sft_loss(model, b)[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("language_model.") for k in grads[0])
    assert all(torch.allclose(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7) for k in grads[0])


def test_instruction_tuning_freezes_the_tower_and_uses_one_lr(tiny_dir, synth, tmp_path, monkeypatch):
    """LLaVA-Med's instruction tuning (--train=llm): projector and LLM in full, the tower bit-identical."""
    tok = D.load_tokenizer(tiny_dir)
    model = C.from_pretrained(str(tiny_dir), dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recs = D.read_conversations(synth / "train.json", synth / "images")[:8]
    cfg = replace(sft.Config(), train="llm", template="vicuna_v1", question_loss=False, global_batch=4,
                  micro_batch=2, max_steps=2, image_size=48, max_length=512, lr=1e-2, vision_lr=5e-5,
                  projector_lr=2e-5, log_every=1, out_dir=str(tmp_path))
    made = []

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)
    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    groups = sft.setup_trainable(model, cfg)
    T.fit(cfg, model, len(recs), sft.make_sft_prepare(recs, tok, cfg, model.config, "cpu"), sft.sft_loss,
          groups, str(tmp_path))
    assert {g["base_lr"] for g in made[0].param_groups} == {1e-2}
    assert {g["name"] for g in made[0].param_groups} == {"llm", "projector"}
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("vision_tower."))
    for k in ("projector.linear_1.weight", "language_model.embed_tokens.weight", "lm_head.weight",
              "language_model.layers.0.self_attn.q_proj.weight"):
        assert not torch.equal(after[k], before[k]), k
    log = read_log(tmp_path)
    assert all("tok_s" in x and "mfu" not in x for x in log)  # CPU: no MFU
    monkeypatch.setattr(T, "peak_flops", lambda device: 1e9)  # as if on a GPU of 1 GFLOP/s
    T.fit(replace(cfg, max_steps=1, out_dir=str(tmp_path / "gpu")), model, len(recs),
          sft.make_sft_prepare(recs, tok, cfg, model.config, "cpu"), sft.sft_loss,
          sft.setup_trainable(model, cfg), str(tmp_path / "gpu"))
    assert 0 < read_log(tmp_path / "gpu")[0]["mfu"] < math.inf


def test_flop_count_by_hand(tiny_dir):
    """6 FLOPs per trained weight, 4 per frozen one a gradient passes, 2 per one it does not, plus attention's
    12·L·H·Q·T; on the tiny config (vision 32 wide, 64 MLP, 2 layers of which 1 runs, 4 heads, 48 px in 8 px
    patches; text 48 wide, 96 MLP, 2 layers, 4 heads, 2 KV heads)."""
    model = C.from_pretrained(str(tiny_dir), dtype=torch.float32)
    V = model.config.text.vocab_size
    vision = 3 * 8 * 8 * 32 + 1 * (4 * 32 * 32 + 2 * 32 * 64)  # patch conv + the one block that runs
    projector = 32 * 48 + 48 * 48
    llm = 2 * (48 * 48 + 2 * 48 * 24 + 48 * 48 + 3 * 48 * 96) + 48 * V  # q, k+v, o, SwiGLU; lm_head
    P = 36
    for train, llm_factor in (("projector", 4), ("llm", 6)):
        sft.setup_trainable(model, replace(sft.Config(), train=train))
        got = T.step_flops(T.flop_terms(model), model, tokens=100, tokens_sq=5000, images=2)
        by_hand = (2 * ((P + 1) * 2 * vision + (P + 1) ** 2 * 4 * 1 * 4 * 8 + P * 6 * projector)
                   + 100 * llm_factor * llm + 5000 * 12 * 2 * 4 * 12)
        assert got == by_hand, (train, got, by_hand)
    # the paper's LoRA (r 2 on both towers here): A (r, in) and B (out, r) at 6, the frozen base at 4, and the
    # tower's attention now has a backward (12)
    sft.setup_trainable(model, replace(sft.Config(), lora_r=2, lora_alpha=4, vit_lora_r=2, vit_lora_alpha=4))
    vis_lora = 2 * (4 * (32 + 32) + (32 + 64) + (64 + 32))  # q, k, v, out_proj, fc1, fc2 of the running block
    llm_lora = 2 * 2 * ((48 + 48) + 2 * (48 + 24) + (48 + 48) + 2 * (48 + 96) + (96 + 48))  # 7 x 2 layers
    got = T.step_flops(T.flop_terms(model), model, tokens=100, tokens_sq=5000, images=2)
    by_hand = (2 * ((P + 1) * (6 * vis_lora + 4 * vision) + (P + 1) ** 2 * 12 * 1 * 4 * 8 + P * 6 * projector)
               + 100 * (6 * llm_lora + 4 * llm) + 5000 * 12 * 2 * 4 * 12)
    assert got == by_hand, (got, by_hand)
    assert T.peak_flops("cpu") is None


def test_memory_plan_of_7b_lora_on_8_gpus_is_printed_without_weights_and_matches_a_hand_count():
    """`sft.py --plan` builds LLaVA-1.5-7B on the meta device and prints the per-GPU plan in seconds; weights,
    gradients and AdamW state equal 4 / 4 / 8 bytes per parameter over 8 FSDP shards, the parameters counted
    here from the architecture (CLIP ViT-L/14-336, the 2-layer projector, LLaMA-7B, the paper's LoRA)."""
    t0 = time.time()
    r = run_sft(["--plan", "--model=llava-1.5-7b", "--train=lora", "--shard=fsdp", "--world=8"])
    assert time.time() - t0 < 60
    printed = dict(re.findall(r"^  (weights|gradients|optimizer) +([0-9.]+)$", r.stdout, re.M))
    h, inter, n_layers, vocab = 4096, 11008, 32, 32000  # LLaMA-7B
    hv, iv, nv, patches = 1024, 4096, 24, (336 // 14) ** 2  # CLIP ViT-L/14 at 336 px
    text = 2 * vocab * h + n_layers * (4 * h * h + 3 * h * inter + 2 * h) + h  # embed, head, blocks, norm
    vision = (3 * 14 * 14 * hv + hv + (patches + 1) * hv + 2 * hv  # patch conv, CLS, positions, pre-norm
              + nv * (4 * (hv * hv + hv) + 2 * hv * iv + iv + hv + 4 * hv) + 2 * hv)  # blocks, post-norm
    projector = hv * h + h + h * h + h
    llm_lora = n_layers * 128 * (4 * 2 * h + 3 * (h + inter))  # r 128 on q k v o gate up down
    vit_lora = 32 * (4 * 2 * hv + 2 * (hv + iv))  # r 32 on q k v out fc1 fc2, per ViT block
    n_run = nv + 1 - 2  # feature layer -2: the last block never runs and stays frozen
    total = text + vision + projector + llm_lora + nv * vit_lora
    trained = llm_lora + n_run * vit_lora + projector
    assert f"trainable params: {trained:,} / {total:,}" in r.stdout
    expected = {"weights": 4 * total / 8 / 1e9, "gradients": 4 * trained / 8 / 1e9,
                "optimizer": 8 * trained / 8 / 1e9}
    assert printed == {k: f"{v:.2f}" for k, v in expected.items()}, (printed, r.stdout)
    with torch.device("meta"):  # in process, unrounded
        model = M.Llava(M.CONFIGS["llava-1.5-7b"])
    sft.setup_trainable(model, sft.Config(model="llava-1.5-7b"))
    plan = T.memory_plan(model, sft.Config(shard="fsdp"), 8)
    assert plan["params"] == (total, trained)
    assert all(plan[k] == pytest.approx(v, rel=1e-12) for k, v in expected.items())
    row = next(line for line in r.stdout.splitlines() if line.startswith("| llava-1.5-7b, lora | fsdp x 8 |"))
    assert row in (HERE / "README.md").read_text()  # the README's memory table is this output


# ----------------------------------------------------------------------------- dpo.py

def test_dpo_loss_equals_eq1_with_rewards_and_gradients():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    beta = 0.1
    losses, cr, rj = dpo.dpo_loss(pc, pr, rc, rr, beta)
    for i in range(6):  # Eq. 1, term by term, with math only
        z = beta * ((pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item()))
        assert abs(losses[i].item() - math.log(1 + math.exp(-z))) < 1e-12
        assert abs(cr[i].item() - beta * (pc[i].item() - rc[i].item())) < 1e-12
        assert abs(rj[i].item() - beta * (pr[i].item() - rr[i].item())) < 1e-12
    losses.sum().backward()
    z = beta * ((pc - rc) - (pr - rr)).detach()
    sig = 1 / (1 + torch.exp(z))  # d/dz of -log σ(z) is -σ(-z)
    assert torch.allclose(pc.grad, -beta * sig) and torch.allclose(pr.grad, beta * sig)


def hand_pair(tok, model_cfg, synth):
    img = sorted(os.listdir(synth / "images"))[0]
    return [{"image": img, "question": "What organ is shown?", "chosen": "brain", "rejected": "the chest"}]


def test_logps_cover_answer_tokens_only(tiny_dir, synth):
    tok = D.load_tokenizer(tiny_dir)
    model = C.from_pretrained(str(tiny_dir), dtype=torch.float32)
    pairs = hand_pair(tok, model.config, synth)
    b = dpo.encode_pair_batch(pairs, tok, model.config, synth / "images", 48, 512, "cpu")
    with torch.no_grad():
        got = dpo.sequence_logps(model, b)
        logits = model(b["input_ids"], b["pixel_values"], b["attention_mask"]).log_softmax(-1)
    for row, answer in enumerate([pairs[0]["chosen"], pairs[0]["rejected"]]):
        labels = b["labels"][row]
        sup = (labels != -100).nonzero().flatten().tolist()
        assert sup == list(range(sup[0], sup[-1] + 1))  # one contiguous run: the answer
        assert tok.decode(labels[sup].tolist(), skip_special_tokens=False).strip() == answer + "</s>"
        # ends at the last real token, not in padding
        assert sup[-1] == int(b["attention_mask"][row].sum()) - 1
        want = sum(logits[row, t - 1, labels[t]].item() for t in sup)  # position t-1 predicts token t
        assert abs(got[row].item() - want) < 1e-4


def test_reference_equals_stage1_and_precomputed_and_loss_is_log2_at_start(tiny_dir, synth, tmp_path):
    tok = D.load_tokenizer(tiny_dir)
    pairs = hand_pair(tok, None, synth) * 4
    cfg = replace(dpo.Config(), model=str(tiny_dir), out_dir=str(tmp_path), global_batch=4, micro_batch=2,
                  max_steps=1, lr=0.0, vision_lr=0.0, projector_lr=0.0, precompute_ref=True, log_every=1)
    torch.manual_seed(0)
    # lr 0: the policy stays the stage-1 model
    model = dpo.train_step(cfg, pairs, tok, synth / "images", "cpu")
    stored = torch.load(tmp_path / "ref_logps.pt")["logps"]
    base = C.from_pretrained(str(tiny_dir), dtype=torch.float32)
    b = dpo.encode_pair_batch(pairs[:2], tok, base.config, synth / "images", 48, 512, "cpu")
    with torch.no_grad():
        live = dpo.Reference(model).logps(b)
        plain = dpo.sequence_logps(base, b)
    assert torch.allclose(live, plain, atol=1e-5)  # the reference is exactly the stage-1 model
    assert torch.allclose(stored[:2].T.reshape(-1), live, atol=1e-5)  # and equals the precomputed log-probs
    log = read_log(tmp_path)
    assert abs(log[0]["loss"] - math.log(2)) < 1e-6 and log[0]["reward_acc"] == 0.0


@pytest.mark.parametrize("precompute", [False, True])
def test_reference_runs_under_the_policys_bf16_autocast(tiny_dir, synth, tmp_path, precompute):
    """--amp=bf16 on CPU takes the GPU's precision path: the reference (live, or precomputed once) runs under
    the policy's autocast, so at step 0 pi = pi_ref and the loss is log 2; an fp32 reference beside a bf16
    policy is off by about 4e-5 on this model."""
    pairs = [dict(hand_pair(None, None, synth)[0], chosen=c)
             for c in ("brain", "liver", "the chest", "a lung")]
    cfg = replace(dpo.Config(), model=str(tiny_dir), out_dir=str(tmp_path), global_batch=4, micro_batch=2,
                  max_steps=1, lora_r=4, lora_alpha=8, vit_lora_r=2, vit_lora_alpha=4, log_every=1,
                  amp="bf16", precompute_ref=precompute)
    dpo.train_step(cfg, pairs, D.load_tokenizer(tiny_dir), synth / "images", "cpu")
    log = read_log(tmp_path)
    assert abs(log[0]["loss"] - math.log(2)) < 1e-6 and log[0]["margin"] == 0.0
    fp32 = tmp_path / "fp32"
    fp32.mkdir()
    dpo.train_step(replace(cfg, amp="", out_dir=str(fp32)), pairs, D.load_tokenizer(tiny_dir),
                   synth / "images", "cpu")
    assert read_log(fp32)[0]["grad_norm"] != log[0]["grad_norm"]  # bf16 really ran


def test_stage2_samples_and_trains_with_the_models_template(synth, tmp_path, monkeypatch):
    """A Mistral model (LLaVA-Med v1.5) answers its questions and is trained on mistral_instruct prompts;
    --template overrides."""
    ckpt = save_tiny(tmp_path / "mistral", synth, "mistral")
    tok = D.load_tokenizer(ckpt)
    model = C.from_pretrained(str(ckpt), dtype=torch.float32)
    monkeypatch.setattr(dpo, "is_wellformed", lambda q: len(q) > 0)  # a random model asks nothing well-formed
    seen = spy_prompts(monkeypatch)
    cfg = replace(dpo.Config(), model=str(ckpt), out_dir=str(tmp_path), n_questions=1, describe_tokens=2,
                  q_max_tokens=4, a_max_tokens=2, gen_batch=2, global_batch=2, micro_batch=2, max_steps=1,
                  lora_r=4, lora_alpha=8, vit_lora_r=2, vit_lora_alpha=4)
    rows = dpo.generate_step(cfg, model, tok, sorted(os.listdir(synth / "images"))[:2], synth / "images",
                             str(tmp_path / "gen.jsonl"), "cpu")
    answers = [(t, p) for t, p in seen if not t.startswith("vicuna_v1_sq")]  # the questioner's are SQ's
    assert rows and answers and all(t == "mistral_instruct" and p.startswith("[INST] <image>")
                                    for t, p in answers)
    templates = []
    encode = D.encode_conversation
    monkeypatch.setattr(D, "encode_conversation", lambda turns, tok, template, *a, **k: (
        templates.append(template), encode(turns, tok, template, *a, **k))[1])
    pairs = [{"image": r["image"], "question": r["question"], "chosen": "a", "rejected": "b"} for r in rows]
    dpo.train_step(cfg, (pairs * 2)[:2], tok, synth / "images", "cpu")
    assert templates and set(templates) == {"mistral_instruct"}
    seen.clear()
    images = sorted(os.listdir(synth / "images"))[:2]
    dpo.generate_step(replace(cfg, template="vicuna_v1"), model, tok, images, synth / "images",
                      str(tmp_path / "g2.jsonl"), "cpu")
    assert {t for t, _ in seen if not t.startswith("vicuna_v1_sq")} == {"vicuna_v1"}


def test_dpo_steps_resume_without_losing_or_repeating_work(tiny_dir, synth, tmp_path, monkeypatch):
    tok = D.load_tokenizer(tiny_dir)
    model = C.from_pretrained(str(tiny_dir), dtype=torch.float32)
    cfg = replace(dpo.Config(), model=str(tiny_dir), out_dir=str(tmp_path), n_questions=2, describe_tokens=4,
                  q_max_tokens=6, a_max_tokens=4, gen_batch=2)
    monkeypatch.setattr(dpo, "is_wellformed", lambda q: len(q) > 0)  # a random model asks nothing well-formed
    images = sorted(os.listdir(synth / "images"))[:6]
    full = tmp_path / "full.jsonl"
    dpo.generate_step(cfg, model, tok, images, synth / "images", str(full), "cpu")
    cut = tmp_path / "cut.jsonl"
    real_write = dpo.D.generate_text
    calls = {"n": 0}

    def flaky(*a, **k):  # die during the third batch: a batch is 4 calls (describe, ask, answer twice)
        calls["n"] += 1
        if calls["n"] == 2 * 4 + 3:
            raise KeyboardInterrupt
        return real_write(*a, **k)
    monkeypatch.setattr(dpo.D, "generate_text", flaky)
    with pytest.raises(KeyboardInterrupt):
        dpo.generate_step(cfg, model, tok, images, synth / "images", str(cut), "cpu")
    with open(cut, "a") as f:
        f.write('{"batch": 2, "torn')  # a line cut by the kill
    monkeypatch.setattr(dpo.D, "generate_text", real_write)
    dpo.generate_step(cfg, model, tok, images, synth / "images", str(cut), "cpu")
    assert full.read_text() == cut.read_text()  # resumed = uninterrupted, line for line
    rows = [r for r in dpo.read_batches(str(full)) if "question" in r]
    assert rows and all(len(r["answers"]) == 2 for r in rows)
    # judge: interrupted after some verdicts, rerun: each item judged exactly once
    judge = dpo.make_judge(replace(cfg, judge="oracle"), synth)
    seen = []
    score = judge.score_fn

    def counting(facts, q, a):
        seen.append((q, a))
        if len(seen) == 3:
            raise KeyboardInterrupt
        return score(facts, q, a)
    judge.score_fn = counting
    cfg1 = replace(cfg, workers=1)
    with pytest.raises(KeyboardInterrupt):
        dpo.judge_step(cfg1, rows, synth / "images", judge, str(tmp_path / "pairs.jsonl"), "")
    judge.score_fn = lambda f, q, a: (seen.append((q, a)), score(f, q, a))[1]
    dpo.judge_step(cfg1, rows, synth / "images", judge, str(tmp_path / "pairs.jsonl"), "")
    n_items = len({json.dumps([r["image"], r["question"], r["answers"]]) for r in rows})
    assert len(seen) <= 2 * n_items + 2  # two answers per item; at most the interrupted item is scored again
    before = len(seen)
    dpo.judge_step(cfg1, rows, synth / "images", judge, str(tmp_path / "pairs.jsonl"), "")
    assert len(seen) == before  # a third run is all cache


def test_each_image_is_described_once_and_asked_from_that_one_prompt(tiny_dir, synth, tmp_path, monkeypatch):
    tok = D.load_tokenizer(tiny_dir)
    model = C.from_pretrained(str(tiny_dir), dtype=torch.float32)
    cfg = replace(dpo.Config(), model=str(tiny_dir), out_dir=str(tmp_path), n_questions=3, describe_tokens=5,
                  q_max_tokens=6, a_max_tokens=4, gen_batch=2)
    monkeypatch.setattr(dpo, "is_wellformed", lambda q: len(q) > 0)
    images = sorted(os.listdir(synth / "images"))[:5]
    real = D.generate_text
    described, asked = [], []

    def counting(model, tokenizer, convs, *a, **k):
        out = real(model, tokenizer, convs, *a, **k)
        for c, o in zip(convs, out):
            if c == D.questioner_turns():
                described.append(o)
            elif c[-1]["from"] == "vuser":
                asked.append(c[1]["value"])
        return out
    monkeypatch.setattr(dpo.D, "generate_text", counting)
    dpo.generate_step(cfg, model, tok, images, synth / "images", str(tmp_path / "g.jsonl"), "cpu")
    assert len(described) == len(images)  # once per image, not once per question
    # each image's questions are all asked after its one description
    assert asked == [d or "." for d in described for _ in range(cfg.n_questions)]
    # The questions equal the redescribing loop's (today's ask_questions called n_questions times, each
    # call describing every image again) for the same generator: the greedy description is deterministic,
    # so passing it in leaves every sampled token the same.
    monkeypatch.setattr(dpo.D, "generate_text", real)
    paths = [synth / "images" / n for n in images]
    args = (model, tok, paths, 48, 1.0, 20, 0.95)
    g = torch.Generator().manual_seed(7)
    redescribed = [D.ask_questions(*args, g, 5, 6) for _ in range(3)]
    desc = D.generate_text(model, tok, [D.questioner_turns()] * len(paths), D.load_images(paths, 48),
                           "vicuna_v1_sq", 5)
    g = torch.Generator().manual_seed(7)
    once = [D.ask_questions(*args, g, 5, 6, descriptions=desc) for _ in range(3)]
    assert once == redescribed and len(set(map(tuple, once))) > 1  # and the rounds differ


def test_chunked_generation_at_a_tiny_budget_equals_one_call(tiny_dir, synth, monkeypatch):
    tok = D.load_tokenizer(tiny_dir)
    model = C.from_pretrained(str(tiny_dir), dtype=torch.float32)
    # rows of different lengths, so the chunks' left padding differs from the whole batch's
    qs = ["Is there a lesion?", "What organ is shown in this image?", "Size?", "Where is the nodule located?",
          "Is it large?"]
    convs = [[{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": None}] for q in qs]
    px = D.load_images([synth / "images" / n for n in sorted(os.listdir(synth / "images"))[:5]], 48)
    real = D.generate_text
    calls = []

    def counting(model, tokenizer, convs, *a, **k):
        calls.append(len(convs))
        return real(model, tokenizer, convs, *a, **k)
    monkeypatch.setattr(dpo.D, "generate_text", counting)
    sampling = (1.2, 100, 0.95)
    one = dpo.generate_rows(model, tok, convs, px, "vicuna_v1", 8, 10**6, sampling, seed=3)
    assert calls == [5]
    tiny = dpo.generate_rows(model, tok, convs, px, "vicuna_v1", 8, 1, sampling, seed=3)  # a row a call
    assert calls[1:] == [1] * 5 and tiny == one
    calls.clear()
    ids = [D.encode_prompt(c, tok, "vicuna_v1", 36, model.config.image_token_id) for c in convs]
    mid = dpo.generate_rows(model, tok, convs, px, "vicuna_v1", 8, 2 * (max(map(len, ids)) + 8), sampling,
                            seed=3)
    assert mid == one and calls == [2, 2, 1]  # two rows of the longest prompt fit the budget
    other = dpo.generate_rows(model, tok, convs, px, "vicuna_v1", 8, 1, sampling, seed=4)
    assert other != one
    # the same at the token level: a batch with one generator per row = each row alone
    b = D.collate([{"input_ids": x} for x in ids], padding_side="left")
    gens = dpo.row_generators(5, len(ids), "cpu")
    batch = M.generate(model, b["input_ids"], px, b["attention_mask"], 8, 1.2, 100, 0.95, generator=gens)
    for i, x in enumerate(ids):
        alone = M.generate(model, torch.tensor([x]), px[i:i + 1], None, 8, 1.2, 100, 0.95,
                           generator=dpo.row_generators(5, len(ids), "cpu")[i:i + 1])
        assert torch.equal(alone[0], batch[i, :alone.shape[1]])


def test_generation_sharded_over_ranks_equals_one_process_and_resumes(tiny_dir, synth, tmp_path, monkeypatch):
    tok = D.load_tokenizer(tiny_dir)
    model = C.from_pretrained(str(tiny_dir), dtype=torch.float32)
    cfg = replace(dpo.Config(), model=str(tiny_dir), out_dir=str(tmp_path), n_questions=2, describe_tokens=4,
                  q_max_tokens=6, a_max_tokens=4, gen_batch=1)
    monkeypatch.setattr(dpo, "is_wellformed", lambda q: len(q) > 0)
    images = sorted(os.listdir(synth / "images"))[:5]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    dpo.generate_step(cfg, model, tok, images, synth / "images", str(one), "cpu")
    # rank 1 of 2 (batches 1, 3) killed in its second batch, a torn line left behind, then rerun
    dpo.generate_step(cfg, model, tok, images, synth / "images", str(two), "cpu", rank=0, world=2)
    real, calls = D.generate_text, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4 + 2:  # a batch is 4 calls (describe, ask, answer twice)
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(dpo.D, "generate_text", flaky)
    with pytest.raises(KeyboardInterrupt):
        dpo.generate_step(cfg, model, tok, images, synth / "images", str(two), "cpu", rank=1, world=2)
    with open(f"{two}.rank1", "a") as f:
        f.write('{"batch": 3, "torn')
    monkeypatch.setattr(dpo.D, "generate_text", real)
    dpo.generate_step(cfg, model, tok, images, synth / "images", str(two), "cpu", rank=1, world=2)
    assert {r["batch"] for r in dpo.read_batches(f"{two}.rank0")} == {0, 2, 4}
    dpo.merge_parts(str(two))
    assert two.read_text() == one.read_text() and not dpo.part_paths(str(two))  # same lines, same order
    # a rerun at another world size finds everything done
    dpo.generate_step(cfg, model, tok, images, synth / "images", str(two), "cpu", rank=1, world=3)
    dpo.merge_parts(str(two))
    assert two.read_text() == one.read_text()


def test_dpo_generate_on_two_gloo_processes_equals_one(synth, small_data, tmp_path):
    # a model that asks "????" (questioning_llava): every row has a question and two sampled answers
    args = [f"--model={questioning_llava(tmp_path / 'm', synth)}", f"--data={small_data}",
            f"--image_dir={synth / 'images'}", "--n_images=4", "--n_questions=2", "--describe_tokens=4",
            "--q_max_tokens=6", "--a_max_tokens=4", "--gen_batch=1", "--q_temperature=1.0", "--q_top_k=50"]
    dpo.main(["generate", f"--out_dir={tmp_path / 'one'}", *args])
    run_sft(["generate", f"--out_dir={tmp_path / 'two'}", *args], nproc=2, script=HERE / "dpo.py")
    one = (tmp_path / "one" / "generations.jsonl").read_text()
    assert (tmp_path / "two" / "generations.jsonl").read_text() == one and one.count('"question"') >= 4
    assert sorted(os.listdir(tmp_path / "two")) == ["config.json", "generations.jsonl",
                                                    "generations.jsonl.fingerprint.json"]


def test_generation_budget_from_the_flag_or_memory(tiny_dir):
    model = C.from_pretrained(str(tiny_dir), dtype=torch.float32)
    assert dpo.gen_token_budget(replace(dpo.Config(), gen_tokens=123), model, "cpu") == 123
    t = model.config.text  # 4 GiB of KV cache on CPU, at 2 x layers x kv heads x head dim fp32 values a token
    assert dpo.gen_token_budget(dpo.Config(), model, "cpu") == (4 << 30) // (2 * 2 * 2 * t.head_dim * 4)


SYNTH_SAMPLING = SY.QUESTION_SAMPLING


def test_the_short_synthetic_pipeline_does_each_stages_job(synth, tmp_path):
    """The synthetic default in seconds: from the shipped base, a short stage 1 teaches the model to ask
    (well-formed questions sampled at stage 2's settings rise from the base's), and a short stage 2 on the
    pairs the oracle judge decides widens DPO's reward margin on them."""
    sampling = dict(SY.QUESTION_SAMPLING, seed=0)
    images = sorted(i for i in os.listdir(synth / "images") if "_test_" in i)[:40]

    def wellformed(model_dir):
        model = C.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(0)
        kw = {k: v for k, v in sampling.items() if k != "seed"}
        asked = D.ask_questions(model, D.load_tokenizer(model_dir), [synth / "images" / i for i in images],
                                48, generator=g, **kw)
        return sum(SY.parse_question(q) is not None for q in asked) / len(asked)
    stage1 = tmp_path / "sft"
    sft.main([f"--model={SY.BASE_DIR}", f"--data={synth / 'train.json'}", f"--image_dir={synth / 'images'}",
              f"--out_dir={stage1}", "--merge", "--max_steps=100", "--no-grad_ckpt", "--global_batch=16",
              "--micro_batch=16", "--lr=1e-3", "--vision_lr=2e-3", "--projector_lr=2e-3", "--max_length=512"])
    base, asks = wellformed(SY.BASE_DIR), wellformed(stage1 / "merged")
    assert base < 0.1 and asks > base + 0.4, (base, asks)
    q = [f"--q_{k}={v}" for k, v in SYNTH_SAMPLING.items()]
    dpo.main([f"--model={stage1 / 'merged'}", f"--out_dir={tmp_path / 'dpo'}", "--n_images=48", *q,
              "--gen_batch=48", "--describe_tokens=48", "--q_max_tokens=24", "--a_max_tokens=24",
              "--global_batch=16", "--micro_batch=16", "--lr=5e-4", "--vision_lr=5e-4", "--projector_lr=5e-4",
              "--epochs=2", "--log_every=1", "--no-grad_ckpt", "--lora_dropout=0", "--vit_lora_dropout=0"])
    log = read_log(tmp_path / "dpo")
    assert len(log) >= 4 and log[-1]["margin"] > log[0]["margin"] + 0.05 and log[-1]["reward_acc"] > 0.6


# --------------------------------------------------------------------- train.py --shard=fsdp (sft.py, dpo.py)
# FSDP2 on 2 gloo processes against one unsharded process; DCP checkpoints across world sizes; the exports.

# as the DDP test: no dropout, lr 1e-3 (Adam amplifies last-bit differences of near-zero gradients)
FSDP_COMMON = ["--lora_dropout=0", "--vit_lora_dropout=0", "--lr=1e-3", "--vision_lr=1e-3",
               "--projector_lr=1e-3", "--merge"]


# sft.main or dpo.main once per [script, arguments] in a JSON file: every 2-process run in one torchrun
# launch, since starting processes and importing torch take most of the time. All runs share one process
# group (a default group made again in the same processes can meet the first one's keys in torchrun's store
# and hang). A copy of every step's sharded checkpoint is kept, so that a later run can resume from any of
# them.
DRIVER = '''import importlib, json, os, shutil, sys
sys.path.insert(0, os.getcwd())  # run_sft runs in the repository
import torch.distributed
import train

torch.distributed.destroy_process_group = lambda *args, **kwargs: None

save = train.save_sharded


def save_and_keep(model, opt, path, meta, rank):
    save(model, opt, path, meta, rank)
    if rank == 0:
        shutil.copytree(path, f"{path}.step{meta['step']}")


train.save_sharded = save_and_keep
for script, args in json.load(open(sys.argv[1])):
    importlib.import_module(script).main(args)
'''


@pytest.fixture(scope="module")
def fsdp_runs(tiny_dir, small_data, synth, tmp_path_factory):
    """The directory of every run the tests below compare. SFT, 3 steps of the same global batch of 8:
    {lora,full}-ddp1   one process, the default --shard=ddp (in this process)
    {lora,full}-fsdp2  two processes, --shard=fsdp
    lora-1to2          one process stopped right after its step-1 checkpoint, resumed on two
    lora-2to1          lora-fsdp2's step-1 checkpoint resumed on one process
    DPO, 2 steps of 4 pairs: dpo-ddp1 as above; dpo-fsdp2 and dpo-fsdp2-pre (--precompute_ref) on two
    processes; dpo-{ddp2,fsdp2}-bf16{,-pre}: two processes under --amp=bf16, live and precomputed"""
    root = tmp_path_factory.mktemp("fsdp")

    def args(name, *x):
        return sft_args(tiny_dir, small_data, synth, root / name, f"--train={name.split('-')[0]}",
                        *FSDP_COMMON, *x)

    def dpo_args(name, *x):
        return ["train", f"--model={tiny_dir}", f"--out_dir={root / name}", "--global_batch=4",
                "--micro_batch=1", "--epochs=2", "--lr=1e-3", "--vision_lr=1e-3", "--projector_lr=1e-3",
                "--lora_r=4", "--lora_alpha=8", "--vit_lora_r=2", "--vit_lora_alpha=4", "--lora_dropout=0",
                "--vit_lora_dropout=0", "--log_every=1", *x]
    pairs = [dict(hand_pair(None, None, synth)[0], chosen=c)
             for c in ("brain", "liver", "the chest", "a lung")]
    bf16 = [f"dpo-{s}2-bf16{p}" for s in ("ddp", "fsdp") for p in ("", "-pre")]
    for name in ("dpo-ddp1", "dpo-fsdp2", "dpo-fsdp2-pre", *bf16):
        (root / name).mkdir()
        (root / name / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    for train in ("lora", "full"):
        sft.main(args(f"{train}-ddp1"))
    dpo.main(dpo_args("dpo-ddp1"))
    save = T.save_sharded

    def save_then_stop(model, opt, path, meta, rank):
        save(model, opt, path, meta, rank)
        if meta["step"] == 1:
            raise KeyboardInterrupt
    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(T, "save_sharded", save_then_stop)
        sft.main(args("lora-1to2", "--shard=fsdp"))
    dist.destroy_process_group()  # the interrupted run left its one-process group behind
    (root / "driver.py").write_text(DRIVER)
    runs = [("sft", args("lora-fsdp2", "--shard=fsdp")), ("sft", args("full-fsdp2", "--shard=fsdp")),
            ("sft", args("lora-1to2", "--shard=fsdp", "--resume")),
            ("dpo", dpo_args("dpo-fsdp2", "--shard=fsdp")),
            ("dpo", dpo_args("dpo-fsdp2-pre", "--shard=fsdp", "--precompute_ref"))]
    runs += [("dpo", dpo_args(n, f"--shard={n.split('-')[1][:-1]}", "--amp=bf16",
                              *(["--precompute_ref"] if n.endswith("-pre") else []))) for n in bf16]
    (root / "runs.json").write_text(json.dumps(runs))
    run_sft([str(root / "runs.json")], nproc=2, script=root / "driver.py")
    shutil.copytree(root / "lora-fsdp2" / "checkpoint.step1", root / "lora-2to1" / "checkpoint")
    sft.main(args("lora-2to1", "--shard=fsdp", "--resume"))
    return root


def dcp_weights(ckpt, tmp_path):
    """The model part of a sharded (DCP) checkpoint as full tensors, read without a process group."""
    dcp_to_torch_save(ckpt, tmp_path / "ckpt.pt")
    return torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"]


def assert_same_exports(a, b, tol=1e-5):
    """Two export directories: the same files, the same JSON, the same tensors within `tol`."""
    names = sorted(p.name for p in Path(a).iterdir())
    assert names == sorted(p.name for p in Path(b).iterdir())
    for n in names:
        if n.endswith(".safetensors"):
            x, y = load_file(Path(a) / n), load_file(Path(b) / n)
            assert x.keys() == y.keys()
            assert max((x[k] - y[k]).abs().max().item() for k in x) < tol, n
        else:
            assert (Path(a) / n).read_bytes() == (Path(b) / n).read_bytes(), n


@pytest.mark.parametrize("train", ["full", "lora"])
def test_fsdp_two_processes_equal_one_process_with_accumulation(fsdp_runs, train, tiny_dir, tmp_path):
    one, two = fsdp_runs / f"{train}-ddp1", fsdp_runs / f"{train}-fsdp2"
    assert len(read_log(two)) == 3
    # losses and gradient norms (DTensor clipping: the full norm)
    assert_close_logs(read_log(one), read_log(two))
    # the sharded checkpoint: one file per rank, holding exactly what trains (a LoRA run's frozen base stays
    # out)
    assert sorted(p.name for p in (two / "checkpoint").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    wa, wb = trained(one), dcp_weights(two / "checkpoint", tmp_path)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    start = C.from_pretrained(str(tiny_dir), dtype=torch.float32).state_dict()
    # training really moved them
    assert max((wa[k] - start[k]).abs().max().item() for k in wa if k in start) > 1e-4


def test_fsdp_exports_equal_ddp_exports(fsdp_runs):
    """Gathered on rank 0, the FSDP model writes the files the unsharded run writes: adapter, merged model,
    full model."""
    for train, dirs in (("lora", ("final", "merged")), ("full", ("final",))):
        for d in dirs:
            assert_same_exports(fsdp_runs / f"{train}-ddp1" / d, fsdp_runs / f"{train}-fsdp2" / d)


def test_fsdp_checkpoint_resumes_on_another_world_size(fsdp_runs):
    """Saved by 2 processes and resumed on 1, saved by 1 and resumed on 2: both continue as the uninterrupted
    run."""
    two = fsdp_runs / "lora-fsdp2"
    assert [x["step"] for x in read_log(fsdp_runs / "lora-1to2")] == [1, 2, 3]  # step 1 alone, 2 and 3 on two
    assert_close_logs(read_log(fsdp_runs / "lora-1to2"), read_log(two))
    assert_close_logs(read_log(fsdp_runs / "lora-2to1"), read_log(two)[1:])
    for run in ("lora-1to2", "lora-2to1"):
        for d in ("final", "merged"):
            assert_same_exports(fsdp_runs / run / d, two / d)


def test_fsdp_dpo_two_processes_equal_one_process(fsdp_runs):
    """DPO's reference is the sharded policy with LoRA off and the stage-1 projector swapped back in: live or
    precomputed (--precompute_ref), on two FSDP processes DPO trains as on one unsharded process."""
    one = fsdp_runs / "dpo-ddp1"
    log = read_log(one)
    assert abs(log[0]["loss"] - math.log(2)) < 1e-6 and log[1]["loss"] < log[0]["loss"]
    for run in ("dpo-fsdp2", "dpo-fsdp2-pre"):
        assert_close_logs(read_log(fsdp_runs / run), log)
        for d in ("final", "merged"):  # the adapter holds the projector, which the reference must swap back
            assert_same_exports(one / d, fsdp_runs / run / d)


def test_dpo_bf16_reference_on_two_processes_ddp_and_fsdp(fsdp_runs):
    """--amp=bf16 (the GPU's precision path) on two processes: under DDP and FSDP, with a live or a
    precomputed reference, the loss at step 0 is log 2, and the four runs agree to bf16's tolerance."""
    runs = [f"dpo-{s}2-bf16{p}" for s in ("ddp", "fsdp") for p in ("", "-pre")]
    logs = [read_log(fsdp_runs / r) for r in runs]
    fp32 = read_log(fsdp_runs / "dpo-ddp1")
    for r, log in zip(runs, logs):
        assert len(log) == 2 and abs(log[0]["loss"] - math.log(2)) < 1e-6, r
        assert log[0]["grad_norm"] != fp32[0]["grad_norm"], r  # bf16 really ran
        for k in ("loss", "grad_norm"):
            assert log[1][k] == pytest.approx(logs[0][1][k], rel=1e-4), (r, k)


def test_fsdp_shards_frozen_weights_too_and_gathers_them_back(tiny_dir):
    """Every weight becomes a DTensor shard, trainable or frozen (a LoRA run's base), the AdamW groups hold
    the new ones, and gather_model gives back the plain model."""
    model = C.from_pretrained(str(tiny_dir), dtype=torch.float32)
    cfg = replace(sft.Config(), shard="fsdp", lora_r=4, lora_alpha=8, vit_lora_r=2, vit_lora_alpha=4)
    groups = sft.setup_trainable(model, cfg)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    T.setup_distributed("fsdp")
    try:
        groups = T.shard_model(model, cfg, "cpu", groups)
        params = list(model.parameters())
        assert all(isinstance(p, DTensor) for p in params) and any(not p.requires_grad for p in params)
        assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in params if p.requires_grad}
        plain = T.gather_model(model)
    finally:
        dist.destroy_process_group()
    after = {n: (p, p.requires_grad) for n, p in plain.named_parameters()}
    assert after.keys() == before.keys()
    assert isinstance(plain.language_model.layers[0].mlp.up_proj, LoRALinear)
    for n, (p, trains) in after.items():
        assert type(p) is torch.nn.Parameter and torch.equal(p, before[n][0]) and trains == before[n][1], n


# ----------------------------------------------------------------------------- train.py resume, kill-safety
# Checkpoints that a SIGKILL at any instant leaves resumable, and the checks --resume and fresh runs make
# (runs.open_run): a checkpoint's fingerprint of inputs and settings, the out_dir lock, config.json.

KILL_ARGS = ["--global_batch=4", "--micro_batch=2", "--max_steps=6", "--lora_r=4", "--lora_alpha=8",
             "--vit_lora_r=2", "--vit_lora_alpha=4"]


def launch(args, nproc):
    """sft.py as a user starts it (torchrun for two processes), in its own process group, so that a kill
    reaches every process."""
    cmd = [sys.executable, str(HERE / "sft.py")] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(HERE / "sft.py")]
    return subprocess.Popen(cmd + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def logged_steps(out):
    """The steps in out/log.jsonl, read while a run may be writing it."""
    try:
        lines = (Path(out) / "log.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(x)["step"] for x in lines if x.endswith("}")]


def run_killed(args, nproc, out, kills):
    """Run, and SIGKILL the whole job at each (step, when, delay) of `kills`, resuming after each; then resume
    to the end. when="logged": `delay` s after the step's log row is written (before its checkpoint, or in
    it); when="saving": `delay` s after its checkpoint's temporary file or directory appears."""
    for k, when, delay in kills:
        p = launch(args, nproc)
        while p.poll() is None:
            ready = k in logged_steps(out)  # k is past every step an earlier run logged
            if when == "saving":
                ready = ready and (any(Path(out).glob("checkpoint.pt.tmp*")) or
                                   (Path(out) / "checkpoint.tmp").exists())
            if ready:
                time.sleep(delay)
                os.killpg(p.pid, 9)
            time.sleep(0.0005)
        p.stdout.close()
        assert p.wait() == -9, "the job ended before its kill"
        args = [*args, "--resume"] if "--resume" not in args else args
    p = launch(args, nproc)
    text = p.stdout.read()
    p.stdout.close()
    assert p.wait() == 0, text[-3000:]
    return text


@pytest.mark.parametrize("nproc,shard", [(1, "ddp"), (2, "ddp"), (2, "fsdp")])
def test_sigkill_at_random_instants_then_resume_is_bit_identical(tiny_dir, small_data, synth, tmp_path,
                                                                 nproc, shard):
    """Killed at seeded instants, resumed each time: during a checkpoint write (the resumed run logs that
    step again), and in one process also just after a step's log row (before or in its checkpoint write).
    The same final weights, bit for bit, as an uninterrupted run, a log with each step exactly once, and no
    temporary file, half-swapped checkpoint or lock left behind. (Two kills on two processes would double
    the time of torchrun's starts.)"""
    rng = random.Random(nproc * 10 + len(shard))
    k1 = rng.randint(1, 3)
    kills = [(k1, "logged", rng.uniform(0, 0.005))] if nproc == 1 else []
    kills += [(rng.randint(k1 + 1, 5), "saving", rng.uniform(0, 0.005))]

    def args(out):
        return sft_args(tiny_dir, small_data, synth, out, *KILL_ARGS, f"--shard={shard}")
    run_killed(args(tmp_path / "full"), nproc, tmp_path / "full", [])
    run_killed(args(tmp_path / "cut"), nproc, tmp_path / "cut", kills)
    la, lb = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    assert [x["step"] for x in lb] == [1, 2, 3, 4, 5, 6]
    assert [{k: v for k, v in x.items() if k != "tok_s"} for x in la] == \
        [{k: v for k, v in x.items() if k != "tok_s"} for x in lb]
    wa = load_file(tmp_path / "full" / "final" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "cut" / "final" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    left = sorted(p.name for p in (tmp_path / "cut").iterdir())
    assert not [n for n in left if ".tmp" in n or n.endswith(".old") or n == ".lock"], left


def fit_tiny(tiny_dir, synth, data, out, max_steps=4, stop_after=None, inputs=None, **kw):
    """train.fit in this process on the tiny model, as sft.py calls it, stopped right after the checkpoint of
    step `stop_after`; `kw` sets Config fields (and `overwrite`, which sft.Config does not have yet)."""
    @dataclass
    class Cfg(sft.Config):
        overwrite: bool = False
    base = dict(model=str(tiny_dir), data=str(data), out_dir=str(out), global_batch=8, micro_batch=4,
                max_steps=max_steps, epochs=2, image_size=48, max_length=512, lr=1e-2, log_every=1,
                save_every=1, lora_r=4, lora_alpha=8, vit_lora_r=2, vit_lora_alpha=4)
    cfg = replace(Cfg(), **{**base, **kw})
    torch.manual_seed(0)
    model = C.from_pretrained(str(tiny_dir), dtype=torch.float32)
    recs = D.read_conversations(data, synth / "images")
    groups = T.shard_model(model, cfg, "cpu", sft.setup_trainable(model, cfg))
    prepare = sft.make_sft_prepare(recs, D.load_tokenizer(tiny_dir), cfg, model.config, "cpu")
    save = T.atomic_save

    def save_then_stop(obj, path):
        save(obj, path)
        if obj["step"] == stop_after:
            raise KeyboardInterrupt
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "atomic_save", save_then_stop)
        T.fit(cfg, model, len(recs), prepare, sft.sft_loss, groups, str(out), marked=("lr",), inputs=inputs)
    return model


def test_resume_refuses_changed_settings_from_the_command_line(tiny_dir, small_data, synth, tmp_path):
    """The issue's `--resume --lr=0.5 --global_batch=32`: refused, both named, nothing trained."""
    run_sft(sft_args(tiny_dir, small_data, synth, tmp_path, *KILL_ARGS, "--max_steps=1"))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    r = subprocess.run([sys.executable, "sft.py", *sft_args(tiny_dir, small_data, synth, tmp_path, *KILL_ARGS,
                        "--max_steps=1", "--resume", "--lr=0.5", "--global_batch=8")],
                       capture_output=True, text=True, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    assert "global_batch (4 -> 8)" in r.stderr and "lr (0.01 -> 0.5)" in r.stderr, r.stderr[-2000:]
    assert str(tmp_path / "checkpoint.pt") in r.stderr and "--overwrite instead of --resume" in r.stderr
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_every_reuse_case_of_a_checkpoint(tiny_dir, small_data, synth, tmp_path):
    """Same inputs: resumed (settings that leave the trajectory alone may change). Changed model, data or
    setting: refused with the difference named, on --resume and on a fresh run into that out_dir.
    --overwrite: a fresh run. A truncated checkpoint: a one-line error naming it."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fit_tiny(tiny_dir, synth, small_data, out, stop_after=2)
    conf = json.loads((out / "config.json").read_text())
    assert conf["settings"]["lr"] == 1e-2 and conf["synthetic_default"] == ["lr"]
    # bookkeeping may change; so may max_steps where the schedule stays (2 epochs of 2 steps = 4)
    fit_tiny(tiny_dir, synth, small_data, out, max_steps=-1, resume=True, save_every=3, log_every=3)
    assert [x["step"] for x in read_log(out)] == [1, 2, 3, 4]
    other_model = tmp_path / "model"
    shutil.copytree(tiny_dir, other_model)
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(json.loads(small_data.read_text())[:8]))
    changes = [(dict(lr=0.5), "lr (0.01 -> 0.5)"), (dict(seed=1), "seed (0 -> 1)"),
               (dict(max_steps=3), "schedule_steps (4 -> 3)"), (dict(train="full"), "train (")]
    for kw, named in changes:
        for resume in (True, False):
            with pytest.raises(runs.UsageError, match=re.escape(named)):
                fit_tiny(tiny_dir, synth, small_data, out, resume=resume, **kw)
    with pytest.raises(runs.UsageError, match=re.escape(f"model ({tiny_dir} -> {other_model})")):
        fit_tiny(tiny_dir, synth, small_data, out, resume=True, model=str(other_model))
    with pytest.raises(runs.UsageError, match=r"data \(.*; n_examples \(16 -> 8\)"):
        fit_tiny(tiny_dir, synth, fewer, out, resume=True)
    st = os.stat(tiny_dir / "model.safetensors")
    try:  # the same path, rewritten since (its size and mtime say so)
        os.utime(tiny_dir / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        with pytest.raises(runs.UsageError, match=re.escape(f"model ({tiny_dir} changed since)")):
            fit_tiny(tiny_dir, synth, small_data, out, resume=True)
    finally:
        os.utime(tiny_dir / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(runs.UsageError, match=re.escape('pairs (null -> "sha256:0")')):  # a caller's input
        fit_tiny(tiny_dir, synth, small_data, out, resume=True, inputs={"pairs": "sha256:0"})
    with pytest.raises(runs.UsageError, match="pass one of them"):
        fit_tiny(tiny_dir, synth, small_data, out, resume=True, overwrite=True)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 4  # nothing was touched
    fit_tiny(tiny_dir, synth, small_data, out, lr=0.5, overwrite=True)  # --overwrite: afresh
    assert [x["step"] for x in read_log(out)] == [1, 2, 3, 4] and read_log(out)[0]["lr"] == 0.5
    with pytest.raises(KeyboardInterrupt):  # the same inputs afresh: starts over (the log too)
        fit_tiny(tiny_dir, synth, small_data, out, lr=0.5, stop_after=1)
    assert [x["step"] for x in read_log(out)] == [1]
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(runs.UsageError, match=re.escape(f"--resume: {out / 'checkpoint.pt'} cannot be read")):
        fit_tiny(tiny_dir, synth, small_data, out, resume=True, lr=0.5)


def test_a_truncated_sharded_checkpoint_is_named(tiny_dir, small_data, synth, tmp_path):
    T.setup_distributed("fsdp")
    try:
        fit_tiny(tiny_dir, synth, small_data, tmp_path, max_steps=1, shard="fsdp")
        shard = tmp_path / "checkpoint" / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:100])
        named = re.escape(f"--resume: {tmp_path / 'checkpoint'} cannot be read")
        with pytest.raises(runs.UsageError, match=named):
            fit_tiny(tiny_dir, synth, small_data, tmp_path, max_steps=1, shard="fsdp", resume=True)
    finally:
        dist.destroy_process_group()


def test_a_second_run_into_a_busy_out_dir_is_refused_and_stale_files_are_removed(tiny_dir, small_data, synth,
                                                                                  tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        (out / ".lock").write_text(str(other.pid))  # another run, alive, holds out_dir
        with pytest.raises(runs.UsageError, match=f"in use by another run \\(pid {other.pid}\\)"):
            fit_tiny(tiny_dir, synth, small_data, out)
        assert (out / ".lock").read_text() == str(other.pid)  # and keeps it
        (out / ".lock").write_text(str(dead.pid))  # a killed run's lock is taken over
        (out / f"checkpoint.pt.tmp{dead.pid}").write_bytes(b"half a checkpoint")
        (out / f"checkpoint.pt.tmp{other.pid}").write_bytes(b"a live writer's")
        fit_tiny(tiny_dir, synth, small_data, out)
        assert not (out / f"checkpoint.pt.tmp{dead.pid}").exists()
        assert (out / f"checkpoint.pt.tmp{other.pid}").exists()
        assert (out / ".lock").read_text() == str(os.getpid())  # held until this process exits
    finally:
        other.kill()
        other.wait()
    runs.unlock_out_dir(out)


def test_directory_swap_recovers_from_a_kill_at_every_instant(tmp_path):
    """save_sharded's swap (runs.replace_dir) stopped after each of its operations: recover_dir leaves the
    newest complete checkpoint in place and nothing else; a leftover .old no longer breaks the next save."""
    def ckpt(d, step, complete=True):
        d.mkdir()
        (d / "__0_0.distcp").write_text(str(step))
        if complete:
            (d / "meta.pt").write_text(str(step))  # the mark, written last

    path = tmp_path / "checkpoint"
    tmp, old = Path(f"{path}.tmp"), Path(f"{path}.old")
    states = {  # what a kill leaves -> the step recover_dir must keep
        "tmp half written": (lambda: (ckpt(path, 1), ckpt(tmp, 2, complete=False)), "1"),
        "after the first rename": (lambda: (ckpt(old, 1), ckpt(tmp, 2)), "2"),
        "after the second rename": (lambda: (ckpt(old, 1), ckpt(path, 2)), "2"),
        "old half removed": (lambda: (ckpt(old, 1, complete=False), ckpt(path, 2)), "2"),
        "first save, tmp done": (lambda: ckpt(tmp, 1), "1"),
    }
    for name, (make, step) in states.items():
        for d in (path, tmp, old):
            shutil.rmtree(d, ignore_errors=True)
        make()
        runs.recover_dir(str(path), "meta.pt")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"], name
        assert (path / "meta.pt").read_text() == step == (path / "__0_0.distcp").read_text(), name
    ckpt(old, 0)  # the issue's leftover: every later save failed with "Directory not empty"
    ckpt(tmp, 3)
    runs.replace_dir(str(tmp), str(path), "meta.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert (path / "meta.pt").read_text() == "3"


# ----------------------------------------------------------------------------- files others load
# Oracles: transformers' AutoProcessor + LlavaForConditionalGeneration read a merged model, PEFT's
# AutoPeftModel classes read an adapter, offline; their logits and greedy tokens equal ours.

def trained_tiny(tiny_dir):
    """tiny_dir's model with the paper's LoRA (small ranks), B and the projector randomised: as if trained."""
    model = C.from_pretrained(str(tiny_dir), dtype=torch.float32)
    L.add_lora(model, L.lora_targets(4, 8, 0.0, 2, 4, 0.0))
    L.mark_trainable(model)
    return randomize_lora(model).eval()


def prompt_and_image(synth):
    """A vicuna_v1 prompt with "<image>", and a non-square image (the processor must pad it as LLaVA does)."""
    img = Image.open(synth / "images" / sorted(os.listdir(synth / "images"))[0]).convert("RGB")
    return "USER: <image>\nWhat organ is shown? ASSISTANT:", img.crop((0, 0, img.width, img.height * 3 // 4))


def test_merged_model_loads_with_autoprocessor_and_generates(tiny_dir, synth, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = trained_tiny(tiny_dir)
    merged = tmp_path / "merged"
    C.save_pretrained(L.merge_lora(ours), merged)
    D.copy_tokenizer(tiny_dir, merged)  # what sft.py and dpo.py do after save_pretrained
    processor = transformers.AutoProcessor.from_pretrained(merged)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(merged).eval()
    text, img = prompt_and_image(synth)
    x = processor(images=img, text=text, return_tensors="pt")
    cfg = ours.config
    assert int((x["input_ids"] == cfg.image_token_id).sum()) == cfg.image_seq_length == 36
    assert (x["pixel_values"][0] - D.preprocess_image(img, cfg.vision.image_size)).abs().max() < 1e-5
    with torch.no_grad():
        theirs = hf(**x).logits
        mine = ours(x["input_ids"], x["pixel_values"])
    assert (theirs - mine).abs().max() < 1e-4
    new = hf.generate(**x, max_new_tokens=5, do_sample=False, eos_token_id=None)[:, x["input_ids"].shape[1]:]
    assert torch.equal(new, M.generate(ours, x["input_ids"], x["pixel_values"], max_new_tokens=5))


@pytest.mark.parametrize("loader", ["AutoPeftModel", "AutoPeftModelForCausalLM", "PeftModel"])
def test_adapter_loads_with_peft_offline_from_its_recorded_base(tiny_dir, synth, tmp_path, monkeypatch,
                                                                 loader):
    """adapter_config.json names the directory the base was loaded from, so PEFT finds it without the hub:
    AutoPeftModel (and ...ForCausalLM: transformers maps llava there too) load base and adapter in one call;
    PeftModel.from_pretrained over LlavaForConditionalGeneration is the explicit form."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = trained_tiny(tiny_dir)
    L.save_adapter(ours, str(tmp_path / "adapter"))
    D.copy_tokenizer(tiny_dir, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_dir)
    if loader == "PeftModel":
        base = transformers.LlavaForConditionalGeneration.from_pretrained(config["base_model_name_or_path"])
        pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    else:
        pm = getattr(peft, loader).from_pretrained(str(tmp_path / "adapter"))
    pm.eval()
    assert isinstance(pm.base_model.model, transformers.LlavaForConditionalGeneration)
    text, img = prompt_and_image(synth)
    x = transformers.AutoProcessor.from_pretrained(tiny_dir)(images=img, text=text, return_tensors="pt")
    ids, pixels = x["input_ids"], x["pixel_values"]
    with torch.no_grad():
        assert (pm(input_ids=ids, pixel_values=pixels).logits - ours(ids, pixels)).abs().max() < 1e-4
    new = pm.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=5, do_sample=False,
                      eos_token_id=None)[:, ids.shape[1]:]
    assert torch.equal(new, M.generate(ours, ids, pixels, max_new_tokens=5))


# ----------------------------------------------------------------------------- judge.py
# Tests for judge.py against a fake OpenAI-compatible server on 127.0.0.1 (http.server in a thread).
#
# The fake decides each reply from a script keyed by the question in the request and how often that question
# was asked, so outcomes do not depend on thread timing. Waits are checked on a virtual clock (the injected
# sleep advances it, the fake stamps each request with it), never on wall time.

KEY = "sk-test-DO-NOT-LEAK-0123456789"


OK_REPLY = "8 6\nAnswer 1 is more accurate."


PNG = b"\x89PNG\r\n\x1a\n" + b"fake image bytes"  # the magic bytes are all the client looks at


class Clock:
    """Virtual time: sleep(s) records s and advances now; no wall time passes."""

    def __init__(self):
        self.now, self.sleeps, self.lock = 0.0, [], threading.Lock()

    def sleep(self, s):
        with self.lock:
            self.sleeps.append(s)
            self.now += s


class Fake:
    """Scripted chat-completions server. script: {question: [behaviour, ...]}; a question asked more often
    than its script is long gets "ok". Behaviours: ok, "429:<secs>", "429" (no Retry-After), 500, 503,
    malformed, nonjson, nochoices, noscores, "say:<reply>", slow (replies after the client's deadline), hang
    (closes after it, unanswered), cut (a body cut short), reset (closes at once), trickle (the body in pieces
    over 3 s), badgzip, 400 and 401 (both echo the key), 403. billed: (question, prompt, completion tokens,
    reply) of each complete 200 with usage, as the provider would bill it."""

    def __init__(self, script=None, clock=None, reply=None):
        self.script, self.clock, self.reply = (script or {}, clock or Clock(),
                                               reply or (lambda text: OK_REPLY))
        # log: (question, behaviour, virtual time, authorization, image ok)
        self.log, self.billed, self.lock = [], [], threading.Lock()
        self.usage = lambda q, n: (100, 10)  # the tokens of question q's n-th request
        self.hang = 1.5  # seconds a hang lasts: past the client's deadline
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][-1]["content"]
                text = content[0]["text"]
                url = content[1]["image_url"]["url"] if len(content) > 1 else ""
                image_ok = (url.startswith("data:image/png;base64,")
                            and base64.b64decode(url.split(",")[1]) == PNG)
                q = re.search(r"\[Question\]\n(.*?)\n", text).group(1)
                with fake.lock:
                    n = sum(e[0] == q for e in fake.log)
                    steps = fake.script.get(q, [])
                    what = steps[n] if n < len(steps) else "ok"
                    fake.log.append((q, what, fake.clock.now, self.headers.get("Authorization"), image_ok))
                try:
                    self.answer(what, q, n, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on the slow reply

            def answer(self, what, q, n, body):
                echo = f'{{"error": "Incorrect API key provided: {self.headers["Authorization"]}"}}'.encode()
                if what.startswith("429"):
                    self.send(429, b'{"error": "rate limited"}',
                              {"Retry-After": what.split(":")[1]} if ":" in what else {})
                elif what in ("500", "503"):
                    self.send(int(what), b"oops")
                elif what in ("malformed", "nonjson", "nochoices"):
                    self.send(200, {"malformed": b'{"choices": [', "nonjson": b"<html>busy</html>",
                                    "nochoices": b'{"object": "error"}'}[what])
                elif what in ("400", "401", "403"):
                    self.send(int(what), echo)
                elif what in ("hang", "reset"):
                    time.sleep(fake.hang if what == "hang" else 0)
                    self.close_connection = True
                elif what == "cut":  # says 100 bytes more than it sends, then closes
                    self.send(200, self.completion(OK_REPLY, None)[:40], length=140)
                    self.close_connection = True
                elif what == "badgzip":
                    self.send(200, self.completion(OK_REPLY, None), {"Content-Encoding": "gzip"})
                else:
                    if what == "slow":
                        # the client's timeout is 1 s: well past it, yet a loaded CI box still answers in
                        # time
                        time.sleep(2.5)
                    reply = ("I cannot judge this." if what == "noscores" else what[4:] if what[:4] == "say:"
                             else fake.reply(body))
                    data = self.completion(reply, fake.usage(q, n))
                    if what == "trickle":  # each piece well within the timeout, the whole well past it
                        self.send(200, b"", length=len(data))
                        for i in range(0, len(data), len(data) // 10 + 1):
                            time.sleep(0.3)
                            self.wfile.write(data[i:i + len(data) // 10 + 1])
                            self.wfile.flush()
                    else:
                        self.send(200, data)
                    if what != "slow":
                        with fake.lock:
                            fake.billed.append((q, *fake.usage(q, n), reply))

            def completion(self, reply, usage):
                body = {"choices": [{"message": {"role": "assistant", "content": reply}}]}
                if usage:
                    body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1]}
                return json.dumps(body).encode()

            def send(self, code, data, headers={}, length=None):
                self.send_response(code)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data) if length is None else length))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()

    def calls(self, q=None):
        return [e for e in self.log if q is None or e[0] == q]


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    (tmp_path / "img.png").write_bytes(PNG)
    return tmp_path


@pytest.fixture
def fake(request):
    f = Fake()
    yield f
    f.server.shutdown()
    f.server.server_close()


def make_judge(fake, max_tries=3, **kw):
    client = judge.ChatClient(fake.url, "gpt-4o", "JUDGE_TEST_KEY", timeout=1.0, max_tries=max_tries,
                              sleep=fake.clock.sleep, **kw)
    return judge.GPTJudge(client)


def items(n, prefix="q"):
    return [{"image": "img.png", "question": f"{prefix}{i}", "answers": [f"first {i}", f"second {i}"]}
            for i in range(n)]


# --- parsing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, scores", [
    ("8 6\nAnswer 1 describes the wall correctly.", (8, 6)),            # the paper's format
    ("  8    6  \n\nexplanation", (8, 6)),                                # extra spaces
    ("8/10 6/10\nexpl", (8, 6)),
    ("Scores: 8 6\nexpl", (8, 6)),
    ("Answer 1: 8, Answer 2: 6\nexpl", (8, 6)),
    ("7.5 6.0", (7.5, 6)),                                                # decimals
    ("**8 6**\n\n**Explanation:** ...", (8, 6)),                          # markdown bold
    ("Answer 1: 9/10\nAnswer 2: 3/10\n\nAnswer 1 is right about 2 lesions.", (9, 3)),  # two lines
    ("**Score for Answer 1:** 7\n**Score for Answer 2:** 4", (7, 4)),
    ("\n\n8\t10\n", (8, 10)),                                             # leading blank lines, tab, a 10
    ("8 out of 10 and 6 out of 10.", (8, 6)),
    ("Here are my scores.\n8 6\nbecause ...", (8, 6)),                   # a line of preamble
    ("- Assistant 1: 5\n- Assistant 2: 5", (5, 5)),                       # a tie, bullets
    ("8,6", (8, 6)),
    ("I cannot judge this.", None),                                       # no scores
    ("Answer 1 is better than Answer 2.", None),                          # label digits are not scores
    ("8 6 7\nexpl", None),                                                # three numbers: ambiguous
    ("11 3", None),                                                       # off the scale
    ("The image shows\n2 lesions in\nthe liver\n3 4", None),              # numbers in prose are not scores
    # labelled scores map by their labels, in any order
    ("Score 1: 8\nScore 2: 6", (8, 6)),
    ("1. 8\n2. 6", (8, 6)),
    ("1) 8\n2) 6\nAnswer 1 names the organ.", (8, 6)),
    ("Answer 2: 6\nAnswer 1: 8", (8, 6)),
    ("6 for Answer 2 and 8 for Answer 1", (8, 6)),
    ("8 for Answer 1, 6 for Answer 2", (8, 6)),
    ("Assistant 2: 3, Assistant 1: 9", (9, 3)),
    ("**Answer 2:** 6/10\n**Answer 1:** 8/10\n\nAnswer 1 sees 2 lesions.", (8, 6)),
    ("Answer A: 7\nAnswer B: 2", (7, 2)),
    ("Scores: 1) 8, 2) 6", (8, 6)),
    # refusals: negative, out of range, one number, ambiguous
    ("-4 9", None),
    ("8 -4", None),
    ("Answer 1: -4\nAnswer 2: 9", None),
    ("Answer 1: 12\nAnswer 2: 6", None),
    ("8", None),
    ("Answer 1: 8", None),
    ("Answer 1: 8\nAnswer 1: 6", None),                                 # a label twice
    ("Answer 1: 8\nAnswer 2: 6\nAnswer 2: 7", None),                     # contradicted further on
    ("Answer 1: 8, 6\nAnswer 2: 5", None),                               # a stray number
    ("8 6\n", (8, 6)),
    ("1. 8", None),
    ("Answer 1: 8\n7\nAnswer 2: 6", None),                               # labelled and bare mixed
])
def test_parse_scores(reply, scores):
    got = judge.parse_scores(reply)
    assert (got[:2] if got else None) == scores


def test_parse_scores_explanation_and_verdict():
    assert judge.parse_scores(OK_REPLY)[2] == "Answer 1 is more accurate."
    assert judge.parse_verdict("Both are close... [[B]] then later [[A]]") == "B"   # the first tag counts
    assert judge.parse_verdict("[[ C ]]") == "C"
    assert judge.parse_verdict("A is better") is None


# --- client and batch runner -------------------------------------------------------------------------
SCRIPT = {  # question -> the fake's answers to its 1st, 2nd, ... request (then "ok")
    "q0": ["429:2.5", "ok"], "q1": ["500", "ok"], "q2": ["malformed", "ok"], "q3": ["noscores", "ok"],
    "q4": ["slow", "ok"], "q5": [], "q6": ["500", "500", "500"], "q7": ["noscores", "noscores"],
    "q8": ["429:0.7", "500", "ok"], "q9": ["500", "500", "ok"],
}


EXPECTED_CALLS = {"q0": 2, "q1": 2, "q2": 2, "q3": 2, "q4": 2, "q5": 1, "q6": 3, "q7": 2, "q8": 3, "q9": 3}


@pytest.mark.parametrize("workers", [1, 4])
def test_scripted_failures(env, fake, workers):
    fake.script = SCRIPT
    j = make_judge(fake, max_tries=3, backoff=1.0)
    out, stats = judge.rate_items(items(10), j, judge.Cache(env / "c.jsonl"), image_dir=env, workers=workers)
    by_q = {r["question"]: r for r in out}
    assert {q for q, r in by_q.items() if "error" in r} == {"q6", "q7"}     # every item scored or failed
    assert all(by_q[q]["scores"] == [8, 6] for q in by_q if q not in ("q6", "q7"))
    assert "gave up after 3 tries" in by_q["q6"]["error"] and "unparseable" in by_q["q7"]["error"]
    for q, n in EXPECTED_CALLS.items():                      # tries per item: exact, and within the bound
        assert len(fake.calls(q)) == n <= 2 * 3              # 2 asks (one re-ask if unparseable) x max_tries
    assert all(e[4] and e[3] == f"Bearer {KEY}" for e in fake.log)  # image inline, key sent
    assert stats["new"] == 8 and stats["failed"] == 2 and stats["cached"] == 0
    # usage comes from the 11 well-formed 200 replies: one per scored item, +1 each for q3 and q7's
    # unparseable ones (paid too); none from 429/500, the malformed body or the reply the client timed out on
    assert j.client.usage == {"requests": 22, "prompt_tokens": 1100, "completion_tokens": 110}
    assert "est. cost $0.0039" in judge.summary(stats | {"items": 10}, j, 2.5, 10.0)
    if workers == 1:  # one thread: the virtual clock between a question's requests is that item's wait
        def t(q):
            return [e[2] for e in fake.calls(q)]
        assert t("q0")[1] - t("q0")[0] == pytest.approx(2.5)             # Retry-After honoured
        assert t("q8")[1] - t("q8")[0] == pytest.approx(0.7)
        w1, w2 = t("q9")[1] - t("q9")[0], t("q9")[2] - t("q9")[1]        # exponential + jitter
        assert 0.5 <= w1 <= 1.0 and 1.0 <= w2 <= 2.0
        assert t("q3")[1] == t("q3")[0]                                  # a re-ask needs no wait
    else:
        assert 2.5 in fake.clock.sleeps and 0.7 in fake.clock.sleeps
    # one per retried request (q0 q1 q2 q4, 2 each for q6 q8 q9); none to re-ask
    assert len(fake.clock.sleeps) == 10


@pytest.mark.parametrize("workers", [1, 3])
def test_interrupt_and_resume(env, fake, workers):
    n, k, path, seen = 8, 3, env / "cache.jsonl", []

    class Killed(Exception):
        pass

    def kill_after_k(key, verdict):  # the batch dies (in the main thread) after its k-th verdict
        seen.append(key)
        if len(seen) == k:
            raise Killed

    with pytest.raises(Killed):
        judge.rate_items(items(n), make_judge(fake), judge.Cache(path), image_dir=env, workers=workers,
                         on_result=kill_after_k)
    first = len(fake.log)
    assert k <= first < k + workers        # calls already in flight finish; no new ones start
    cached = len(path.read_text().splitlines())
    assert cached == first                 # every paid verdict reached the cache
    out, stats = judge.rate_items(items(n), make_judge(fake), judge.Cache(path), image_dir=env,
                                  workers=workers)
    assert len(fake.log) - first == n - cached                                  # exactly the remaining calls
    assert sorted(e[0] for e in fake.log) == sorted(f"q{i}" for i in range(n))  # no item paid twice
    assert stats["cached"] == cached and stats["new"] == n - cached
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    # the cache holds each item once
    assert len(keys) == len(set(keys)) == n
    assert all(r["scores"] == [8, 6] for r in out)
    judge.rate_items(items(n), make_judge(fake), judge.Cache(path), image_dir=env)
    assert len(fake.log) == n                                                   # a third run is free


def test_cache_survives_a_cut_line(env, fake):
    path = env / "cache.jsonl"
    judge.rate_items(items(2), make_judge(fake), judge.Cache(path), image_dir=env)
    path.write_text(path.read_text() + '{"key": "abc", "verd')  # a kill in the middle of a write
    judge.rate_items(items(3), make_judge(fake), judge.Cache(path), image_dir=env)
    assert len(fake.log) == 3
    c = judge.Cache(path)
    assert len(c.data) == 3


def test_key_never_leaks(env, fake, caplog, capsys, monkeypatch):
    fake.script = {"q0": ["400"], "q1": ["429:1", "ok"], "q2": ["slow", "500", "ok"]}
    (env / "in.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items(4)))
    caplog.set_level(logging.DEBUG)
    argv = ["rate", str(env / "in.jsonl"), "--out", str(env / "out.jsonl"), "--image_dir", str(env),
            "--cache", str(env / "cache.jsonl"), "--base_url", fake.url, "--api_key_env", "JUDGE_TEST_KEY",
            "--timeout", "1.0", "--max_tries", "3", "--workers", "2"]
    real = judge.ChatClient
    assert KEY not in repr(real(fake.url, api_key_env="JUDGE_TEST_KEY"))
    # no real waits
    monkeypatch.setattr(judge, "ChatClient", lambda *a, **kw: real(*a, sleep=fake.clock.sleep, **kw))
    judge.main(argv)
    out = [json.loads(line) for line in (env / "out.jsonl").read_text().splitlines()]
    assert "HTTP 400" in out[0]["error"] and "***" in out[0]["error"]          # the echoed key was scrubbed
    assert [("error" in r) for r in out] == [True, False, False, False]
    assert fake.calls("q0")[0][3] == f"Bearer {KEY}"                          # and it was really sent
    written = "".join(p.read_text(errors="replace") for p in env.rglob("*") if p.is_file())
    captured = capsys.readouterr()
    assert KEY not in written and KEY not in caplog.text and KEY not in captured.out + captured.err
    assert "items 4: cached 0, new 3, failed 1" in captured.out and "ETA" in caplog.text  # summary, progress


def test_swap_averages_and_counts_disagreement(env, fake):
    def reply(body):  # prefers answers containing "good"; biased towards position 1 when neither does
        text = body["messages"][-1]["content"][0]["text"]
        a1 = re.search(r"\[Answer 1\]\n(.*?)\n", text).group(1)
        a2 = re.search(r"\[Answer 2\]\n(.*?)\n", text).group(1)
        return "9 4" if "good" in a1 else "4 9" if "good" in a2 else "7 5"
    fake.reply = reply
    its = [{"image": "img.png", "question": "qa", "answers": ["bad", "good"]},
           {"image": "img.png", "question": "qb", "answers": ["meh", "so-so"]}]
    out, stats = judge.rate_items(its, make_judge(fake), None, swap=True, image_dir=env)
    assert out[0]["scores"] == [4, 9] and out[0]["scores_swapped"] == [4, 9] and not out[0]["orders_disagree"]
    assert out[1]["scores"] == [6, 6] and out[1]["orders_disagree"]          # position bias, exposed
    assert stats["disagree"] == 1 and len(fake.log) == 4
    assert "disagree on 1/2 items" in judge.summary(stats, make_judge(fake), 2.5, 10)


def test_winrate_cli(env, fake, capsys):
    def reply(body):
        assert body["messages"][0]["content"] == judge.WINRATE_SYSTEM
        text = body["messages"][-1]["content"][0]["text"]
        a = re.search(r"\[Assistant A\]\n(.*?)\n", text).group(1)
        return "A is right. [[A]]" if a.startswith("right") else "B is right. [[B]]"
    fake.reply = reply
    # model A right on q0-q5, B right on q6-q7; q8 is closed and skipped. Answers in evaluate.py's format.
    test = [{"qid": i, "image_name": "img.png", "question": f"q{i}", "answer": "x", "answer_type": "OPEN"}
            for i in range(8)] + [{"qid": 8, "image_name": "img.png", "question": "q8", "answer": "yes",
                                   "answer_type": "CLOSED"}]
    (env / "test.json").write_text(json.dumps(test))
    for name, good in (("a.jsonl", range(6)), ("b.jsonl", range(6, 9))):
        (env / name).write_text("".join(
            json.dumps({"question_id": str(i), "text": "right" if i in good else "wrong"}) + "\n"
            for i in range(9)))
    judge.main(["winrate", str(env / "a.jsonl"), str(env / "b.jsonl"), "--questions", str(env / "test.json"),
                "--image_dir", str(env), "--base_url", fake.url, "--api_key_env", "JUDGE_TEST_KEY",
                "--cache", str(env / "c.jsonl")])
    out = capsys.readouterr().out
    assert "win rate of A over B: 0.750" in out and "6 wins, 0 ties, 2 losses" in out
    assert len(fake.log) == 16   # 8 open questions x 2 orders


def test_bootstrap_is_seeded_and_brackets_the_mean():
    # the one bootstrap (evaluate.py), which judge.py's win rates use too; x100 like the metrics
    x = np.array([1.0] * 30 + [0.0] * 10)
    lo, hi = E.bootstrap(x, 1000, 0)
    assert 100 * x.mean() == 75.0 and lo < 75.0 < hi and [lo, hi] == E.bootstrap(x, 1000, 0)
    assert E.bootstrap(np.ones(5), 1000, 0) == [100.0, 100.0]


def test_relative_score(env, fake):
    fake.reply = lambda body: "8 6\nAssistant 1 is more complete."
    s_ref, s_ans, expl = make_judge(fake).relative(env / "img.png", "q0", "the reference", "the answer",
                                                   "a caption")
    assert (s_ref, s_ans) == (8, 6) and expl.startswith("Assistant 1")
    assert fake.log[0][4]


def test_oracle_judge_offline(env):
    facts = {"img.png": {"organ": "liver"}}

    def score(f, q, a):
        return 10.0 if f["organ"] in a else 2.0
    o = judge.OracleJudge(score, facts)
    assert o.rate_pair(env / "img.png", "organ?", "the liver", "the brain")[:2] == (10.0, 2.0)
    assert o.win("img.png", "organ?", "liver", "brain", "liver") == "B"
    out, stats = judge.rate_items(items(2), o, judge.Cache(env / "oc.jsonl"), image_dir="/elsewhere")
    assert [r["scores"] for r in out] == [[2.0, 2.0]] * 2 and stats["new"] == 2


def test_duplicate_items_are_judged_once(env, fake):
    out, stats = judge.rate_items(items(2) + items(2), make_judge(fake), judge.Cache(env / "c.jsonl"),
                                  image_dir=env)
    assert len(fake.log) == 2 and stats["units"] == 2
    assert len(out) == 4 and all("scores" in r for r in out)
    assert len((env / "c.jsonl").read_text().splitlines()) == 2


def test_cli_oracle_path(env, monkeypatch, capsys):
    """--judge oracle imports score_answer/synth_data from synth.py lazily (a stand-in module here)."""
    import types
    stand_in = types.SimpleNamespace(score_answer=lambda f, q, a: 9.0 if f["organ"] in a else 3.0,
                                     synth_data=lambda: env)
    monkeypatch.setitem(__import__("sys").modules, "synth", stand_in)
    (env / "facts.json").write_text(json.dumps({"img.png": {"organ": "liver"}}))
    its = [{"image": "img.png", "question": "organ?", "answers": ["brain", "liver"]}]
    (env / "in.jsonl").write_text(json.dumps(its[0]) + "\n")
    judge.main(["rate", str(env / "in.jsonl"), "--out", str(env / "out.jsonl"), "--judge", "oracle",
                "--cache", ""])
    assert json.loads((env / "out.jsonl").read_text())["scores"] == [3.0, 9.0]
    assert "new 1, failed 0" in capsys.readouterr().out


# --- a hostile server ---------------------------------------------------------------------------------
def rate_argv(env, fake, its, *extra):
    (env / "in.jsonl").write_text("".join(json.dumps(it) + "\n" for it in its))
    return ["rate", str(env / "in.jsonl"), "--out", str(env / "out.jsonl"), "--image_dir", str(env),
            "--cache", str(env / "cache.jsonl"), "--base_url", fake.url, "--api_key_env", "JUDGE_TEST_KEY",
            "--timeout", "1.0", "--max_tries", "3", "--workers", "2", *extra]


@pytest.fixture
def no_waits(fake, monkeypatch):
    real = judge.ChatClient
    monkeypatch.setattr(judge, "ChatClient", lambda *a, **kw: real(*a, sleep=fake.clock.sleep, **kw))


def test_every_transport_failure_is_retried(env, fake):
    fake.script = {f"q{i}": [s, "ok"] for i, s in enumerate(["cut", "hang", "429", "nonjson", "nochoices",
                                                             "reset", "badgzip", "503"])}
    out, stats = judge.rate_items(items(8), make_judge(fake, max_tries=2), None, image_dir=env, workers=4)
    assert [r.get("scores") for r in out] == [[8, 6]] * 8, out
    assert all(len(fake.calls(f"q{i}")) == 2 for i in range(8))


@pytest.mark.parametrize("name", ["SSLError", "ChunkedEncodingError", "ContentDecodingError", "ProxyError"])
def test_tls_and_protocol_errors_are_retried(env, fake, name):
    exc = getattr(requests.exceptions, name)

    class Flaky(requests.Session):  # fails once, then is a real session
        n = 0

        def post(self, *a, **kw):
            Flaky.n += 1
            if Flaky.n == 1:
                raise exc("boom")
            return super().post(*a, **kw)
    c = make_judge(fake).client
    c._local.session = Flaky()
    assert c.chat("[Question]\nq0\n") == OK_REPLY and Flaky.n == 2 and len(fake.log) == 1


def test_a_bad_request_fails_its_item_without_retry(env, fake):
    fake.script = {"q0": ["400"]}
    out, _ = judge.rate_items(items(2), make_judge(fake), None, image_dir=env)
    assert "HTTP 400" in out[0]["error"] and len(fake.calls("q0")) == 1 and out[1]["scores"] == [8, 6]


@pytest.mark.parametrize("code", ["401", "403"])
def test_a_refused_key_stops_the_run(env, fake, no_waits, code, capsys):
    fake.script = {f"q{i}": [code] for i in range(12)}
    with pytest.raises(SystemExit) as e:
        judge.main(rate_argv(env, fake, items(12)))
    msg = str(e.value.code)
    assert f"HTTP {code}" in msg and "$JUDGE_TEST_KEY" in msg and "\n" not in msg and KEY not in msg
    assert len(fake.log) <= 2                      # the calls in flight (2 workers), no more
    assert not (env / "out.jsonl").exists()


def test_a_malformed_key_stops_the_run_unsent(env, fake, monkeypatch, capsys):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-abc\ndef-0123456789")
    with pytest.raises(SystemExit) as e:
        judge.main(rate_argv(env, fake, items(3)))
    assert "malformed" in str(e.value.code) and "$JUDGE_TEST_KEY" in str(e.value.code)
    assert "0123456789" not in str(e.value.code) + "".join(capsys.readouterr()) and not fake.log


def test_timeout_is_a_deadline_for_the_whole_reply(env, fake):
    fake.script = {"q0": ["trickle"]}  # ten pieces 0.3 s apart: each read within 1 s, the reply in 3 s
    t = time.monotonic()
    out, _ = judge.rate_items(items(1), make_judge(fake, max_tries=1), None, image_dir=env)
    assert "error" in out[0] and time.monotonic() - t < 2.5


def test_a_key_with_whitespace_never_leaks(env, fake, monkeypatch, caplog, capsys):
    monkeypatch.setenv("JUDGE_TEST_KEY", f"  {KEY}\n")  # as read from a secret file
    caplog.set_level(logging.DEBUG)
    fake.script = {"q0": ["401"]}
    with pytest.raises(SystemExit) as e:
        judge.main(rate_argv(env, fake, items(3), "--workers", "1"))
    assert fake.log[0][3] == f"Bearer {KEY}"                                   # stripped, and sent
    written = "".join(p.read_text(errors="replace") for p in env.rglob("*") if p.is_file())
    captured = capsys.readouterr()
    assert KEY not in written + caplog.text + captured.out + captured.err + str(e.value.code)
    # requests' InvalidHeader quotes a key with its newline escaped: scrubbed in that form too
    assert KEY not in judge.scrub(repr({"Authorization": f"Bearer   {KEY}\n"}))
    assert KEY not in repr(judge.ChatClient(fake.url, api_key_env="JUDGE_TEST_KEY"))


def test_bad_input_stops_before_any_call(env, fake, capsys):
    good = json.dumps(items(1)[0])
    cases = [("missing.jsonl", None, "missing.jsonl"),
             ("broken.jsonl", good + "\n\n" + '{"image": "img.png", "question": "q1",\n',
              "broken.jsonl, line 3"),
             ("noanswers.jsonl", good + "\n" + json.dumps({"image": "img.png", "question": "q"}),
              "noanswers.jsonl, line 2"),
             ("empty.jsonl", "\n", "no items")]
    for name, text, want in cases:
        if text is not None:
            (env / name).write_text(text)
        with pytest.raises(runs.UsageError) as e:  # one line, exit code 2 from the command line
            judge.main(["rate", str(env / name), "--out", str(env / "out.jsonl"), "--base_url", fake.url,
                        "--api_key_env", "JUDGE_TEST_KEY", "--cache", ""])
        assert want in str(e.value) and "\n" not in str(e.value)
    (env / "in.jsonl").write_text(good + "\n")
    with pytest.raises(runs.UsageError) as e:  # the output folder is checked before any call
        judge.main(["rate", str(env / "in.jsonl"), "--out", str(env / "nowhere" / "out.jsonl"),
                    "--base_url", fake.url, "--api_key_env", "JUDGE_TEST_KEY", "--cache", ""])
    assert "nowhere" in str(e.value) and not fake.log


def test_failures_are_kept_and_reasked_only_on_request(env, fake, no_waits, capsys):
    fake.script = {"q0": ["noscores", "noscores"], "q1": ["400"]}
    argv = rate_argv(env, fake, items(3))
    judge.main(argv)
    out = [json.loads(x) for x in (env / "out.jsonl").read_text().splitlines()]
    assert "unparseable" in out[0]["error"] and "I cannot judge" in out[0]["error"]   # the reason, the reply
    assert "HTTP 400" in out[1]["error"] and out[2]["scores"] == [8, 6]
    n = len(fake.log)
    judge.main(argv)
    assert len(fake.log) == n and "error" in json.loads((env / "out.jsonl").read_text().splitlines()[0])
    judge.main(argv + ["--retry_failed"])
    assert len(fake.log) == n + 2
    assert all("scores" in json.loads(x) for x in (env / "out.jsonl").read_text().splitlines())
    fake.script = {"z0": ["400"], "z1": ["400"]}
    with pytest.raises(SystemExit) as e:  # every item failed: a non-zero exit
        judge.main(rate_argv(env, fake, items(2, "z")))
    assert "every item failed" in str(e.value.code)


def test_spend_ledger_and_progress(env, fake, no_waits, caplog, capsys):
    caplog.set_level(logging.INFO)
    fake.usage = lambda q, n: (1000 + int(q[1:]), 100)
    judge.main(rate_argv(env, fake, items(3)) + ["--price_in", "1", "--price_out", "2"])
    judge.main(rate_argv(env, fake, items(5)) + ["--price_in", "1", "--price_out", "2"])
    rows = [json.loads(x) for x in (env / "judge_spend.jsonl").read_text().splitlines()]
    assert len(rows) == len(fake.billed) == 5                               # each paid reply once
    assert sum(r["prompt_tokens"] for r in rows) == sum(b[1] for b in fake.billed) == 5010
    assert sum(r["cost"] for r in rows) == pytest.approx((5010 * 1 + 500 * 2) / 1e6)
    out = capsys.readouterr().out
    assert "$0.0060" in out                                                  # the ledger's total so far
    assert re.search(r"5/5 done \(3 cached\), 0 failed, .*/s, ETA .*\$0\.0060", caplog.text)
    assert "not OpenAI" in caplog.text                                       # a price note for 127.0.0.1


def test_progress_line_at_a_steady_interval(caplog):
    caplog.set_level(logging.INFO)
    judge.run_batch([(i, i) for i in range(3)], lambda u: time.sleep(0.35) or {"scores": [u, u]},
                    workers=1, progress_every=0.1)
    assert len(re.findall(r"done \(0 cached\), 0 failed", caplog.text)) >= 6   # also while nothing finishes


def test_dpo_judge_step_passes_the_settings_through(env, fake, no_waits, tmp_path, capsys):
    fake.script = {"q1": ["hang", "ok"]}
    cfg = replace(dpo.Config(), base_url=fake.url, api_key_env="JUDGE_TEST_KEY", timeout=1.0, max_tries=2,
                  workers=3, out_dir=str(tmp_path), price_in=0.0)
    j = dpo.make_judge(cfg)
    assert (j.client.timeout, j.client.max_tries) == (1.0, 2)
    rows = [{"image": "img.png", "question": f"q{i}", "answers": ["a", "b"]} for i in range(3)]
    pairs = dpo.judge_step(cfg, rows, env, j, str(tmp_path / "pairs.jsonl"), "")
    assert len(pairs) == 3 and (tmp_path / "judge_spend.jsonl").exists()
    assert "3/3 done" in capsys.readouterr().out


CHAOS = ["429:0.2", "429", "500", "503", "hang", "cut", "reset", "nonjson", "nochoices", "malformed",
         "say:I cannot judge this.", "say:8", "say:12 5", "say:-3 7"]
SHAPES = ["{a} {b}\nsee {q}", "Answer 2: {b}\nAnswer 1: {a}\nsee {q}",
          "{b} for Answer 2 and {a} for Answer 1", "Score 1: {a}\nScore 2: {b}", "1) {a}\n2) {b}",
          "**Answer 1:** {a}/10\n**Answer 2:** {b}/10"]


@pytest.mark.parametrize("workers", [1, 4])
def test_chaotic_server(env, fake, workers):
    rng, meant, hangs = random.Random(20), {}, 0
    for i in range(30):
        q = f"c{i}"
        meant[q] = [rng.randint(1, 10), rng.randint(1, 10)]
        steps = [rng.choice(CHAOS) for _ in range(rng.choice([0, 0, 1, 2, 3, 4, 5]))]
        for k, s in enumerate(steps):  # a hang costs the deadline in wall time: two per run
            hangs += s == "hang"
            steps[k] = "500" if s == "hang" and hangs > 2 else s
        fake.script[q] = steps + ["say:" + rng.choice(SHAPES).format(a=meant[q][0], b=meant[q][1], q=q)]
    fake.usage, fake.hang = (lambda q, n: (50 + 7 * int(q[1:]) + n, 5 + n)), 2.0
    ledger = judge.Ledger(env / "spend.jsonl", 2.5, 10.0)
    # a deadline generous for a loopback reply (a missed good reply would be paid twice), short of a hang
    j = judge.GPTJudge(judge.ChatClient(fake.url, "gpt-4o", "JUDGE_TEST_KEY", timeout=1.5, max_tries=3,
                                        sleep=fake.clock.sleep, ledger=ledger))
    out, stats = judge.rate_items(items(30, "c"), j, judge.Cache(env / "c.jsonl"), image_dir=env,
                                  workers=workers)
    good = Counter(b[0] for b in fake.billed if b[3] == fake.script[b[0]][-1][4:])
    for r in out:
        q = r["question"]
        assert r.get("scores") == meant[q] or "error" in r, r  # the verdict meant, or an explicit failure
        assert good[q] == ("scores" in r)                       # exactly one successful paid reply if judged
    assert 10 <= sum("scores" in r for r in out) < 30
    rows = [json.loads(x) for x in (env / "spend.jsonl").read_text().splitlines()]
    assert len(rows) == len(fake.billed)
    assert [sum(r[k] for r in rows) for k in ("prompt_tokens", "completion_tokens")] == \
        [sum(b[1] for b in fake.billed), sum(b[2] for b in fake.billed)]


def test_sigkill_and_rerun(env, fake):
    def reply(body):
        q = re.search(r"\[Question\]\n(.*?)\n", body["messages"][-1]["content"][0]["text"]).group(1)
        time.sleep(0.02)
        return f"{int(q[1:]) % 10 + 1} {int(q[1:]) // 3 % 10 + 1}\nabout {q}"
    fake.reply = reply
    n = 24
    argv = rate_argv(env, fake, items(n))
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "judge.py"), *argv]
    lines = {"cache": env / "cache.jsonl", "ledger": env / "judge_spend.jsonl"}
    rng, marks = random.Random(0), []
    for _ in range(3):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        at = len(fake.log) + rng.randint(1, 6)  # killed after a random number of requests, at a random time
        t = time.monotonic()
        while len(fake.log) < at and p.poll() is None and time.monotonic() - t < 30:
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.03))
        p.kill()
        p.wait()
        cached = {json.loads(x)["verdict"]["explanation"][6:]
                  for x in lines["cache"].read_text().splitlines()}
        marks.append((len(fake.log), cached))
    assert subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    for mark, cached in marks:  # what the cache held at a kill was never asked again
        assert not {e[0] for e in fake.log[mark:]} & cached
    for path in lines.values():  # both parse line by line
        assert all(json.loads(x) for x in path.read_text().splitlines())
    ledger = [json.loads(x) for x in lines["ledger"].read_text().splitlines()]
    assert n <= len(ledger) <= len(fake.billed) and sum(e[0] == "q0" for e in fake.log) >= 1
    killed_out = (env / "out.jsonl").read_text()
    judge.main(argv[:7] + [str(env / "fresh.jsonl")] + argv[8:])  # an uninterrupted run, a fresh cache
    assert (env / "out.jsonl").read_text() == killed_out


# ----------------------------------------------------------------------------- selector.py
# BioMed-VITAL's learned data selector (mao1207/BioMed-VITAL @ f6ccf75, filter/train_clip_filter.py and
# filter/filter.py).

# --- BioMed-VITAL's selector: loss, k-means, per-cluster top K% --------------------------------------
def _eq3(f_i, f_j, s_i, s_j, w):
    """Eq. 3 written out per pair: z from Eq. 2 (R_i >= R_j -> (1, 0), so a tie counts for x_i), σ over the
    pair."""
    total = 0.0
    for a, b, ra, rb, wk in zip(f_i, f_j, s_i, s_j, w):
        z_i, z_j = (1, 0) if ra >= rb else (0, 1)
        p_i = 1 / (1 + math.exp(-(a - b)))  # softmax of (f_i, f_j), entry i
        total += -wk * (z_i * math.log(p_i) + z_j * math.log(1 - p_i))
    return total / len(f_i)


def test_pairwise_loss_is_eq3_with_the_tie_rule():
    g = torch.Generator().manual_seed(0)
    f_i, f_j = (torch.randn(50, generator=g, dtype=torch.float64) * 3,
                torch.randn(50, generator=g, dtype=torch.float64))
    s_i, s_j = (torch.randint(0, 4, (50,), generator=g).double(),
                torch.randint(0, 4, (50,), generator=g).double())
    assert (s_i == s_j).sum() >= 5  # the tie rule is exercised
    w = torch.where(torch.arange(50) % 7 == 0, 400.0, 1.0).double()  # human pairs weigh w, model pairs 1
    got = SEL.pairwise_loss(f_i, f_j, s_i, s_j, w)
    assert got.item() == pytest.approx(
        _eq3(f_i.tolist(), f_j.tolist(), s_i.tolist(), s_j.tolist(), w.tolist()), rel=1e-12)
    # a second oracle: weighted binary cross-entropy on the rating difference, labels z_i = [s_i >= s_j]
    bce = F.binary_cross_entropy_with_logits(f_i - f_j, (s_i >= s_j).double(), weight=w)
    assert got.item() == pytest.approx(bce.item(), rel=1e-12)
    assert SEL.pairwise_loss(f_i, f_j, s_i, s_j, 2.0).item() == pytest.approx(
        2 * SEL.pairwise_loss(f_i, f_j, s_i, s_j, 1.0).item(), rel=1e-12)  # scalar w


def test_tie_counts_for_the_first_sample():
    def one(*v):
        return torch.tensor(v, dtype=torch.float64)
    tie_first_higher = SEL.pairwise_loss(one(2.0), one(0.0), one(5.0), one(5.0), 1.0)
    tie_first_lower = SEL.pairwise_loss(one(0.0), one(2.0), one(5.0), one(5.0), 1.0)
    assert tie_first_higher.item() == pytest.approx(-math.log(1 / (1 + math.exp(-2))))
    assert tie_first_lower.item() == pytest.approx(-math.log(1 / (1 + math.exp(2))))  # order matters on a tie
    f_i = one(0.0).requires_grad_()
    SEL.pairwise_loss(f_i, one(0.0), one(5.0), one(5.0), 1.0).backward()
    assert f_i.grad.item() < 0  # gradient descent raises the first sample of a tied pair


@pytest.mark.parametrize("w, human_wins", [(400.0, True), (1.0, False)])
def test_w_weighs_the_human_pairs(w, human_wins):
    # 4 human pairs prefer sample a, 40 model pairs prefer b: w = 400 lets the few human pairs win (as the
    # paper's "balance" needs), w = 1 lets the many model pairs win
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    human = torch.tensor([True] * 4 + [False] * 40)
    x_i, x_j = a.repeat(44, 1), b.repeat(44, 1)
    s_i, s_j = torch.where(human, 1.0, 0.0), torch.where(human, 0.0, 1.0)
    head = SEL.train_selector(x_i, x_j, s_i, s_j, human, w=w, epochs=30, lr=1e-3, batch=11, hidden=16)
    with torch.no_grad():
        assert (head(a) > head(b)).item() == human_wins


def _blobs(sizes, dim=6, spread=10.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(sizes), dim, generator=g) * spread
    x = torch.cat([c + torch.randn(n, dim, generator=g) for c, n in zip(centres, sizes)])
    truth = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    perm = torch.randperm(len(x), generator=g)
    return x[perm], truth[perm], centres


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_recovers_planted_clusters(seed):
    x, truth, centres = _blobs([40, 25, 60, 8, 30], seed=seed)
    labels, found = SEL.kmeans(x, 5, iters=50, seed=seed)
    mapping = {c: set(labels[truth == c].tolist()) for c in range(5)}
    assert all(len(m) == 1 for m in mapping.values())  # every planted cluster is one found cluster ...
    assert len(set().union(*mapping.values())) == 5  # ... and no two share one
    for c in range(5):  # centres land on the planted ones (within the noise of a mean of >= 8 points)
        assert torch.dist(found[next(iter(mapping[c]))], centres[c]) < 1.5
    again, _ = SEL.kmeans(x, 5, iters=50, seed=seed)
    assert torch.equal(labels, again)  # seeded
    with pytest.raises(ValueError):
        SEL.kmeans(x[:3], 5)


def test_kmeans_plus_plus_seeding_spreads_the_centres():
    # blobs 1000x further apart than their spread: D^2 sampling puts the k initial centres in k different
    # blobs (almost surely), where uniform seeding would do so for 5 equal blobs only 5!/5^5 = 4% of the time
    x, truth, _ = _blobs([30] * 5, spread=1000.0)
    for seed in range(5):
        _, init = SEL.kmeans(x, 5, iters=0, seed=seed, n_init=1)  # iters=0: the seeding itself
        nearest = torch.cdist(init, x).argmin(1)
        assert len(set(truth[nearest].tolist())) == 5


def test_kmeans_plus_plus_with_duplicate_points():
    x = torch.tensor([[0.0, 0.0]] * 5 + [[3.0, 3.0]] * 5)
    labels, _ = SEL.kmeans(x, 3, seed=0)  # only 2 distinct points for 3 clusters: must not crash
    assert len(set(labels[:5].tolist())) == 1 and len(set(labels[5:].tolist())) == 1


# ceil(K% x size) per cluster, worked out by hand for cluster sizes 30, 7, 1, 10, 4
EXPECTED_KEPT = {0.1: [3, 1, 1, 1, 1], 0.25: [8, 2, 1, 3, 1], 0.5: [15, 4, 1, 5, 2], 0.8: [24, 6, 1, 8, 4],
                 1.0: [30, 7, 1, 10, 4]}


@pytest.mark.parametrize("frac", sorted(EXPECTED_KEPT))
def test_select_top_keeps_ceil_of_each_cluster(frac):
    g = torch.Generator().manual_seed(1)
    sizes = [30, 7, 1, 10, 4]
    clusters = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])[torch.randperm(52, generator=g)]
    scores = torch.randn(52, generator=g)
    keep = SEL.select_top(scores, clusters, frac)
    assert torch.equal(keep, keep.sort().values) and len(set(keep.tolist())) == len(keep)
    for c, n in enumerate(sizes):
        members = (clusters == c).nonzero().flatten().tolist()
        best = sorted(members, key=lambda i: -scores[i].item())[:EXPECTED_KEPT[frac][c]]
        assert sorted(i for i in keep.tolist() if clusters[i] == c) == sorted(best)


def test_select_top_rounding_is_exact_for_float_products():
    clusters, scores = torch.zeros(100, dtype=torch.long), torch.arange(100.0)
    assert len(SEL.select_top(scores, clusters, 0.07)) == 7  # 0.07 * 100 = 7.000000000000001 in floats


def test_pair_accuracy_and_auc():
    def t(*v):
        return torch.tensor(v, dtype=torch.float64)
    # the tied pair is left out
    assert SEL.pair_accuracy(t(1, 0, 3), t(0, 1, 3), t(2, 2, 1), t(1, 1, 1)) == 0.5
    assert SEL.auc(t(3, 2, 1, 0), torch.tensor([True, True, False, False])) == 1.0
    assert SEL.auc(t(1, 1), torch.tensor([True, False])) == 0.5


# --- the trained selector on synthetic data with known corruption ------------------------------------
@pytest.fixture(scope="module")
def selection_setup(tmp_path_factory):
    """A frozen *random-init* tiny model (no training needed) and the synthetic describe-the-image samples
    (captions.json: "<image>\\nDescribe the image concisely." -> caption), 30% of them corrupted into a
    coherent caption of another image (modality, organ and lesion count all wrong)."""
    from data import load_tokenizer
    from model import CONFIGS, Llava
    torch.manual_seed(0)
    S = SY
    tok = load_tokenizer(S.synth_data() / "tokenizer.json")
    cfg = CONFIGS["tiny"]
    model = Llava(replace(cfg, text=replace(cfg.text, vocab_size=tok.get_vocab_size()),
                          image_token_id=S.SYNTH_IMAGE_TOKEN_ID))
    data, pairs_path, image_dir = SEL.synthetic_selection_data(tmp_path_factory.mktemp("select"), corrupt=0.3,
                                                               n_model=2000, n_human=10,
                                                               source="captions.json")
    records, pairs = json.loads(data.read_text()), SEL.read_pairs(pairs_path)
    items, ij, rows = SEL.index_samples(pairs, records)
    with torch.no_grad():
        feats = SEL.selector_features(model, tok, items, image_dir)
    seen = {x["image"] for p in pairs for x in p["items"]}
    return dict(records=records, pairs=pairs, feats=feats, ij=ij, rows=rows, dv=cfg.vision.hidden_size,
                bad=torch.tensor([r["corrupted"] for r in records]),
                unseen=torch.tensor([r["image"] not in seen for r in records]))


def _train_and_auc(d, feats):
    s = torch.tensor([p["scores"] for p in d["pairs"]])
    human = torch.tensor([p["source"] == "human" for p in d["pairs"]])
    # the paper's settings
    head = SEL.train_selector(feats[d["ij"][:, 0]], feats[d["ij"][:, 1]], s[:, 0], s[:, 1], human, w=400.0,
                              epochs=6, lr=1e-4, batch=64, seed=0)
    with torch.no_grad():
        scores = head(feats[d["rows"]])
    return SEL.auc(scores[d["unseen"]], ~d["bad"][d["unseen"]])


def test_synthetic_selection_data_is_as_documented(selection_setup):
    d = selection_setup
    assert len(d["records"]) == 800 and d["bad"].float().mean().item() == pytest.approx(0.3)
    assert d["unseen"][560:].all()  # the last 30% of images never appear in a training pair
    assert sum(p["source"] == "human" for p in d["pairs"]) == 10
    assert all(p["scores"][0] != p["scores"][1] for p in d["pairs"])  # drawn at two levels, as the authors do
    S = SY
    facts = json.loads((S.synth_data() / "facts.json").read_text())
    for r in d["records"][:100]:  # corrupted captions state wrong facts, clean ones are right
        f, caption = facts[r["image"]], r["conversations"][1]["value"]
        assert (S.score_answer(f, "Describe the image concisely.", caption) < 5) == r["corrupted"]


def test_selector_ranks_clean_over_corrupted(selection_setup):
    """What this shows: trained with Eq. 3 on oracle/"clinician" pairs, the MLP over *frozen random*
    tiny-model features ranks clean over corrupted samples of images it never saw in a pair with AUC >= 0.9.
    The control (each sample's image features swapped for another sample's) drops to chance, so the ranking
    comes from image-text consistency, not from a text-only tell. It does not show that a trained model's
    features are better, nor how the selector does on conversation-level samples."""
    d = selection_setup
    assert _train_and_auc(d, d["feats"]) >= 0.9
    g = torch.Generator().manual_seed(1)
    shuffled = d["feats"].clone()
    shuffled[:, :d["dv"]] = shuffled[torch.randperm(len(shuffled), generator=g), :d["dv"]]
    assert _train_and_auc(d, shuffled) < 0.7


# ----------------------------------------------------------------------------- evaluate.py
# Metrics: hand-worked cases whose expected values are derived here from LLaVA-Med's definitions
# (eval_metrics/glossary.py, evaluate_metrics.py @ b9a98a7), not copied from our output.
# Data: the real VQA-RAD / SLAKE test sets in ../shared/data (skipped when absent).

need_data = pytest.mark.skipif(not (SHARED / "slake" / "test.json").exists() or
                               not (SHARED / "vqa_rad" / "VQA_RAD_Dataset_Public.json").exists(),
                               reason=f"real VQA-RAD/SLAKE test sets not found at {SHARED} "
                                      "(see shared/data/README.md)")


def last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def write_answers(path, pairs):
    with open(path, "w") as f:
        for qid, text in pairs:
            f.write(json.dumps({"question_id": qid, "text": text}) + "\n")


# --- metric rules, by hand ---------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    # " (" has a space -> "(" removed; ")" and "-" -> space; "cm." loses its dot
    ("3.5 cm. x-ray (ct)", "3.5 cm x ray ct"),
    # one spaced "-" in the ORIGINAL string makes every "-" vanish: "x-ray" -> "xray"
    ("x-ray - ct", "xray ct"),
    # "/" -> space puts " (" in the EDITED string only; the test reads the original,
    # so "(" still becomes a space (testing the edited string would give "ctmr")
    ("ct(mr/(", "ct mr"),
    ("1,000 x-ray", "1000 xray"),      # a digit,digit anywhere: every punctuation mark is removed, not spaced
    ("left/right", "left right"),      # no space next to "/": it becomes a space
    # "? " has a space -> "?" removed; "!" has none -> a space, stripped by split
    ("Is it? Yes!", "is it yes"),
    ("the left lung", "left lung"),    # articles dropped
    ("a an the", ""),                  # only articles -> empty string
    ("Two lesions", "2 lesions"),      # number words -> digits (after lower-casing)
    ("none", "0"),                     # "none" is a number word too
    ("dont know", "don't know"),       # contractions table
    ("Im here", "im here"),            # the table's capitalised keys can never match lower-cased words
    ("no.", "no"),                     # trailing period removed
    ("2.5.", "2.5"),                   # a period before a digit survives, the final one does not
])
def test_normalize_word(raw, expected):
    assert MET.normalize_word(raw.lower()) == expected


def test_period_limit_is_32():
    # re.UNICODE (=32) is passed as `count`: only the first 32 periods not followed by a digit go
    s = " ".join(["x."] * 40)
    assert MET.normalize_word(s).count(".") == 40 - 32


def prf(tp, fp, fn):
    """The definition: precision tp/(tp+fp), recall tp/(tp+fn), F1 their harmonic mean; 0 if tp == 0."""
    if tp == 0:
        return 0.0, 0.0, 0.0
    p, r = tp / (tp + fp), tp / (tp + fn)
    return 2 * p * r / (p + r), p, r


@pytest.mark.parametrize("pred, gt, tp, fp, fn", [
    ("left upper lobe of the lung", "left lung", 2, 3, 0),  # "the" dropped: 5 pred words, left+lung shared
    ("left left", "left lung", 2, 0, 1),     # tp counted from the PREDICTION's counts: recall 2/3, not 1/2
    ("left", "left left", 1, 0, 0),          # a repeated gt word is never a false negative once it appears
    ("Lung.", "the lung", 1, 0, 0),          # punctuation, case and articles normalised away
    ("2 lesions", "two", 1, 1, 0),           # number word in the gt -> "2"
    ("heart", "liver", 0, 1, 1),             # nothing shared -> all zero
])
def test_f1score(pred, gt, tp, fp, fn):
    assert MET.calculate_f1score(pred.lower(), gt.lower()) == pytest.approx(prf(tp, fp, fn))


def test_empty_prediction_scores_zero():
    s = MET.score_item("", "yes")
    assert (s["closed"], s["closed_run_eval"], s["closed_strict"], s["f1"], s["recall"],
            s["em_score"]) == (0,) * 6
    # a gt that normalises to nothing scores 0 too
    assert MET.calculate_f1score("lung", "the") == (0.0, 0.0, 0.0)


def test_exact_match_score():
    # distinct gt words present in the prediction / number of prediction words
    assert MET.calculate_exactmatch("left lung left", "left lung") == pytest.approx(2 / 3)
    assert MET.calculate_exactmatch("lung", "left lung lung") == pytest.approx(1 / 1)
    assert MET.score_item("The Lung.", "lung")["exact"] == 1.0
    assert MET.score_item("lungs", "lung")["exact"] == 0.0


@pytest.mark.parametrize("pred, gt, official, run_eval, strict", [
    ("normal", "no", 1, 1, 0),       # the substring quirk: "no" is inside "normal"
    ("the eyes", "yes", 1, 1, 0),    # "yes" inside "eyes"
    ("Yes, it is.", "yes", 1, 1, 1),
    ("No, there is no mass.", "yes", 0, 0, 0),  # "yes" nowhere
    ("There is no mass", "no", 1, 1, 0),  # official hit; strict wants the answer to lead with it
    # run_eval.py also needs "yes"/"no" somewhere: a non-yes/no closed answer fails
    ("liver", "liver", 1, 0, 1),
    ("the liver or the heart", "liver", 1, 0, 1),  # whole word for non-yes/no gt in the strict rule
    ("livers", "liver", 1, 0, 0),    # substring hit, not a whole word
    ("", "no", 0, 0, 0),
])
def test_closed_rules(pred, gt, official, run_eval, strict):
    s = MET.score_item(pred, gt)
    assert (s["closed"], s["closed_run_eval"], s["closed_strict"]) == (official, run_eval, strict)


# --- loaders on the real data ------------------------------------------------------------------------
@need_data
@pytest.mark.parametrize("name, n, n_closed, n_open, n_images", [
    ("vqa_rad", 451, 272, 179, 203), ("slake", 1061, 416, 645, 96)])
def test_real_test_splits(name, n, n_closed, n_open, n_images):
    ex = E.load_dataset(name, SHARED / name)
    types = [e["answer_type"] for e in ex]
    assert (len(ex), types.count("CLOSED"), types.count("OPEN")) == (n, n_closed, n_open)
    assert len({e["qid"] for e in ex}) == n
    images = {e["image"] for e in ex}
    assert len(images) == n_images
    for p in images:
        with Image.open(p) as im:
            im.verify()
    if name == "slake":
        assert {e["modality"] for e in ex} == {"CT", "MRI", "X-Ray"}


def test_missing_data_says_what_to_download(tmp_path):
    with pytest.raises(E.DataError, match="Download SLAKE.*imgs"):
        E.load_dataset("slake", tmp_path / "nope")
    (tmp_path / "test.json").write_text(json.dumps([{"qid": 1, "img_name": "xmlab1/source.jpg",
                                                     "question": "q", "answer": "yes", "q_lang": "en",
                                                     "answer_type": "CLOSED", "modality": "CT"}]))
    with pytest.raises(E.DataError, match="1 image"):
        E.load_dataset("slake", tmp_path)
    assert len(E.load_dataset("slake", tmp_path, check_images=False)) == 1  # --pred needs no images


def test_pathvqa_and_synth_loaders(tmp_path):
    (tmp_path / "images" / "test").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "test" / "p0.jpg")
    recs = [{"image_path": "images\\test\\p0.jpg", "question": "is it?", "answer": "yes",
             "answer_type": "CLOSED"},
            {"image_path": "images\\test\\p0.jpg", "question": "what?", "answer": "a cell"}]  # no answer_type
    (tmp_path / "test.json").write_text(json.dumps(recs))
    ex = E.load_dataset("pathvqa", tmp_path)
    assert [e["qid"] for e in ex] == ["0", "1"] and [e["answer_type"] for e in ex] == ["CLOSED", "OPEN"]
    assert ex[0]["image"] == tmp_path / "images" / "test" / "p0.jpg"
    synth = [{"qid": 0, "image_name": "p0.jpg", "question": "q?", "answer": "no", "answer_type": "CLOSED"}]
    (tmp_path / "test.json").write_text(json.dumps(synth))
    (tmp_path / "images" / "p0.jpg").write_bytes((tmp_path / "images" / "test" / "p0.jpg").read_bytes())
    assert E.load_dataset("synth", tmp_path)[0]["image"] == tmp_path / "images" / "p0.jpg"


@need_data
def test_llava_med_converted_format_matches_official(tmp_path):
    ex = E.load_dataset("slake", SHARED / "slake")[:30]
    conv = [{"id": e["qid"], "image": str(e["image"].relative_to(SHARED / "slake" / "imgs")),
             "answer_type": e["answer_type"],
             "conversations": [{"from": "human", "value": e["question"] + "\n<image>"},
                               {"from": "gpt", "value": e["answer"]}]}
            for e in ex]
    (tmp_path / "test.json").write_text(json.dumps(conv))
    (tmp_path / "imgs").symlink_to(SHARED / "slake" / "imgs")
    got = E.load_dataset("slake", tmp_path)

    def key(e):
        return (e["qid"], e["question"], e["answer"], e["answer_type"], e["image"].name)
    assert [key(e) for e in got] == [key(e) for e in ex]


# --- scoring files -----------------------------------------------------------------------------------
@need_data
@pytest.mark.parametrize("name", ["vqa_rad", "slake"])
def test_ground_truth_scores_100(name, tmp_path, capsys):
    ex = E.load_dataset(name, SHARED / name, check_images=False)
    write_answers(tmp_path / "gt.jsonl", [(e["qid"], e["answer"]) for e in ex])
    res = E.main([name, "--pred", str(tmp_path / "gt.jsonl"), "--data", str(SHARED / name),
                  "--bootstrap", "50", "--json", str(tmp_path / "r.json")])
    assert last_json(capsys) == json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(res))
    for k in ("closed_accuracy", "closed_accuracy_strict", "open_recall", "open_f1", "open_precision",
              "exact_match"):
        assert res[k] == 100.0, k
    assert (res["n_closed"], res["n_open"], res["n_missing"]) == ({"vqa_rad": 272, "slake": 416}[name],
                                                                  {"vqa_rad": 179, "slake": 645}[name], 0)
    assert res["ci"]["open_f1"] == [100.0, 100.0]


@need_data
def test_shuffled_truncated_duplicate_unknown(tmp_path, capsys):
    ex = E.load_dataset("slake", SHARED / "slake", check_images=False)
    rng = random.Random(0)  # a mediocre "model": right, "no", or the question's last word
    pairs = [(e["qid"], rng.choice([e["answer"], "No, normal.", e["question"].split()[-1]])) for e in ex]
    write_answers(tmp_path / "a.jsonl", pairs)
    shuffled = pairs[:]
    rng.shuffle(shuffled)
    write_answers(tmp_path / "b.jsonl", shuffled)
    args = ["--data", str(SHARED / "slake"), "--bootstrap", "200"]
    a = E.main(["slake", "--pred", str(tmp_path / "a.jsonl")] + args)
    b = E.main(["slake", "--pred", str(tmp_path / "b.jsonl")] + args)
    assert a == b and 0 < a["closed_accuracy"] < 100 and a["ci"]["closed_accuracy"][0] < a["closed_accuracy"]
    write_answers(tmp_path / "c.jsonl", pairs[:-7] + [pairs[0], ("no-such-id", "yes")])
    capsys.readouterr()
    c = E.main(["slake", "--pred", str(tmp_path / "c.jsonl")] + args)
    assert c["missing_ids"] == [q for q, _ in pairs[-7:]] and c["n_missing"] == 7
    assert c["duplicate_ids"] == [pairs[0][0]] and c["unknown_ids"] == ["no-such-id"]
    out = capsys.readouterr().out
    assert "7 missing question id(s)" in out and pairs[-1][0] in out


@need_data
def test_compare_is_paired(tmp_path, capsys):
    ex = E.load_dataset("vqa_rad", SHARED / "vqa_rad", check_images=False)
    write_answers(tmp_path / "gt.jsonl", [(e["qid"], e["answer"]) for e in ex])
    write_answers(tmp_path / "no.jsonl", [(e["qid"], "no") for e in ex])
    data = ["--data", str(SHARED / "vqa_rad"), "--bootstrap", "200"]
    same = E.main(["vqa_rad", "--compare", str(tmp_path / "no.jsonl"), str(tmp_path / "no.jsonl")] + data)
    assert same["closed_accuracy"]["diff"] == 0
    assert same["closed_accuracy"]["ci"] == [0.0, 0.0]  # paired: no noise
    res = E.main(["vqa_rad", "--compare", str(tmp_path / "no.jsonl"), str(tmp_path / "gt.jsonl")] + data)
    closed = [e for e in ex if e["answer_type"] == "CLOSED"]
    always_no = 100 * sum(MET.normalize_word(e["answer"].lower()) in "no" for e in closed) / len(closed)
    d = res["closed_accuracy"]
    assert d["a"] == pytest.approx(always_no, abs=1e-3)
    assert d["diff"] == pytest.approx(100 - always_no, abs=1e-3)
    assert d["ci"][0] < d["diff"] < d["ci"][1]
    assert "closed_accuracy" in last_json(capsys)


# --- end to end: a tiny random model answers 20 real SLAKE questions ---------------------------------
@need_data
def test_tiny_model_end_to_end(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    M = pytest.importorskip("model")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from data import VICUNA_SYSTEM
    ex = E.load_dataset("slake", SHARED / "slake")[:20]
    # byte-level BPE with LLaMA's special-token layout, "<image>" = 3 as in "tiny"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(
        [VICUNA_SYSTEM] + [e["question"] + " " + e["answer"] for e in ex],
        trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<image>"],
                            show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    cfg = copy.deepcopy(M.CONFIGS["tiny"])
    cfg.text.vocab_size, cfg.image_token_id = tok.get_vocab_size(), tok.token_to_id("<image>")
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    C.save_pretrained(M.Llava(cfg), str(ckpt))
    tok.save(str(ckpt / "tokenizer.json"))
    out = tmp_path / "answers.jsonl"
    run = ["slake", "--model", str(ckpt), "--data", str(SHARED / "slake"), "--limit", "20", "--out", str(out),
           "--batch_size", "8", "--max_new_tokens", "4", "--bootstrap", "0", "--device", "cpu"]
    res = E.main(run)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [e["qid"] for e in ex]
    assert all(isinstance(r["text"], str) and r["prompt"] == e["question"] for r, e in zip(rows, ex))
    assert res["n"] == 20 and res["n_missing"] == 0 and res["n_closed"] + res["n_open"] == 20
    capsys.readouterr()
    scored = E.main(["slake", "--pred", str(out), "--data", str(SHARED / "slake"), "--limit", "20",
                     "--bootstrap", "0"])
    assert scored == res and last_json(capsys) == json.loads(json.dumps(res))
    # resumable: a run killed mid-write leaves a torn line; the rerun drops it and answers only what is
    # missing
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:17]) + lines[17][:15])
    E.main(run)
    assert out.read_text().splitlines(keepends=True)[:17] == lines[:17]
    assert ([json.loads(line)["question_id"] for line in out.read_text().splitlines()]
            == [e["qid"] for e in ex])



def spy_prompts(monkeypatch):
    """Every prompt data.py renders, as (template, text)."""
    seen = []
    render = D.render_conversation

    def spy(turns, template):
        seen.append((template, render(turns, template)))
        return seen[-1][1]
    monkeypatch.setattr(D, "render_conversation", spy)
    return seen


def test_a_mistral_model_is_evaluated_with_its_own_template(synth, tmp_path, monkeypatch, capsys):
    ckpt = save_tiny(tmp_path / "mistral", synth, "mistral")
    seen = spy_prompts(monkeypatch)
    ex = E.load_dataset("synth", str(synth))[:3]
    run = ["synth", "--model", str(ckpt), "--data", str(synth), "--limit", "3", "--max_new_tokens", "2",
           "--bootstrap", "0", "--device", "cpu"]
    E.main(run + ["--out", str(tmp_path / "a.jsonl")])
    got = list(seen)
    turns = lambda e: [{"from": "human", "value": "<image>\n" + e["question"]},  # noqa: E731
                       {"from": "gpt", "value": None}]
    want = [D.render_conversation(turns(e), "mistral_instruct") for e in ex]
    assert got == [("mistral_instruct", w) for w in want]
    assert "[INST]" in want[0] and D.VICUNA_SYSTEM not in want[0]
    seen.clear()
    E.main(run + ["--out", str(tmp_path / "b.jsonl"), "--template", "vicuna_v1"])  # the flag overrides
    assert [t for t, _ in seen] == ["vicuna_v1"] * 3 and seen[0][1].startswith(D.VICUNA_SYSTEM)


def test_bandwidth_counts_the_decode_steps_taken(monkeypatch, capsys, tmp_path):
    """GB/s = weight bytes x forward passes / seconds, where a batch's passes are its longest reply + 1 (the
    prefill's token, then one decode step per token, EOS included), capped at max_new_tokens."""
    assert E.forward_passes([3, 0, 7], 16) == 8 and E.forward_passes([0], 16) == 1
    assert E.forward_passes([40, 2], 16) == 16 and E.forward_passes([], 16) == 1
    model = M.Llava(M.CONFIGS["tiny"])
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    replies = iter([["yes", "no"], ["the left lung"]])  # a stub decoder: replies of 1, 1 and 3 tokens

    class Tok:
        def encode(self, text, add_special_tokens=False):
            return type("Enc", (), {"ids": text.split()})()
    monkeypatch.setattr(D, "generate_text", lambda *a, **k: next(replies))
    clock = iter(range(0, 100, 10))  # t0 = 0, then 10 s after the first batch, 20 s after the second
    monkeypatch.setattr(E.time, "time", lambda: next(clock))
    ex = [{"qid": str(i), "question": "q?", "answer_type": "OPEN", "image": Image.new("RGB", (8, 8))}
          for i in range(3)]
    capsys.readouterr()
    E.answer_with(model, Tok(), ex, str(tmp_path / "a.jsonl"), batch_size=2, max_new_tokens=1024,
                  template="vicuna_v1")
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("[")]
    for line, passes, seconds, tokens in zip(lines, (2, 2 + 4), (10, 20), (4, 8)):
        assert f"({passes} forward passes = prefill + decode steps taken" in line
        assert f"{weight_bytes * passes / seconds / 1e9:.2f} GB/s" in line
        assert f"{tokens / seconds:.1f} tok/s" in line


def test_sharded_answering_merges_to_one_process_answers(synth, tmp_path, monkeypatch):
    """Two ranks simulated in one process: rank r answers examples r, r + 2, ... into out.rank{r}; the merge
    equals one process's file line for line, and a rank killed mid-write then rerun loses and repeats
    nothing."""
    tok = D.load_tokenizer(synth / "tokenizer.json")
    model = C.from_pretrained(str(save_tiny(tmp_path / "m", synth)), dtype=torch.float32).eval()
    ex = E.load_dataset("synth", str(synth))[:7]
    kw = dict(batch_size=1, max_new_tokens=6)
    one = tmp_path / "one.jsonl"
    E.answer_with(model, tok, ex, str(one), **kw)
    out = tmp_path / "two.jsonl"
    for r in (0, 1):
        E.answer_with(model, tok, ex, str(out), rank=r, world=2, **kw)
    part1 = tmp_path / "two.jsonl.rank1"
    ids = [json.loads(x)["question_id"] for x in part1.read_text().splitlines()]
    assert ids == [e["qid"] for e in ex[1::2]]
    lines = part1.read_text().splitlines(keepends=True)
    part1.write_text(lines[0] + lines[1][:10])  # rank 1 killed mid-write
    E.answer_with(model, tok, ex, str(out), rank=1, world=2, **kw)  # the rerun resumes
    E.merge_answers(ex, str(out))
    assert out.read_text() == one.read_text() and not list(tmp_path.glob("two.jsonl.rank*"))
    # a second sharded pass finds everything answered in `out`: nothing redone, the merge is a no-op
    E.answer_with(model, tok, ex, str(out), rank=1, world=2, **kw)
    E.merge_answers(ex, str(out))
    assert out.read_text() == one.read_text()
    # evaluate_model without a process group: rank 1 answers its share and returns None, rank 0 merges
    # and scores what one process scores
    monkeypatch.setattr(E, "load_dataset", lambda *a, **k: ex)
    ev = tmp_path / "ev.jsonl"
    assert E.evaluate_model(model, tok, "synth", str(synth), str(ev), 1, 6, 0, rank=1, world=2) is None
    got = E.evaluate_model(model, tok, "synth", str(synth), str(ev), 1, 6, 0, rank=0, world=2)
    ref = E.evaluate_model(model, tok, "synth", str(synth), str(tmp_path / "ref.jsonl"), 1, 6, 0)
    assert got == ref and ev.read_text() == (tmp_path / "ref.jsonl").read_text()


# ----------------------------------------------------------------------------- report.py
# Each report built from small real runs (real VQA-RAD / SLAKE answer files scored by evaluate.py as a user
# runs it, the synthetic stages at test size), then read back with html.parser: every wrong answer once,
# the numbers evaluate.py prints, images only as data: URIs, no external URL; then loaded in Chromium.

VOID = {"img", "br", "meta", "input", "hr"}


class HtmlDoc(html.parser.HTMLParser):
    """Every element of a page: tag, attributes, the text inside it and the ids of the elements around it."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.nodes, self.stack = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        node = {"tag": tag, "attrs": dict(attrs), "text": "",
                "in": [n["attrs"].get("id") for n in self.stack]}
        self.nodes.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()["tag"] != tag:
            pass

    def handle_data(self, data):
        for n in self.stack:
            n["text"] += data

    def find(self, tag=None, within=None, **attrs):
        return [n for n in self.nodes if (tag is None or n["tag"] == tag)
                and (within is None or within in n["in"])
                and all(n["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def cards(self, gallery):
        return [n for n in self.find("div", within=gallery) if "card" in n["attrs"].get("class", "").split()]


def assert_self_contained(text):
    """One script (ours, inline), no external URL anywhere, and every image reference a data: URI that
    decodes to an image."""
    doc = HtmlDoc(text)
    assert "http://" not in text and "https://" not in text and "url(" not in text
    assert [n["attrs"] for n in doc.find("script")] == [{}]
    assert not doc.find("link") and not doc.find("iframe")
    for n in doc.nodes:
        for k in ("src", "href", "xlink:href", "srcset", "action", "poster"):
            if k in n["attrs"]:
                assert n["attrs"][k].startswith("data:"), (n["tag"], k, n["attrs"][k][:80])
    for n in doc.find("img"):
        head, b64 = n["attrs"]["src"].split(",", 1)
        assert head == "data:image/jpeg;base64"
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            assert max(im.size) <= R.THUMB
    return doc


def perturbed(examples, seed):
    """A mediocre model's answers: mostly right, else "no", "normal", the question's last word, or markup
    that must reach the page as text."""
    rng = random.Random(seed)
    out = []
    for e in examples:
        out.append(rng.choice([e["answer"]] * 5 + ["no", "normal", e["question"].split()[-1],
                                                    '<img src=x onerror="alert(1)"> & </div>']))
    return out


def run_evaluate(*args):
    r = subprocess.run([sys.executable, "evaluate.py", *map(str, args)], cwd=HERE, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def wrong_ids(examples, texts):
    """The questions failing any rule of their answer type, from LLaVA-Med's rules (score_item) directly."""
    rules = {"CLOSED": ("closed", "closed_run_eval", "closed_strict"), "OPEN": ("recall", "open_hit")}
    return [e["qid"] for e, t in zip(examples, texts)
            if any(MET.score_item(t, e["answer"])[k] < 1 for k in rules[e["answer_type"]])]


@pytest.fixture(scope="module")
def eval_reports(tmp_path_factory):
    """evaluate.py --pred ... --report on the real VQA-RAD and SLAKE test sets, and --compare on VQA-RAD."""
    if not (SHARED / "slake" / "test.json").exists() or not (SHARED / "vqa_rad" / "images").is_dir():
        pytest.skip(f"real VQA-RAD/SLAKE test sets not found at {SHARED}")
    root = tmp_path_factory.mktemp("eval_reports")
    out = {}
    for name in ("vqa_rad", "slake"):
        ex = E.load_dataset(name, SHARED / name)
        texts = perturbed(ex, 0)
        write_answers(root / f"{name}.jsonl", [(e["qid"], t) for e, t in zip(ex, texts)])
        res = run_evaluate(name, "--data", SHARED / name, "--pred", root / f"{name}.jsonl", "--bootstrap", 50,
                           "--report", root / f"{name}.html")
        out[name] = dict(examples=ex, texts=texts, res=res, page=root / f"{name}.html")
    ex = out["vqa_rad"]["examples"]
    texts_b = perturbed(ex, 1)
    write_answers(root / "b.jsonl", [(e["qid"], t) for e, t in zip(ex, texts_b)])
    res = run_evaluate("vqa_rad", "--data", SHARED / "vqa_rad", "--compare", root / "vqa_rad.jsonl",
                       root / "b.jsonl", "--bootstrap", 50, "--report", root / "compare.html")
    out["compare"] = dict(examples=ex, texts=(out["vqa_rad"]["texts"], texts_b), res=res,
                          page=root / "compare.html")
    return out


@pytest.mark.parametrize("name", ["vqa_rad", "slake"])
def test_evaluation_report_shows_every_wrong_answer_once_with_evaluates_numbers(eval_reports, name):
    r = eval_reports[name]
    text = r["page"].read_text()
    doc = assert_self_contained(text)
    wrong = wrong_ids(r["examples"], r["texts"])
    assert 0 < len(wrong) < R.GALLERY_MAX  # all shown: no cap here
    assert [c["attrs"]["data-qid"] for c in doc.cards("wrong")] == wrong  # each once, in test-set order
    res = r["res"]
    headline = [n for n in doc.find("td") if "data-key" in n["attrs"] and "data-group" not in n["attrs"]]
    assert {n["attrs"]["data-key"] for n in headline} == set(E.LABELS)
    for n in headline:
        assert n["attrs"]["data-value"] == str(res[n["attrs"]["data-key"]])
        assert n["text"] == f"{res[n['attrs']['data-key']]:.2f}"
    if name == "slake":  # the modality bars are evaluate.py's by_modality numbers
        for m, sub in res["by_modality"].items():
            cells = doc.find("td", data_group=f"modality={m}")
            assert cells and all(c["attrs"]["data-value"] == str(sub[c["attrs"]["data-key"]]) for c in cells)
    # a question type's closed accuracy, by hand from the rules
    qtype = r["examples"][0]["question_type"]
    closed = [MET.score_item(t, e["answer"])["closed"] for e, t in zip(r["examples"], r["texts"])
              if e["question_type"] == qtype and e["answer_type"] == "CLOSED"]
    cell = doc.find("td", data_group=f"question_type={qtype}", data_key="closed_accuracy")[0]
    assert float(cell["attrs"]["data-value"]) == pytest.approx(100 * sum(closed) / len(closed), abs=1e-3)
    # the per-question JSONL beside it: every question, each metric's hit as score_item gives it
    rows = [json.loads(x) for x in r["page"].with_suffix(".questions.jsonl").read_text().splitlines()]
    assert [x["id"] for x in rows] == [e["qid"] for e in r["examples"]]
    for x, e, t in zip(rows, r["examples"], r["texts"]):
        assert (x["question"], x["ground_truth"], x["prediction"], x["answer_type"]) == (
            e["question"], e["answer"], t, e["answer_type"])
        assert x["hits"] == MET.score_item(t, e["answer"])
    # markup in an answer reaches the page as text; "normal" for "no" passes the papers' rule, not the strict
    assert '<img src=x onerror="alert(1)"> & </div>' in "".join(c["text"] for c in doc.cards("wrong"))
    normal = [i for i, (e, t) in enumerate(zip(r["examples"], r["texts"]))
              if t == "normal" and MET.normalize_word(e["answer"].lower()) == "no"]
    if name == "vqa_rad":
        assert normal
    for i in normal:
        card = [c for c in doc.cards("wrong") if c["attrs"]["data-qid"] == r["examples"][i]["qid"]][0]
        assert "✓ papers' rule" in card["text"] and "✗ strict" in card["text"], card["text"]


def test_comparison_report_lists_the_fixed_and_broken_questions(eval_reports):
    r = eval_reports["compare"]
    doc = assert_self_contained(r["page"].read_text())
    fixed, broken = [], []
    for e, ta, tb in zip(r["examples"], *r["texts"]):
        key = "closed" if e["answer_type"] == "CLOSED" else "recall"
        a, b = MET.score_item(ta, e["answer"])[key], MET.score_item(tb, e["answer"])[key]
        (fixed if b > a else broken if b < a else []).append(e["qid"])
    assert fixed and broken
    assert [c["attrs"]["data-qid"] for c in doc.cards("fixed")] == fixed
    assert [c["attrs"]["data-qid"] for c in doc.cards("broken")] == broken
    cells = [n for n in doc.find("td") if "data-key" in n["attrs"]]
    assert {c["attrs"]["data-key"] for c in cells} == set(E.HEADLINE)
    for c in cells:
        assert c["attrs"]["data-value"] == str(r["res"][c["attrs"]["data-key"]]["diff"])


def test_large_galleries_are_capped_with_a_note(eval_reports, tmp_path):
    r = eval_reports["vqa_rad"]
    s = E.score(r["examples"], r["texts"])
    R.write_evaluation(tmp_path / "r.html", r["res"], r["examples"], r["texts"], s, E.summarize, E.LABELS, 5)
    doc = HtmlDoc((tmp_path / "r.html").read_text())
    n = len(wrong_ids(r["examples"], r["texts"]))
    assert len(doc.cards("wrong")) == 5
    assert f"Showing the first 5 of {n}" in (tmp_path / "r.html").read_text()
    assert len((tmp_path / "r.questions.jsonl").read_text().splitlines()) == len(r["examples"])


@pytest.fixture(scope="module")
def run_reports(tiny_dir, small_data, synth, tmp_path_factory):
    """Stage 1 for 3 steps; stage 2's generate and judge on 6 images with the tiny model (a stand-in expert
    scores by answer length, and fails on one question), DPO on the pairs; then the synthetic run's end
    (evaluate.stage_report) on perturbed answer files. Returns the directories and what it printed."""
    root = tmp_path_factory.mktemp("run_reports")
    sft.main(sft_args(tiny_dir, small_data, synth, root / "sft"))
    tok = D.load_tokenizer(tiny_dir)
    model = C.from_pretrained(str(tiny_dir), dtype=torch.float32)
    out = root / "dpo"
    out.mkdir()
    cfg = replace(dpo.Config(), model=str(root / "sft" / "merged"), out_dir=str(out), n_questions=3,
                  describe_tokens=4, q_max_tokens=6, a_max_tokens=6, gen_batch=2, workers=1)
    with pytest.MonkeyPatch.context() as mp:  # a random model asks nothing well-formed: keep the longer ones
        mp.setattr(dpo, "is_wellformed", lambda q: len(q) > 6)
        rows = dpo.generate_step(cfg, model, tok, sorted(os.listdir(synth / "images"))[:6], synth / "images",
                                 str(out / "generations.jsonl"), "cpu")
    judge = dpo.make_judge(replace(cfg, judge="oracle"), synth)

    def stand_in(facts, q, a):
        if q == rows[0]["question"]:
            raise ValueError("a failed verdict")
        return float(1 + len(a) % 3)
    judge.score_fn = stand_in
    pairs = dpo.judge_step(cfg, rows, synth / "images", judge, str(out / "pairs.jsonl"),
                           str(out / "generations.jsonl"))
    assert pairs and len(pairs) < len(rows) - 1  # some tied
    dpo.main(["train", f"--model={tiny_dir}", f"--out_dir={out}", "--global_batch=2", "--micro_batch=1",
              "--epochs=2", "--max_steps=3", "--lora_r=4", "--lora_alpha=8", "--vit_lora_r=2",
              "--vit_lora_alpha=4", "--log_every=1"])
    ex = E.load_dataset("synth", str(synth))
    texts = []
    for stage in (1, 2):
        texts.append(perturbed(ex, stage))
        write_answers(out / f"answers_stage{stage}.jsonl", [(e["qid"], t) for e, t in zip(ex, texts[-1])])
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", buf)
        E.stage_report(str(out), synth, out / "answers_stage1.jsonl", out / "answers_stage2.jsonl",
                       root / "sft" / "log.jsonl")
    printed = json.loads(buf.getvalue().strip().splitlines()[-1])
    r = subprocess.run([sys.executable, "report.py", str(root / "sft")], cwd=HERE, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "report.html" in r.stderr, r.stderr
    return dict(sft=root / "sft", dpo=out, rows=rows, pairs=pairs, printed=printed, examples=ex, texts=texts)


def polylines(doc):
    """{series name: number of points} of every line chart."""
    return {n["text"]: len(n["attrs"]["points"].split()) for n in doc.find("polyline")}


def test_run_report_of_stage_1_draws_its_curves(run_reports):
    doc = assert_self_contained((run_reports["sft"] / "report.html").read_text())
    log = read_log(run_reports["sft"])
    lines_ = polylines(doc)
    for k in ("answer_loss", "question_loss", "lr", "grad_norm"):
        assert lines_[k] == len(log) == 3, k


def test_run_report_of_stage_2_shows_the_judged_questions_and_what_changed(run_reports):
    d = run_reports
    doc = assert_self_contained((d["dpo"] / "report.html").read_text())
    gen = [json.loads(x) for x in (d["dpo"] / "generations.jsonl").read_text().splitlines()]
    ends = [g for g in gen if "question" not in g]
    counts = {n["attrs"]["data-count"]: int(n["text"]) for n in doc.find("td") if "data-count" in n["attrs"]}
    malformed, repeats = sum(g["dropped"] for g in ends), sum(g["repeats"] for g in ends)
    assert counts == {"images": 6, "questions asked": len(d["rows"]) + malformed + repeats,
                      "kept (judged)": len(d["rows"]), "malformed (dropped)": malformed,
                      "repeated (dropped)": repeats, "preference pairs": len(d["pairs"]),
                      "tied (dropped)": len(d["rows"]) - len(d["pairs"]) - 1, "failed verdicts": 1}
    shown = R.CONTROL.sub  # control characters show as U+FFFD
    asked = [n["text"] for n in doc.find("p") if n["attrs"].get("class") == "q"]
    assert sorted(asked) == sorted(shown("\ufffd", r["question"]) for r in d["rows"])
    chosen = [n["text"] for n in doc.find("p") if n["attrs"].get("class") == "chosen"]
    assert len(chosen) == len(d["pairs"])
    for p in d["pairs"]:  # the chosen side is pairs.jsonl's chosen answer
        assert any(c.endswith("chosen " + shown("\ufffd", p["chosen"])) for c in chosen), p
    log = read_log(d["dpo"])
    lines_ = polylines(doc)
    for k in ("loss", "margin", "reward_acc", "lr"):
        assert lines_[k] == len(log), k
    assert lines_["answer_loss"] == 3  # stage 1's curves, from the model's run
    diffs = {c["attrs"]["data-key"]: float(c["attrs"]["data-value"]) for c in doc.find("td")
             if "data-key" in c["attrs"]}
    assert diffs == {k: v["diff"] for k, v in d["printed"]["difference"].items()}
    assert len(doc.cards("fixed")) + len(doc.cards("broken")) > 0


@pytest.fixture(scope="module")
def selector_report(tiny_dir, tmp_path_factory):
    """`selector.py --report` on the synthetic default with the tiny model: (the page, the summary)."""
    root = tmp_path_factory.mktemp("selector_report")
    out = root / "select" / "selected.json"
    r = subprocess.run([sys.executable, "selector.py", f"--model={tiny_dir}", f"--out={out}", "--epochs=1",
                        "--clusters=4", f"--report={root / 'selector.html'}"], cwd=HERE,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "selector.html", json.loads(Path(f"{out}.summary.json").read_text())


def test_selector_report_draws_the_histogram_and_the_clusters(selector_report):
    page, summary = selector_report
    doc = assert_self_contained(page.read_text())
    kept = {int(n["attrs"]["data-cluster"]): int(n["text"]) for n in doc.find("td")
            if "data-cluster" in n["attrs"]}
    assert kept == {c["cluster"]: c["kept"] for c in summary["per_cluster"]}
    bars_ = [n["text"] for n in doc.find("rect") if n["text"]]  # each column's parts, titled
    for i, (a, k) in enumerate(zip(summary["score_histogram"]["all"], summary["score_histogram"]["kept"])):
        label = f"{summary['score_histogram']['edges'][i]:.2g}"
        assert f"{label}: kept {k}" in bars_ and f"{label}: dropped {a - k}" in bars_


# --- in a real browser: headless Chromium (.ci/run installs it; STLLAVA_REQUIRE_BROWSER=1 there) ---------


def chromium():
    """The Chromium binary, or a skip where none is installed (a failure where CI requires one)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        if os.environ.get("STLLAVA_REQUIRE_BROWSER"):
            pytest.fail("STLLAVA_REQUIRE_BROWSER is set but no chromium is installed "
                        "(apt-get install chromium)")
        pytest.skip("no chromium installed (apt-get install chromium)")
    return exe


def browse(page, tmp_path, screenshot=None, dump_dom=False):
    """Load `page` in headless Chromium: (its console messages, the DOM after its scripts ran or "").
    The reports write nothing to the console, so every message is a failure (Chromium logs them all at
    INFO, console.error included). Writes a screenshot of the first 1100 x 1400 pixels."""
    what = ["--dump-dom"] if dump_dom else [f"--screenshot={screenshot}"]
    r = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'chromium'}",
                        "--window-size=1100,1400", *what, Path(page).resolve().as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return re.findall(r':CONSOLE[^\]]*\] "(.*)", source', r.stderr), r.stdout if dump_dom else ""


def test_browser_check_sees_script_errors_and_broken_images(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text(R.page("bad", ['<img src="data:image/png;base64,AAAA" alt="broken-one">',
                                   "<script>no_such_function();</script>"]))
    console, _ = browse(page, tmp_path, tmp_path / "bad.png")
    assert any("broken image: broken-one" in m for m in console), console
    assert any("no_such_function" in m for m in console), console


@pytest.mark.parametrize("which", ["vqa_rad", "slake", "compare", "stage 1 run", "stage 2 run", "selector"])
def test_each_report_loads_in_a_browser_without_console_errors(which, request, tmp_path):
    if which.endswith(" run"):  # fixtures asked for one by one: the run reports need no real data
        run = request.getfixturevalue("run_reports")["sft" if which.startswith("stage 1") else "dpo"]
        page = run / "report.html"
    elif which == "selector":
        page = request.getfixturevalue("selector_report")[0]
    else:
        page = request.getfixturevalue("eval_reports")[which]["page"]
    console, _ = browse(page, tmp_path, tmp_path / "shot.png")
    assert console == []
    with Image.open(tmp_path / "shot.png") as im:
        assert im.size == (1100, 1400)
        assert len(im.convert("L").getcolors(256 * 256) or []) > 8  # text and charts drawn, not blank


def test_gallery_filter_hides_the_other_answer_type_in_a_browser(eval_reports, tmp_path):
    text = eval_reports["vqa_rad"]["page"].read_text()
    page = tmp_path / "filtered.html"
    page.write_text(text.replace("</body>", '<script>document.getElementById("wrong-a").value = "OPEN";'
                                 ' filt("wrong");</script></body>'))
    console, dom = browse(page, tmp_path, dump_dom=True)
    assert console == []
    cards = HtmlDoc(dom).cards("wrong")
    shown = {c["attrs"]["data-atype"] for c in cards if "display: none" not in c["attrs"].get("style", "")}
    assert shown == {"OPEN"} and len(cards) == len(HtmlDoc(text).cards("wrong"))


# ----------------------------------------------------------------------------- the jobs as a user runs them
# Through the real command lines, as subprocesses: a user mistake stops before any expensive work with one
# line on stderr (exit code 2) naming the culprit, no traceback, nothing already written lost; an output made
# from other inputs is refused naming the difference; the same inputs resume it.

def cli(script, *args):
    return subprocess.run([sys.executable, str(HERE / script), *map(str, args)], capture_output=True,
                          text=True, cwd=HERE, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "NO_PROXY": "127.0.0.1"})


def assert_user_error(r, *culprits, code=2, one_line=True):
    """Exit `code`, no traceback, stderr's last line (its only one, for a user error) names each culprit."""
    assert r.returncode == code, (r.returncode, r.stdout[-1500:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert lines and (len(lines) == 1 or not one_line), r.stderr
    assert all(str(c) in lines[-1] for c in culprits), (culprits, lines[-1])


@pytest.fixture(scope="module")
def user(tmp_path_factory, synth):
    """A user's folder: a tiny model (and a LoRA adapter beside it, as sft.py writes out/sft/final), the
    synthetic test set, answer files, and broken inputs of every kind."""
    d = tmp_path_factory.mktemp("user")
    model = save_tiny(d / "out" / "sft" / "merged", synth)
    adapter = d / "out" / "sft" / "final"
    adapter.mkdir()
    m = C.from_pretrained(str(model), dtype=torch.float32)
    L.add_lora(m, L.lora_targets(r=2, alpha=4, vit_r=2, vit_alpha=4))
    L.save_adapter(m, str(adapter))
    ex = E.load_dataset("synth", str(synth))
    write_answers(d / "synth_answers.jsonl", [(e["qid"], e["answer"]) for e in ex])
    write_answers(d / "other_answers.jsonl", [(f"other-{i}", "yes") for i in range(len(ex))])
    (d / "empty.json").write_text("")
    (d / "cut.json").write_text((synth / "test.json").read_text()[:500])
    (d / "none.json").write_text("[]")
    (d / "slake_like.json").write_text(json.dumps([{"qid": 1, "img_name": "a/source.jpg", "question": "q?",
                                                    "answer": "yes", "answer_type": "CLOSED", "q_lang": "en",
                                                    "modality": "CT"}]))
    return d


def test_answer_rows_are_kill_safe_o_n_and_carry_llava_meds_fields(synth, tmp_path, monkeypatch):
    """Resume reads the answer file once and appends; the file is never reopened for writing ("w"); rows have
    LLaVA-Med model_vqa.py's fields; a torn last line is dropped with a note, a garbage line elsewhere stops
    the run naming its line and leaves the file as it was."""
    tok = D.load_tokenizer(synth / "tokenizer.json")
    model = C.from_pretrained(str(save_tiny(tmp_path / "m", synth)), dtype=torch.float32).eval()
    ex = E.load_dataset("synth", str(synth))[:6]
    out = tmp_path / "a.jsonl"
    E.answer_with(model, tok, ex[:3], str(out), batch_size=1, max_new_tokens=3)
    reads, opened = [], []
    real_read, real_open = runs.read_output_jsonl, open
    monkeypatch.setattr(runs, "read_output_jsonl", lambda *a, **k: reads.append(a[0]) or real_read(*a, **k))
    monkeypatch.setattr("builtins.open", lambda f, mode="r", *a, **k: opened.append((str(f), mode))
                        or real_open(f, mode, *a, **k))
    E.answer_with(model, tok, ex, str(out), batch_size=1, max_new_tokens=3)
    monkeypatch.undo()
    assert reads == [str(out)] and (str(out), "w") not in opened and (str(out), "a") in opened
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [e["qid"] for e in ex]
    assert all(set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} for r in rows)
    assert len({r["answer_id"] for r in rows}) == 6 and rows[0]["metadata"] == {}
    good = out.read_text()
    out.write_text(good + good.splitlines()[0][:20])  # killed mid-write
    E.answer_with(model, tok, ex, str(out), batch_size=1, max_new_tokens=3)  # nothing left to answer
    assert out.read_text() == good
    out.write_text("garbage\n" + good)
    with pytest.raises(runs.UsageError, match="a.jsonl, line 1"):
        E.answer_with(model, tok, ex, str(out), batch_size=1, max_new_tokens=3)
    assert out.read_text() == "garbage\n" + good


@pytest.mark.parametrize("case, args, culprits", [
    ("missing --pred", ["synth", "--pred", "{d}/nope.jsonl"], ["nope.jsonl", "not found"]),
    ("every id missing", ["synth", "--pred", "{d}/other_answers.jsonl", "--data", "{synth}"],
     ["other_answers.jsonl", "only 0 of its", "synth questions"]),
    ("--compare across datasets", ["synth", "--compare", "{d}/synth_answers.jsonl", "{d}/other_answers.jsonl",
                                   "--data", "{synth}"], ["other_answers.jsonl", "only 0 of its"]),
    ("--limit 0", ["synth", "--pred", "{d}/synth_answers.jsonl", "--limit", "0"],
     ["--limit=0", "at least 1"]),
    ("--limit -5", ["synth", "--pred", "{d}/synth_answers.jsonl", "--limit", "-5"], ["--limit=-5"]),
    ("--batch_size 0", ["synth", "--model", "{d}/out/sft/merged", "--batch_size", "0"], ["--batch_size=0"]),
    ("empty test JSON", ["vqa_rad", "--pred", "{d}/synth_answers.jsonl", "--data", "{d}/empty.json"],
     ["empty.json", "not valid JSON"]),
    ("truncated test JSON", ["synth", "--pred", "{d}/synth_answers.jsonl", "--data", "{d}/cut.json"],
     ["cut.json", "not valid JSON"]),
    ("[] test file", ["slake", "--pred", "{d}/synth_answers.jsonl", "--data", "{d}/none.json"],
     ["none.json", "no questions"]),
    ("SLAKE data under vqa_rad", ["vqa_rad", "--pred", "{d}/synth_answers.jsonl", "--data",
                                  "{d}/slake_like.json"],
     ["slake_like.json", "record 0", "'image_name'", "looks like slake"]),
    ("--model before it exists", ["synth", "--model", "{d}/out/dpo/merged"], ["out/dpo/merged", "dpo.py"]),
    ("an adapter as --model", ["synth", "--model", "{d}/out/sft/final"],
     ["out/sft/final", "LoRA adapter", "--adapter=", "out/sft/merged"]),
    ("unknown --template", ["synth", "--model", "{d}/out/sft/merged", "--template=vicuna"],
     ["--template=vicuna", "vicuna_v1", "mistral_instruct"]),
    ("--device cuda on a CPU build", ["synth", "--model", "{d}/out/sft/merged", "--device", "cuda"],
     ["--device=cuda", "no CUDA GPU", "--device=cpu"]),
    ("--export_train of synth", ["synth", "--export_train", "{d}/t.json"], ["synth", "conversation JSON"]),
])
def test_evaluate_user_errors_are_one_line(user, synth, case, args, culprits):
    if case == "--device cuda on a CPU build" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    before = {p: p.read_bytes() for p in user.rglob("*") if p.is_file()}
    r = cli("evaluate.py", *[a.format(d=user, synth=synth) for a in args])
    assert_user_error(r, *culprits)
    assert {p: p.read_bytes() for p in user.rglob("*") if p.is_file()} == before  # nothing written or lost


@pytest.mark.parametrize("case, args, culprits", [
    ("--model without --data", ["sft.py", "--model={d}/out/sft/merged"], ["--model and --data together"]),
    ("--model that does not exist", ["sft.py", "--model=/nonexistent", "--data={d}/conv.json"],
     ["/nonexistent", "does not exist"]),
    ("an adapter as --model", ["sft.py", "--model={d}/out/sft/final", "--data={d}/conv.json"],
     ["out/sft/final", "LoRA adapter"]),
    ("a bad record", ["sft.py", "--model={d}/out/sft/merged", "--data={d}/conv_bad.json"],
     ["conv_bad.json", "record 1", "conversations"]),
    ("a batch that does not split", ["sft.py", "--model={d}/out/sft/merged", "--data={d}/conv.json",
                                     "--global_batch=3", "--micro_batch=2"], ["--global_batch=3", "=2 x"]),
    ("--micro_batch 0", ["sft.py", "--micro_batch=0"], ["--micro_batch=0", "at least 1"]),
    ("--epochs 0", ["sft.py", "--epochs=0"], ["--epochs=0"]),
    ("--plan --model unknown", ["sft.py", "--plan", "--model=llava-7b"], ["--plan --model", "llava-1.5-7b"]),
    ("fewer examples than a batch", ["sft.py", "--model={d}/out/sft/merged", "--data={d}/conv.json",
                                     "--global_batch=8", "--micro_batch=8"], ["2 examples", "=8)"]),
    ("a server for the synthetic data", ["dpo.py", "--base_url=http://127.0.0.1:9/v1"],
     ["offline oracle", "--data", "--judge=gpt"]),
    ("a judge model for the synthetic data", ["dpo.py", "judge", "--judge_model=gpt-4o"], ["offline oracle"]),
    ("no stage-1 model", ["dpo.py", "--model={d}/out/nowhere"], ["out/nowhere", "python sft.py"]),
    ("judge before generate", ["dpo.py", "judge", "--model={d}/out/sft/merged", "--out_dir={t}/fresh"],
     ["generations.jsonl", "dpo.py generate"]),
    ("a malformed pairs file", ["dpo.py", "train", "--model={d}/out/sft/merged", "--out_dir={t}/bad"],
     ["pairs.jsonl, line 2", "chosen"]),
    ("no pairs", ["dpo.py", "train", "--model={d}/out/sft/merged", "--out_dir={t}/empty"],
     ["no preference pairs", "pairs.jsonl"]),
])
def test_sft_and_dpo_user_errors_are_one_line(user, tmp_path, case, args, culprits):
    """sft.py's and dpo.py's user mistakes: one line naming the culprit, exit code 2, before any weight loads,
    nothing already written changed."""
    conv = [{"id": i, "image": "img.png", "conversations": [{"from": "human", "value": "<image>\nq?"},
                                                            {"from": "gpt", "value": "a"}]} for i in range(2)]
    (user / "img.png").write_bytes(PNG)  # the same bytes each case: nothing the cases compare
    (user / "conv.json").write_text(json.dumps(conv))
    (user / "conv_bad.json").write_text(json.dumps([conv[0], {"id": 1, "image": "img.png"}]))
    pair = {"image": "img.png", "question": "q?", "chosen": "a", "rejected": "b"}
    for name, text in (("bad", json.dumps(pair) + '\n{"image": "img.png"}\n'), ("empty", "")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pairs.jsonl").write_text(text)
    before = {p: p.read_bytes() for root in (user, tmp_path) for p in root.rglob("*") if p.is_file()}
    r = cli(*[a.format(d=user, t=tmp_path) for a in args])
    assert_user_error(r, *culprits)
    after = {p: p.read_bytes() for root in (user, tmp_path) for p in root.rglob("*") if p.is_file()}
    assert {p: after.get(p) for p in before} == before  # nothing already written changed or lost


def test_evaluate_answer_file_reuse(user, synth, tmp_path):
    """Answering records a fingerprint: the same inputs resume, another model, setting or test file is refused
    naming it (the file unchanged), --overwrite starts afresh."""
    model = user / "out" / "sft" / "merged"
    other = save_tiny(tmp_path / "other", synth, "mistral")
    data = tmp_path / "data"
    shutil.copytree(synth, data, ignore=shutil.ignore_patterns("images"))
    (data / "images").symlink_to(synth / "images")
    run = ["synth", "--data", data, "--limit", "2", "--max_new_tokens", "2", "--bootstrap", "0",
           "--device", "cpu", "--out", tmp_path / "answers.jsonl"]
    r = cli("evaluate.py", *run, "--model", model)
    assert r.returncode == 0, r.stderr[-3000:]
    answers = (tmp_path / "answers.jsonl").read_text()
    assert len(answers.splitlines()) == 2
    r = cli("evaluate.py", *run, "--model", model, "--limit", "3")  # same inputs, one more question: resumed
    assert r.returncode == 0 and "2 of 3 already answered" in r.stderr, r.stderr[-3000:]
    assert (tmp_path / "answers.jsonl").read_text().startswith(answers)
    answers = (tmp_path / "answers.jsonl").read_text()
    tests = json.loads((data / "test.json").read_text())
    (data / "test.json").write_text(json.dumps(tests[::-1]))
    for extra, named in ((["--model", other], "model ("), (["--model", model, "--max_new_tokens", "3"],
                         "max_new_tokens (2 -> 3)"), (["--model", model, "--closed_suffix", " Yes or no?"],
                         "closed_suffix"), (["--model", model, "--data", tmp_path / "nowhere"], "")):
        r = cli("evaluate.py", *run, *extra)
        if named:
            assert_user_error(r, "answers.jsonl", "other inputs", named, "--overwrite")
        else:
            assert r.returncode == 2 and "nowhere" in r.stderr
        assert (tmp_path / "answers.jsonl").read_text() == answers
    (data / "test.json").write_text(json.dumps(tests))  # data back as it was, but touched: changed since
    r = cli("evaluate.py", *run, "--model", model)
    assert_user_error(r, "data (", "changed since")
    r = cli("evaluate.py", *run, "--model", other, "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {x["model_id"] for x in rows} == {"other"}
    (tmp_path / "old.jsonl").write_text(answers)  # an answer file from before fingerprints
    r = cli("evaluate.py", *run[:-1], tmp_path / "old.jsonl", "--model", other)
    assert_user_error(r, "old.jsonl", "no fingerprint")


def test_judge_and_selector_user_errors(user, tmp_path):
    good = json.dumps({"image": "img.png", "question": "q?", "answers": ["a", "b"]})
    (tmp_path / "in.jsonl").write_text(good + "\n" + good + "\n")
    (tmp_path / "garbage.jsonl").write_text(good + "\nnot json\n" + good + "\n")
    (tmp_path / "img.png").write_bytes(PNG)
    rate = ["--out", tmp_path / "out.jsonl", "--cache", "", "--api_key_env", "JUDGE_TEST_KEY"]
    snapshot = lambda: {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}  # noqa: E731
    before = snapshot()
    assert_user_error(cli("judge.py", "rate", tmp_path / "nope.jsonl", *rate), "nope.jsonl", "cannot read")
    assert_user_error(cli("judge.py", "rate", tmp_path / "garbage.jsonl", *rate), "garbage.jsonl, line 2")
    assert snapshot() == before  # nothing written, nothing lost
    # an unreachable server: every item fails after its retries, exit 1 with a one-line summary
    port = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{port.server_address[1]}/v1"
    port.server_close()
    r = subprocess.run([sys.executable, str(HERE / "judge.py"), "rate", str(tmp_path / "in.jsonl"),
                        "--image_dir", str(tmp_path), "--base_url", url, "--max_tries", "2", "--timeout", "2",
                        *map(str, rate)], capture_output=True, text=True, cwd=HERE, timeout=120,
                       env={**os.environ, "JUDGE_TEST_KEY": KEY, "NO_PROXY": "127.0.0.1"})
    assert_user_error(r, "every item failed (2 of 2", "out.jsonl", code=1, one_line=False)
    # winrate: a question one side lacks is reported, none shared is refused
    test = [{"qid": i, "image_name": "img.png", "question": f"q{i}", "answer": "x", "answer_type": "OPEN"}
            for i in range(4)]
    (tmp_path / "test.json").write_text(json.dumps(test))
    write_answers(tmp_path / "a.jsonl", [("0", "x"), ("1", "y")])
    write_answers(tmp_path / "b.jsonl", [("2", "x"), ("3", "y")])
    r = cli("judge.py", "winrate", tmp_path / "a.jsonl", tmp_path / "b.jsonl", "--questions",
            tmp_path / "test.json", "--judge", "oracle", "--cache", "")
    assert_user_error(r, "no open question", "a.jsonl", "b.jsonl")
    assert "2 questions A has no answer to (e.g. 2, 3)" in r.stdout
    # selector: --clusters 0, a malformed pairs file, --model that does not exist, all before any work
    pair = json.dumps({"items": [{}, {}], "scores": [1, 2]})
    (tmp_path / "pairs.jsonl").write_text(pair + '\n{"scores": 3}\n')
    (tmp_path / "data.json").write_text(json.dumps([{"image": "img.png", "conversations": []}]))
    sel = ["--model", user / "out" / "sft" / "merged", "--data", tmp_path / "data.json", "--pairs",
           tmp_path / "pairs.jsonl", "--clusters", "1", "--device", "cpu"]
    assert_user_error(cli("selector.py", *sel, "--clusters", "0"), "--clusters=0")
    assert_user_error(cli("selector.py", *sel), "pairs.jsonl, line 2", "items")
    assert_user_error(cli("selector.py", *sel, "--model", "out/nowhere/base"), "out/nowhere/base",
                      "does not exist")
    before = snapshot()
    assert_user_error(cli("selector.py", *sel, "--clusters", "5"), "--clusters=5", "1 records")
    assert snapshot() == before


def questioning_llava(tmp_path, synth):
    """A tiny random llava-hf model saved by transformers (with the synthetic tokenizer), rigged so that it
    always writes "?": the decoder blocks add nothing to the residual (o_proj, down_proj = 0), the final norm
    keeps one embedding dimension, positive for every token, and only "?" reads it. Its sampled questions
    are then well formed ("????", kept by stage 2's filter), whatever the image; a random model asks none."""
    tok = D.load_tokenizer(synth / "tokenizer.json")
    hf = tiny_hf_llava(vocab=tok.get_vocab_size(), image_token_id=SY.SYNTH_IMAGE_TOKEN_ID)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "language_model" in name and name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        hf.get_input_embeddings().weight[:, 0] = 1.0
        norm = hf.model.language_model.norm.weight
        norm.zero_()
        norm[0] = 1.0
        hf.lm_head.weight[:, 0] = 0.0
        hf.lm_head.weight[tok.token_to_id("?"), 0] = 20.0
    hf.save_pretrained(tmp_path)
    shutil.copy(synth / "tokenizer.json", tmp_path / "tokenizer.json")
    return tmp_path


@pytest.fixture(scope="module")
def vqa_rad_sft(tmp_path_factory, synth):
    """VQA-RAD's train split exported by evaluate.py, then two sft.py steps (torchrun, two processes, --merge)
    on 8 of its questions from a tiny llava-hf model: (folder, export's stdout, image folder)."""
    d = tmp_path_factory.mktemp("vqa_rad_sft")
    r = cli("evaluate.py", "vqa_rad", "--data", SHARED / "vqa_rad", "--export_train", d / "train.json")
    assert r.returncode == 0, r.stderr[-3000:]
    (d / "small.json").write_text(json.dumps(json.loads((d / "train.json").read_text())[:8]))
    questioning_llava(d / "base", synth)
    image_dir = r.stdout.split("--image_dir=")[1].split()[0]
    run_sft([f"--model={d / 'base'}", f"--data={d / 'small.json'}", f"--image_dir={image_dir}",
             f"--out_dir={d / 'sft'}", "--max_steps=2", "--global_batch=4", "--micro_batch=2",
             "--max_length=256", "--merge", "--save_every=100"], nproc=2)  # as the paper trains: torchrun
    return d, r.stdout, image_dir


@needs_shared
def test_downstream_fine_tuning_on_vqa_rad_train_then_test(vqa_rad_sft):
    """LLaVA-Med's last stage through the CLIs: VQA-RAD's train split as conversation JSON, with no test
    question in it (same image and normalised question); a few sft.py steps on it (the fixture); then
    evaluate.py on the test split."""
    d, stdout, _ = vqa_rad_sft
    train = json.loads((d / "train.json").read_text())
    raw = _vqa_rad()
    n_train = sum(not x["phrase_type"].startswith("test") for x in raw)
    test = {(x["image_name"], MET.normalize_word(x["question"].strip().lower())) for x in raw
            if x["phrase_type"].startswith("test")}
    got = {(t["image"], MET.normalize_word(t["conversations"][0]["value"][len("<image>\n"):].lower()))
           for t in train}
    dropped = n_train - len(train)
    assert not got & test and f"dropped {dropped} that are test questions" in stdout and n_train == 1797
    assert {x["image"] for x in train} <= {x["image_name"] for x in raw} and len(train) > 1500
    first = next(x for x in raw if not x["phrase_type"].startswith("test")
                 and (x["image_name"], MET.normalize_word(x["question"].strip().lower())) not in test)
    assert train[0] == {"id": first["qid"], "image": first["image_name"], "answer_type": first["answer_type"],
                        "conversations": [{"from": "human", "value": "<image>\n" + first["question"].strip()},
                                          {"from": "gpt", "value": str(first["answer"]).strip()}]}
    r = cli("evaluate.py", "vqa_rad", "--model", d / "sft" / "merged", "--data", SHARED / "vqa_rad",
            "--limit", "4", "--max_new_tokens", "2", "--bootstrap", "0", "--device", "cpu",
            "--out", d / "answers.jsonl")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["n"] == 4 and res["n_missing"] == 0


@needs_shared
def test_paper_path_end_to_end(vqa_rad_sft, env, fake, monkeypatch):
    """The paper's path as a user runs it: stage 1 on real VQA-RAD images (the fixture: torchrun sft.py
    --merge), then dpo.py generate, dpo.py judge against a fake OpenAI-compatible server
    (every verdict request must reach it), dpo.py train, and evaluate.py on the DPO output."""
    d, _, image_dir = vqa_rad_sft
    common = [f"--model={d / 'sft' / 'merged'}", f"--data={d / 'small.json'}", f"--image_dir={image_dir}",
              f"--out_dir={d / 'dpo'}"]
    r = cli("dpo.py", "generate", *common, "--n_images=2", "--n_questions=2", "--describe_tokens=4",
            "--q_max_tokens=6", "--a_max_tokens=4", "--gen_batch=2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in (d / "dpo" / "generations.jsonl").read_text().splitlines()]
    asked = [x for x in rows if "question" in x]
    assert len(asked) >= 2, rows
    images = []  # the image each request carried
    fake.reply = lambda body: images.append(body["messages"][-1]["content"][1]["image_url"]["url"]) or (
        OK_REPLY)
    r = subprocess.run([sys.executable, str(HERE / "dpo.py"), "judge", *common, f"--base_url={fake.url}",
                        "--judge_model=gpt-4o", "--api_key_env=JUDGE_TEST_KEY", "--max_tries=2",
                        "--timeout=5"],
                       capture_output=True, text=True, cwd=HERE, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert len(fake.log) == len(asked) == len(images)  # each verdict asked once
    want = {base64.b64encode((Path(image_dir) / x["image"]).read_bytes()).decode() for x in asked}
    assert {u.split(",")[1] for u in images} == want and all(u.startswith("data:image/jpeg") for u in images)
    pairs = [json.loads(x) for x in (d / "dpo" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == len(asked)  # the fake's "8 6": no ties
    r = cli("dpo.py", "train", *common, "--max_steps=1", "--global_batch=2", "--micro_batch=2",
            "--max_length=256")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    r = cli("evaluate.py", "vqa_rad", "--model", d / "dpo" / "merged", "--data", SHARED / "vqa_rad",
            "--limit", "3", "--max_new_tokens", "2", "--bootstrap", "0", "--device", "cpu",
            "--out", d / "dpo_answers.jsonl")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["n"] == 3
    # every output loads in transformers (merged) or PEFT (adapter), offline, and generates what ours does
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    img = Image.open(Path(image_dir) / asked[0]["image"]).convert("RGB")
    x = transformers.AutoProcessor.from_pretrained(d / "sft" / "merged")(
        images=img, text="USER: <image>\nIs there a mass? ASSISTANT:", return_tensors="pt")
    for stage in ("sft", "dpo"):
        ours = C.from_pretrained(str(d / stage / "merged"), dtype=torch.float32).eval()
        want = M.generate(ours, x["input_ids"], x["pixel_values"], max_new_tokens=4)
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(d / stage / "merged").eval()
        pm = peft.AutoPeftModel.from_pretrained(str(d / stage / "final")).eval()
        for other in (hf, pm):
            new = other.generate(**x, max_new_tokens=4, do_sample=False, eos_token_id=None)
            assert torch.equal(new[:, x["input_ids"].shape[1]:], want), (stage, type(other).__name__)


def test_every_reuse_case_of_dpo_outputs(synth, small_data, env, fake, tmp_path):
    """dpo.py's outputs know what made them: the generations (model, data, sampling settings), the pairs (the
    generations they were judged from), the precomputed reference log-probs (pairs, model, settings) and the
    DPO checkpoint. The same inputs are reused; another input or setting is refused, naming it, with exit
    code 2 and nothing written lost; --overwrite starts that step afresh."""
    model, other = questioning_llava(tmp_path / "m", synth), questioning_llava(tmp_path / "m2", synth)
    out = tmp_path / "dpo"
    common = [f"--model={model}", f"--data={small_data}", f"--out_dir={out}"]
    r = cli("dpo.py", "generate", *common)  # the JSON's folder holds no image: named before any weight
    assert_user_error(r, str(small_data), "--image_dir", one_line=False)
    common.append(f"--image_dir={synth / 'images'}")
    gen = ["generate", *common, "--n_images=2", "--n_questions=2", "--describe_tokens=4", "--q_max_tokens=6",
           "--a_max_tokens=4", "--gen_batch=1"]
    judge_ = ["judge", *common, f"--base_url={fake.url}", "--api_key_env=JUDGE_TEST_KEY", "--max_tries=2"]
    train = ["train", *common, "--max_steps=1", "--global_batch=2", "--micro_batch=2", "--max_length=256",
             "--precompute_ref", "--lora_r=4", "--lora_alpha=8", "--vit_lora_r=2", "--vit_lora_alpha=4"]
    g, pairs, ref = out / "generations.jsonl", out / "pairs.jsonl", out / "ref_logps.pt"
    assert cli("dpo.py", *gen).returncode == 0
    first = g.read_text()
    r = cli("dpo.py", *gen)  # the same inputs: reused, nothing generated again
    assert r.returncode == 0 and g.read_text() == first and "generate: batch" not in r.stdout, r.stderr
    for args in (judge_, train):
        r = cli("dpo.py", *args)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert len(fake.log) == len(first.splitlines()) - 2  # a verdict per question (each batch has an end line)
    kept = {p: p.read_bytes() for p in (g, pairs, ref)}
    for args, culprits in ((gen + ["--n_questions=3"], ["generations.jsonl", "n_questions (2 -> 3)"]),
                           (gen + [f"--model={other}"], ["generations.jsonl", f"model ({model} -> {other})"]),
                           (gen + ["--q_top_p=0.5"], ["generations.jsonl", "q_top_p (0.95 -> 0.5)"]),
                           (train + ["--max_length=200"], ["ref_logps.pt", "max_length (256 -> 200)"]),
                           (train + ["--lr=1e-4"], ["checkpoint.pt", "lr (5e-06 -> 0.0001)"])):
        r = cli("dpo.py", *args)
        assert_user_error(r, *culprits, "--overwrite")
        assert "memory plan" not in r.stdout  # refused before the model loaded
        assert all(p.read_bytes() == b for p, b in kept.items())  # nothing lost
    # generations made afresh: the pairs judged from the old ones are refused until judged again
    r = cli("dpo.py", *gen, "--a_max_tokens=3", "--overwrite")  # shorter answers: other pairs
    assert r.returncode == 0 and g.read_text() != first and "generate: batch 2/2" in r.stdout, r.stderr
    assert_user_error(cli("dpo.py", *train), "pairs.jsonl", str(g), "python dpo.py judge")
    assert cli("dpo.py", *judge_).returncode == 0
    assert_user_error(cli("dpo.py", *train), "ref_logps.pt", "pairs (")  # the reference's pairs changed
    r = cli("dpo.py", *train, "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    n_pairs = len(pairs.read_text().splitlines())
    assert ref.read_bytes() != kept[ref] and torch.load(ref)["logps"].shape == (n_pairs, 2)
    settings = json.loads((out / "config.json").read_text())["settings"]
    assert settings["overwrite"] and settings["a_max_tokens"] == 1024  # the train step's run, as it ran
    (out / ".lock").write_text(str(os.getpid()))  # a live run holds out_dir: every step is refused
    for step in ("generate", "judge", "train"):
        assert_user_error(cli("dpo.py", step, *common), str(out), "in use by another run", str(os.getpid()))


def test_help_shows_what_applies(synth):
    """--help: every option with a one-line description, its default, the synthetic default's value where it
    replaces it, and the valid choices; dpo.py's usage names its steps. A bad choice or step is one line."""
    for script, module in (("sft.py", sft), ("dpo.py", dpo)):
        r = cli(script, "--help")
        assert r.returncode == 0, r.stderr
        text = " ".join(r.stdout.split())  # argparse wraps lines
        described = runs.field_help(module.Config)
        for f in fields(module.Config):
            assert described.get(f.name), (script, f.name)  # the comment beside the field, or above it
            desc = " ".join(described[f.name].split())
            assert f"--{f.name}" in text and desc in text and f"(default {f.default!r}" in text, f.name
            if f.name in module.SYNTH_OVERRIDES and f.name != "micro_batch":
                assert f"{desc} (default {f.default!r}; synthetic default {module.SYNTH_OVERRIDES[f.name]})" \
                    in text, f.name
        assert "{lora,projector,llm,full}" in text if script == "sft.py" else "{gpt,oracle}" in text
        assert "{ddp,fsdp}" in text and ",".join(D.TEMPLATES) + "}" in text
    assert r.stdout.startswith("usage: dpo.py [generate | judge | train]")
    assert "synthetic default oracle" in text and "Without --data, the synthetic data and the oracle" in text
    assert_user_error(cli("sft.py", "--train=lorra"), "--train", "'lorra'", "'projector'")
    assert_user_error(cli("sft.py", "--shard=zero3"), "--shard", "'zero3'", "'fsdp'")
    assert_user_error(cli("dpo.py", "gnerate"), "generate, judge or train", "'gnerate'")
    assert_user_error(cli("dpo.py", "judge", "--judge=gpt5"), "--judge", "'gpt5'", "'oracle'")


# ----------------------------------------------------------------------------- bench.py

@pytest.fixture(scope="module")
def tiny_pair():
    """Our tiny model and transformers + PEFT's, built as bench.py builds them."""
    cfg = bench.SHAPES["tiny"]["config"]
    ours = bench.build_ours(cfg, torch.device("cpu"), torch.float32)
    return cfg, ours, bench.build_theirs(ours, torch.device("cpu"), torch.float32)


def test_bench_tiny_quick_writes_both_sides(tmp_path):
    """The command from the README runs and its JSON holds both sides, ratios, hardware, versions,
    settings."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench.py", "--shape", "tiny", "--repeats", "1", "--warmup", "0", "--quick",
           "--threads", "1", "--out", str(out)]
    r = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert {"hardware", "versions", "settings", "formulas", "parity", "table", "raw"} <= set(rep)
    assert rep["versions"]["torch"] == torch.__version__
    assert rep["versions"]["peft"] and rep["versions"]["transformers"]
    assert rep["parity"]["weights_equal"] and rep["parity"]["logits_rel_max_diff"] < 1e-4
    assert "train.py step_flops" in rep["formulas"]["mfu"] and rep["settings"]["sampling"] == bench.SAMPLING
    rows = {(row["section"].split()[0], row["metric"]): row for row in rep["table"]}
    assert {s for s, _ in rows} == {"sft", "dpo", "vision+projector", "sample"}
    # direct timings are always there; decode steps/s is a difference of two noisy timings and may be n/a
    for key in [("sft", "tokens/s"), ("sft", "step ms"), ("dpo", "step ms"), ("vision+projector", "images/s"),
                ("sample", "new tokens/s")]:
        row = rows[key]
        assert row["ours"] > 0 and row["theirs"] > 0
        assert row["ratio"] == pytest.approx(row["ours"] / row["theirs"])
    sampled = {k for k in rep["raw"] if k.startswith("sample_")}
    assert sampled == {"sample_b16_unmerged", "sample_b16_merged"}
    # --repeats 1: one timed call per side
    assert all(len(side["times"]) == 1 for side in rep["raw"]["sft"].values())


def test_parity_check_catches_a_different_weight(tiny_pair):
    cfg, ours, pm = tiny_pair
    batch = bench.make_batch(cfg, 2, 16, "cpu", torch.float32, seed=0)
    assert bench.check_parity(ours, pm, batch, bench.contextlib.nullcontext, 1e-4)["weights_equal"]
    # frozen weights are shared, not copied; what trains (projector, adapters) is each side's own
    q = "language_model.layers.0.self_attn.q_proj"
    theirs_q = pm.base_model.model.model.language_model.layers[0].self_attn.q_proj
    assert theirs_q.base_layer.weight.data_ptr() == ours.get_submodule(q).weight.data_ptr()
    assert theirs_q.lora_B["default"].weight.data_ptr() != ours.get_submodule(q).lora_b.data_ptr()
    b = theirs_q.lora_B["default"].weight
    with torch.no_grad():
        b[0, 0] += 1e-3
    try:
        with pytest.raises(RuntimeError, match="weights differ"):
            bench.check_parity(ours, pm, batch, bench.contextlib.nullcontext, 1e-4)
    finally:
        with torch.no_grad():
            b[0, 0] -= 1e-3


def test_bench_times_the_jobs_own_losses():
    """bench.py keeps no copies: its objectives call dpo.dpo_loss and train.token_nll, the functions training
    runs."""
    assert bench.dpo_loss is dpo.dpo_loss
    assert bench.token_nll is T.token_nll
    x = torch.tensor([-3.0, -7.0])
    assert bench.dpo_loss(x, x, x, x)[0].mean().item() == pytest.approx(math.log(2))
    pc = torch.tensor([-3.0], requires_grad=True)
    bench.dpo_loss(pc, torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0]))[0].mean().backward()
    assert pc.grad.item() < 0  # descending the loss raises the chosen answer's log-probability


def test_sequences_and_flops_count_image_tokens(tiny_pair):
    cfg, ours, _ = tiny_pair
    b = bench.make_batch(cfg, 3, 20, "cpu", torch.float32, seed=0)
    assert b["input_ids"].shape == (3, cfg.image_seq_length + 20)
    assert int((b["input_ids"] == cfg.image_token_id).sum()) == 3 * cfg.image_seq_length
    assert (b["labels"][:, :1 + cfg.image_seq_length] == -100).all() and (b["labels"][:, -1] != -100).all()
    pairs = bench.pair_batch(cfg, 2, 20, "cpu", torch.float32, seed=0)
    assert torch.equal(pairs["pixel_values"][:2], pairs["pixel_values"][2:])
    n_tok = cfg.image_seq_length + 20  # a row: BOS, the image tokens, the text
    flops, formula = bench.train_flops(ours, 3, n_tok)
    # train.py's count (the one sft.py logs), every token of the 3 rows, image ones included, and 3 images
    terms = T.flop_terms(ours)
    assert flops == T.step_flops(terms, ours, tokens=3 * n_tok, tokens_sq=3 * n_tok**2, images=3)
    without_images = T.step_flops(terms, ours, tokens=3 * 20, tokens_sq=3 * 20**2, images=3)
    assert flops - without_images == (3 * cfg.image_seq_length * terms["per_token"]
                                      + 3 * (n_tok**2 - 20**2) * terms["attention"]) > 0
    # LoRA: the adapters train (6 per weight), the frozen base only passes the gradient (4), not 6N
    llm = [p for m in (ours.language_model, ours.lm_head) for mod in m.modules()
           if not isinstance(mod, torch.nn.Embedding) for p in mod.parameters(recurse=False) if p.dim() >= 2]
    n_tr = sum(p.numel() for p in llm if p.requires_grad)
    n_fr = sum(p.numel() for p in llm if not p.requires_grad)
    assert n_tr > 0 and n_fr > 0 and terms["per_token"] == 6 * n_tr + 4 * n_fr
    assert f"tokens·{terms['per_token']:,}" in formula and f"T={n_tok}" in formula


@pytest.mark.parametrize("shape", ["7b", "mistral7b"])
def test_gpu_shapes_map_onto_transformers_on_meta(shape):
    """The 7B configs that only a GPU runs: same tensor names and shapes on both sides (built on meta: no
    memory)."""
    from transformers import LlavaForConditionalGeneration
    cfg = bench.SHAPES[shape]["config"]
    with torch.device("meta"):
        ours = bench.M.Llava(cfg)
        hf = LlavaForConditionalGeneration(bench.hf_config(cfg))
    theirs = {k: v.shape for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    assert {bench.to_hf_name(k): v.shape for k, v in ours.state_dict().items()} == theirs
    n = sum(p.numel() for p in ours.parameters())
    assert 7.0e9 < n < 7.6e9 and cfg.image_seq_length == 576 and cfg.text.vocab_size == 32064
    flops, _ = bench.train_flops(ours, 8, 705)
    assert 6 * 6.5e9 * 8 * 705 < flops < 8 * 7.6e9 * 8 * 705  # all trained: ~6 N per token (+ attention)
    bench.mark_trainable(bench.add_lora(ours, bench.TARGETS))  # the paper's LoRA, on meta too
    flops, _ = bench.train_flops(ours, 8, 705)
    assert 4 * 6.5e9 * 8 * 705 < flops < 5 * 7.6e9 * 8 * 705  # frozen base: ~4 N (+ adapters, attention)


# ----------------------------------------------------------------------------- README and layout

def test_readme_line_counts_are_current():
    """The README's file table states each file's line count; a stale number fails here, not in a reader's
    head."""
    root = Path(__file__).resolve().parent
    rows = re.findall(r"^\| `(\w+\.py)` \| (\d+) \|", (root / "README.md").read_text(), re.M)
    assert len(rows) >= 8
    for name, n in rows:
        assert len((root / name).read_text().splitlines()) == int(n), f"README says {name} has {n} lines"


BLOCKS = ("model", "checkpoint", "lora", "data", "train", "synth", "chat", "runs", "report", "metrics")
JOBS = ("sft", "dpo", "judge", "selector", "evaluate")


def project_imports(name):
    """The project modules that `name`.py imports anywhere in it, lazy imports inside functions included."""
    tree = ast.parse((Path(__file__).resolve().parent / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(BLOCKS + JOBS + ("bench",))


def test_imports_point_one_way():
    """Jobs stand on blocks: no block imports a job, model.py imports nothing of ours, no job imports a
    training job (bench, the tool, takes dpo's loss to time it), and judge.py runs without torch."""
    assert project_imports("model") == set()
    for block in BLOCKS:
        assert not project_imports(block) & set(JOBS + ("bench",)), f"{block}.py imports a job"
    for job in JOBS:
        assert not project_imports(job) & {"sft", "dpo", "bench"}, f"{job}.py imports a training job"
    assert project_imports("bench") & set(JOBS) == {"dpo"}
    r = subprocess.run([sys.executable, "-c", "import judge, sys; assert 'torch' not in sys.modules"],
                       cwd=Path(__file__).resolve().parent, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert project_imports("runs") == project_imports("report") == project_imports("metrics") == set()
    r = subprocess.run([sys.executable, "-c", "import report, sys; assert 'torch' not in sys.modules"],
                       cwd=Path(__file__).resolve().parent, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_files_stay_small():
    """One concern per file: every file but the tests within 600 lines, the stage-1 job within 300."""
    root = Path(__file__).resolve().parent
    for path in root.glob("*.py"):
        if path.name != "test_all.py":
            limit = 300 if path.name == "sft.py" else 600
            assert len(path.read_text().splitlines()) <= limit, f"{path.name} is over {limit} lines"
