# ----------------------------------------------------------------------------- model.py
import json
import os

import pytest
import torch

import model as M

transformers = pytest.importorskip("transformers")


def tiny_hf_llava(theta=500000.0, kv_heads=2, vocab=120, image_token_id=119, tie=False, seed=0):
    """A random-weight transformers LlavaForConditionalGeneration with GQA and rope theta != 10000."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=28, patch_size=7, projection_dim=16)
    tc = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=kv_heads, vocab_size=vocab, rope_theta=theta, tie_word_embeddings=tie,
                     max_position_embeddings=256)
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
    r = lambda n: torch.randint(3, vocab, (n,), generator=g)
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
    ours = M.from_pretrained(str(d), dtype=torch.float32)
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


def write_original_layout(hf, d, vision_dir, clip_model_form=False):
    """Save `hf` as an original-LLaVA checkpoint (LLaMA keys + mm_projector) and its tower as a CLIPVisionModel."""
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
               num_key_value_heads=tc.num_key_value_heads, vocab_size=tc.vocab_size - 1, rms_norm_eps=tc.rms_norm_eps,
               rope_theta=500000.0, mm_projector_type="mlp2x_gelu", mm_vision_tower="my-local/clip",
               mm_hidden_size=32, mm_vision_select_layer=-2, mm_vision_select_feature="patch")
    # the original layout has no image-token row in the vocabulary: drop the last row (id 119)
    out["model.embed_tokens.weight"] = out["model.embed_tokens.weight"][:-1].contiguous()
    out["lm_head.weight"] = out["lm_head.weight"][:-1].contiguous()
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    tower_sd = {k[len("model.vision_tower."):]: v for k, v in sd.items() if k.startswith("model.vision_tower.")}
    if clip_model_form:  # what the hub's openai/clip-* checkpoints hold: a whole CLIPModel
        os.makedirs(vision_dir, exist_ok=True)
        clip = {"vision_model." + k: v.contiguous() for k, v in tower_sd.items()}
        clip.update({"text_model.embeddings.token_embedding.weight": torch.zeros(3, 4), "logit_scale": torch.ones(())})
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
        M.from_pretrained(str(tmp_path / "llava"), dtype=torch.float32)
    ours = M.from_pretrained(str(tmp_path / "llava"), vision_path=str(tmp_path / "clip"), dtype=torch.float32)
    assert ours.config.image_token_id == -200 and ours.config.text.vocab_size == 119
    ids, mask, pixels = padded_batch()
    ref = hf_logits(hf, ids, mask, pixels)[..., :119]
    with torch.no_grad():
        out = ours(ids.masked_fill(ids == 119, -200), pixels, mask)
    valid = mask.bool()
    assert (out[valid] - ref[valid]).abs().max() < 1e-4


def test_greedy_generate_matches_transformers(hf_and_ours):
    hf, ours, _ = hf_and_ours
    ids, mask, pixels = padded_batch()
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=12, do_sample=False,
                          eos_token_id=5, pad_token_id=0)[:, ids.shape[1]:]
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


def test_sampling_filter_matches_transformers_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        logits = torch.randn(4, 300, generator=g) * (1 + trial % 4)
        if trial % 5 == 0:
            logits[:, :10] = logits[:, :1]  # ties
        for temp, k, p in [(1.2, 100, 0.95), (0.7, 5, 1.0), (1.0, None, 0.5), (2.0, 300, 0.01), (1.0, 1, 0.9)]:
            ref = TemperatureLogitsWarper(temp)(None, logits.clone())
            if k:
                ref = TopKLogitsWarper(k)(None, ref)
            if p < 1.0:
                ref = TopPLogitsWarper(p)(None, ref)
            ours = M.filter_logits(logits.clone(), temp, k, p)
            assert torch.equal(torch.isinf(ours), torch.isinf(ref))
            assert (torch.isfinite(ours).sum(-1) >= 1).all()


def test_save_pretrained_roundtrips_both_layouts(hf_and_ours, tmp_path):
    from transformers import LlavaForConditionalGeneration
    hf, ours, _ = hf_and_ours
    ids, mask, pixels = padded_batch()
    with torch.no_grad():
        want = ours(ids, pixels, mask)
    M.save_pretrained(ours, tmp_path / "hf", max_shard_bytes=40_000)  # force shards + index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    hf2 = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    valid = mask.bool()
    assert (hf_logits(hf2, ids, mask, pixels)[valid] - want[valid]).abs().max() < 1e-4
    for layout in ("llava-hf", "llava"):
        M.save_pretrained(ours, tmp_path / layout, layout=layout)
        back = M.from_pretrained(str(tmp_path / layout), dtype=torch.float32)
        with torch.no_grad():
            assert torch.equal(back(ids, pixels, mask), want)


def test_tied_embeddings_roundtrip(tmp_path):
    hf = tiny_hf_llava(tie=True)
    hf.save_pretrained(tmp_path / "t")
    ours = M.from_pretrained(str(tmp_path / "t"), dtype=torch.float32)
    assert ours.lm_head.weight is ours.language_model.embed_tokens.weight
    ids, mask, pixels = padded_batch()
    with torch.no_grad():
        assert (ours(ids, pixels, mask)[mask.bool()] - hf_logits(hf, ids, mask, pixels)[mask.bool()]).abs().max() < 1e-4


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
            for l in range(L):
                cos[n, l] = torch.dot(C[n], X[l]) / (C[n].norm().clamp(min=1e-12) * X[l].norm().clamp(min=1e-12))
        sim = torch.sigmoid(p.sim_beta.flatten() + p.sim_alpha.flatten() * cos)
        assign = sim.argmax(0)  # (L,) each token's centre
        out = X.clone()
        for n in range(N):
            members = (assign == n).nonzero().flatten()
            upd = (sum((sim[n, l] * Fe[l] for l in members), torch.zeros(D)) + CF[n]) / (len(members) + 1.0)
            for l in members:
                out[l] = out[l] + sim[n, l] * upd
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


def test_cluster_projector_roundtrips_in_llava_layout(tmp_path):
    cfg = M.LlavaConfig(vision=M.VisionConfig(32, 64, 2, 4, 28, 7), text=M.TextConfig(
        vocab_size=50, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2),
        projector_type="cluster", image_token_id=49, cluster_centers=4)
    torch.manual_seed(0)
    m = M.Llava(cfg).eval()
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, 16), 49), torch.tensor([[5, 6]])], 1)
    px = torch.randn(1, 3, 28, 28)
    with pytest.raises(ValueError, match="use layout='llava'"):
        M.save_pretrained(m, tmp_path / "x", layout="llava-hf")
    M.save_pretrained(m, tmp_path / "c", layout="llava")
    from safetensors.torch import load_file
    keys = load_file(tmp_path / "c" / "model.safetensors").keys()
    assert {"model.mm_projector.sim_alpha", "model.mm_projector.c.weight", "model.mm_projector.mlp.2.bias",
            "model.mm_projector.ln_1.weight"} <= set(keys)
    back = M.from_pretrained(str(tmp_path / "c"), dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(back(ids, px), m(ids, px))


def test_bad_inputs_give_clear_errors(hf_and_ours, tmp_path):
    _, ours, d = hf_and_ours
    ids, mask, pixels = padded_batch()
    with pytest.raises(ValueError, match=r"image token count mismatch: input_ids hold 32 .* 1 image\(s\) x 16"):
        ours(ids, pixels[:1], mask)
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(ids, None, mask)
    with pytest.raises(ValueError, match="left-padded"):
        M.generate(ours, ids.flip(1), pixels, mask.flip(1))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        M.from_pretrained(str(tmp_path), dtype=torch.float32) if (tmp_path / "config.json").write_text(
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
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\], unexpected \['language_model.extra.weight'\]"):
        M.from_pretrained(str(tmp_path / "bad"), dtype=torch.float32)
    broken = dict(sd)
    broken[head] = torch.zeros(3, 3)
    save_file(broken, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(ValueError, match=r"shape mismatch .* lm_head.weight: checkpoint \(3, 3\) vs model \(120, 48\)"):
        M.from_pretrained(str(tmp_path / "bad"), dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown projector_type 'mlp3'"):
        M.Llava(M.LlavaConfig(projector_type="mlp3", vision=M.VisionConfig(8, 8, 1, 2, 14, 7),
                              text=M.TextConfig(10, 8, 8, 1, 2, 2)))


def test_unknown_tower_hub_id_error_says_how_to_fix(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_llama",
                                                       "mm_vision_tower": "someone/medclip"}))
    with pytest.raises(ValueError, match=r"'someone/medclip'.*pass vision_path="):
        M.from_pretrained(str(tmp_path))
