"""
bench.py: our LLaVA + LoRA against transformers + PEFT, with the same weights and the same LoRA, in one
process.

Both models hold identical random weights (checked tensor by tensor, then on the logits, before anything is
timed). Timed calls alternate ours, theirs, ours, theirs ... after warm-up, and the medians are compared:
1. SFT step: forward + backward + AdamW on B x T tokens (image tokens included): tokens/s, FLOP/s or MFU
   (train.py's FLOP count: 6 per trained weight, 4 per frozen one a gradient passes, 2 otherwise), memory.
2. DPO step on the same rows as B/2 (chosen, rejected) pairs in one batch: reference log-probs with the
   adapters off (lora.disable_lora / PEFT `disable_adapter()`), policy log-probs, sigmoid loss, backward,
   step. TRL is not installed here, so its DPOTrainer is not timed; both sides run the same loss
   (= dpo.dpo_loss).
3. Sampling: new tokens/s at batch 16 (and 64 on GPU), one prompt repeated, temperature 1.2, top-k 100,
   top-p 0.95, exactly `new` decode steps on both sides (ours: no EOS given; transformers: min_new_tokens),
   with LoRA unmerged, then merged (lora.merge_lora in place, PEFT `merge_and_unload` on a copy). Decode-only
   steps/s = (new - 1) / (t(new) - t(1)); bandwidth achieved = bytes read per decode step x steps/s (gpt-fast
   `generate.py`). With --compile, rows "... compiled" time our generate(compile=True) (static-shape decode
   step under torch.compile, CUDA graphs on a GPU) against the same transformers calls.
4. Vision tower + projector: images/s (forward only).

LoRA: the paper's (lora.py PAPER_TARGETS): LLM r128/a256 on q,k,v,o,gate,up,down; ViT r32/a64 on
q,k,v,out_proj,fc1,fc2; the projector trained in full. One dropout (0.05) on both sides, as PEFT has one.
transformers' model reuses our frozen tensors (no second copy); only the trained ones are copied.

    python bench.py --shape tiny --threads 1          # CPU, about a minute (1 thread: the cores are shared)
    python bench.py --shape 7b --hf_grad_ckpt --compile  # one GPU, transformers with gradient checkpointing
    python bench.py --shape 7b --hf_grad_ckpt --grad_ckpt --compile  # ... if ours would run out of memory
"""
import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import resource
import statistics
import time
from dataclasses import replace

import torch

import model as M
from dpo import dpo_loss
from lora import (LLM_LAYERS, VIT_LAYERS, add_lora, disable_lora, lora_layers, lora_targets, mark_trainable,
                  merge_lora, to_hf_name)
from train import flop_terms, step_flops, token_nll

# PEFT has a single lora_dropout; the paper's ViT uses 0.2 (lora.py), a cost both sides share
LORA_DROPOUT = 0.05
TARGETS = lora_targets(dropout=LORA_DROPOUT, vit_dropout=LORA_DROPOUT)
# STLLaVA-Med train.py `find_all_linear_names`: the last name of every Linear in the two towers
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "out_proj", "fc1",
              "fc2"]
SAMPLING = dict(temperature=1.2, top_k=100, top_p=0.95)

_7B = M.LlavaConfig(text=M.TextConfig(vocab_size=32064))  # llava-hf pads LLaVA-1.5's vocabulary to 32064
_MISTRAL = M.CONFIGS["llava-med-v1.5-mistral-7b"]
# rows x (image tokens + text) per SFT step; prompt = image tokens + prompt text; new tokens sampled
SHAPES = {
    "tiny": dict(config=M.CONFIGS["tiny"], dtype=torch.float32, rows=4, text=64, prompt=16, new=32,
                 batches=(16,), images=64),
    "7b": dict(config=_7B, dtype=torch.bfloat16, rows=8, text=129, prompt=33, new=128, batches=(16, 64),
               images=32),
    "mistral7b": dict(config=replace(_MISTRAL, text=replace(_MISTRAL.text, vocab_size=32064)),
                      dtype=torch.bfloat16, rows=8, text=129, prompt=33, new=128, batches=(16, 64),
                      images=32),
}
# dense bf16 FLOP/s and memory bytes/s by a substring of the CUDA device name, first match wins
# (nanochat common.py)
PEAKS = [("H100 PCIe", 756e12, 2.0e12), ("H100 NVL", 835e12, 3.9e12), ("H100", 989e12, 3.35e12),
         ("H200", 989e12, 4.8e12), ("A100", 312e12, 2.0e12), ("L40S", 362e12, 0.864e12),
         ("A10G", 125e12, 0.6e12), ("L4", 121e12, 0.3e12), ("4090", 165e12, 1.0e12)]

# -----------------------------------------------------------------------------
# The two models, with the same weights


@torch.no_grad()
def build_ours(cfg, device, dtype, seed=0):
    """Random-weight Llava with the paper's LoRA (B != 0, so the adapters change the output)."""
    with torch.device("meta"):
        model = M.Llava(cfg).to(dtype)  # free on meta
    model.to_empty(device=device)  # the one allocation: a 7B exists once, already in `dtype` on the device
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        p.fill_(1.0) if "norm" in name and name.endswith("weight") else p.normal_(0.0, 0.02)
    # model.generate raises if it samples the image token (model.py `embed`); a zero row keeps that
    # logit at 0, far below the top-100 of thousands of random logits centred on 0. Same weights on both
    # sides, same cost.
    model.lm_head.weight[cfg.image_token_id] = 0
    add_lora(model, TARGETS)
    for m in lora_layers(model).values():
        m.lora_b.normal_(0.0, 0.02)
    return mark_trainable(model)


def hf_config(cfg):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, MistralConfig
    v, t = cfg.vision, cfg.text
    vision = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                              num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                              image_size=v.image_size, patch_size=v.patch_size,
                              layer_norm_eps=v.layer_norm_eps, hidden_act="quick_gelu")
    text = (MistralConfig if t.model_type == "mistral" else LlamaConfig)(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        head_dim=t.head_dim, rope_theta=t.rope_theta, rms_norm_eps=t.rms_norm_eps, tie_word_embeddings=False,
        max_position_embeddings=t.max_position_embeddings, bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id)
    if t.model_type == "mistral":
        text.sliding_window = None  # model.py has no sliding window
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=cfg.image_token_id,
                       image_seq_length=cfg.image_seq_length, vision_feature_layer=v.feature_layer,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       tie_word_embeddings=False)


def build_theirs(ours, device, dtype):
    """LlavaForConditionalGeneration + PEFT LoRA holding our weights: frozen tensors shared, trained ones
    copied."""
    import peft
    from transformers import LlavaForConditionalGeneration
    # its own random init is replaced below (transient: one extra copy of the weights)
    with torch.device(device):
        hf = LlavaForConditionalGeneration._from_config(hf_config(ours.config), dtype=dtype,
                                                        attn_implementation="sdpa")
    state = {to_hf_name(n): (t.detach().clone() if n.startswith("projector.") else t.detach())
             for n, t in ours.state_dict().items() if not n.endswith((".lora_a", ".lora_b"))}
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {n for n, _ in hf.named_buffers()}:
        raise RuntimeError(f"name mapping broken: missing {missing[:5]}, unexpected {unexpected[:5]}")
    llm = TARGETS[LLM_LAYERS]
    vit = TARGETS[VIT_LAYERS]
    vit_pattern = r"model\.vision_tower\..*"
    pm = peft.get_peft_model(hf, peft.LoraConfig(
        r=llm.r, lora_alpha=llm.alpha, lora_dropout=LORA_DROPOUT, target_modules=HF_TARGETS,
        rank_pattern={vit_pattern: vit.r}, alpha_pattern={vit_pattern: vit.alpha},
        modules_to_save=["multi_modal_projector"]))
    with torch.no_grad():  # a layer missing on either side fails here or in check_parity's trainable count
        for n, m in lora_layers(ours).items():
            theirs = pm.base_model.model.get_submodule(to_hf_name(n))
            theirs.lora_A["default"].weight.copy_(m.lora_a)
            theirs.lora_B["default"].weight.copy_(m.lora_b)
    return pm


def peft_name(name, lora_names):
    """Our parameter name -> its name in PEFT's state dict (base_layer, lora_A.default, modules_to_save)."""
    module, _, leaf = name.rpartition(".")
    if leaf in ("lora_a", "lora_b"):
        return f"base_model.model.{to_hf_name(module)}.lora_{leaf[-1].upper()}.default.weight"
    if module in lora_names:
        return f"base_model.model.{to_hf_name(module)}.base_layer.{leaf}"
    if name.startswith("projector."):
        return ("base_model.model.model.multi_modal_projector.modules_to_save.default."
                + name.removeprefix("projector."))
    return "base_model.model." + to_hf_name(name)


@torch.no_grad()
def check_parity(ours, pm, batch, amp, tol):
    """Raise unless every tensor is equal by name, the trainable sets match and the logits agree."""
    theirs = pm.state_dict()
    lora_names = set(lora_layers(ours))
    for name, t in ours.state_dict().items():
        if not torch.equal(t, theirs[peft_name(name, lora_names)]):
            raise RuntimeError(f"weights differ at {name}")
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, pm))
    if n_ours != n_theirs:
        raise RuntimeError(f"trainable parameters differ: ours {n_ours:,}, theirs {n_theirs:,}")
    ours.eval()
    pm.eval()
    with amp():
        a = ours(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).float()
        b = pm(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
               attention_mask=batch["attention_mask"], use_cache=False).logits.float()
    rel = ((a - b).abs().max() / b.abs().max()).item()
    if rel > tol:
        raise RuntimeError(f"logits differ: max |diff| / max |logit| = {rel:.2e}")
    return dict(weights_equal=True, trainable_params=n_ours, logits_rel_max_diff=rel)

# -----------------------------------------------------------------------------
# Batches, losses and the steps both sides run


def make_batch(cfg, rows, text_len, device, dtype, seed):
    """rows x [BOS, <image> x L, text_len - 1 random tokens], one image per row; loss on the last half of the
    text."""
    g = torch.Generator().manual_seed(seed)
    L, V = cfg.image_seq_length, cfg.text.vocab_size
    text = torch.randint(4, V, (rows, text_len - 1), generator=g)
    # never an accidental image token (ids 0-3: pad/unk, BOS, EOS, tiny's <image>)
    text[text == cfg.image_token_id] = 4
    ids = torch.cat([torch.full((rows, 1), cfg.text.bos_token_id), torch.full((rows, L), cfg.image_token_id),
                     text], 1)
    labels = ids.clone()
    labels[:, :1 + L + text_len // 2] = -100
    pixels = torch.randn(rows, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                pixel_values=pixels.to(device, dtype), labels=labels.to(device))


def pair_batch(cfg, pairs, text_len, device, dtype, seed):
    """Rows [:pairs] chosen, [pairs:] rejected: same image and question, different answers (one 2B batch)."""
    b = make_batch(cfg, 2 * pairs, text_len, device, dtype, seed)
    prompt = 1 + cfg.image_seq_length + text_len // 2
    b["input_ids"][pairs:, :prompt] = b["input_ids"][:pairs, :prompt]
    b["pixel_values"][pairs:] = b["pixel_values"][:pairs]
    return b


def sft_objective(logits_fn, b, amp):
    with amp():  # mean over supervised tokens, as transformers computes it from `labels`
        return token_nll(logits_fn(b), b["labels"]).sum() / (b["labels"][:, 1:] != -100).sum()


def dpo_objective(logits_fn, reference, b, amp):
    # rows [:n] chosen, [n:] rejected: one forward (torchtune concatenated_forward)
    n = b["input_ids"].shape[0] // 2
    with torch.no_grad(), reference(), amp():  # reference = the same model with the adapters off
        ref = -token_nll(logits_fn(b), b["labels"]).sum(-1)  # (2n,) summed log-probs of the answers
    with amp():
        pol = -token_nll(logits_fn(b), b["labels"]).sum(-1)
        return dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:])[0].mean()


def train_step(loss_fn, opt):
    try:
        loss_fn().backward()
        opt.step()
    finally:  # also after an OOM, so that no gradients are left behind for the other side's turn
        opt.zero_grad(set_to_none=True)


def ours_generate(model, b, n, compile=False):  # no eos_token_id: every row decodes exactly n tokens
    out = M.generate(model, b["input_ids"], b["pixel_values"], b["attention_mask"], max_new_tokens=n,
                     compile=compile, **SAMPLING)
    assert out.shape[1] == n


def hf_generate(model, b, n):
    out = model.generate(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                         attention_mask=b["attention_mask"], do_sample=True, max_new_tokens=n,
                         min_new_tokens=n, pad_token_id=0, **SAMPLING)
    assert out.shape[1] == b["input_ids"].shape[1] + n

# -----------------------------------------------------------------------------
# Timing and arithmetic


def measure(calls, repeats, warmup, device):
    """Warm up every call, then `repeats` rounds alternating between them. Per call: median seconds, and on
    CUDA the peak memory allocated above what was allocated when the call began. An OOM retires that call
    only."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    res = {k: dict(times=[], peak_step_gib=0.0 if cuda else None, error=None) for k in calls}
    for r in range(warmup + repeats):
        for k, f in ((k, f) for k, f in calls.items() if not res[k]["error"]):
            try:
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                f()
                sync()
                if r >= warmup:
                    res[k]["times"].append(time.perf_counter() - t0)
                if cuda:
                    step_gib = (torch.cuda.max_memory_allocated() - before) / 2**30
                    res[k]["peak_step_gib"] = max(res[k]["peak_step_gib"], step_gib)
            except torch.cuda.OutOfMemoryError:
                res[k]["error"] = "CUDA OOM"
                gc.collect()
                torch.cuda.empty_cache()
    for v in res.values():
        v["s"] = statistics.median(v["times"]) if v["times"] else None
    return res


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def train_flops(model, rows, T):
    """Model FLOPs per SFT step of `rows` rows of T tokens each (image tokens included), one image per row:
    train.py's count (flop_terms / step_flops, the one sft.py logs): 6 per trained weight and token, 4 per
    frozen one a gradient passes, 2 per one it does not, plus attention's 12·L·H·Q·T (4 without a
    backward)."""
    terms = flop_terms(model)
    flops = step_flops(terms, model, tokens=rows * T, tokens_sq=rows * T * T, images=rows)
    v = model.config.vision
    P = (v.image_size // v.patch_size) ** 2
    formula = ("FLOPs/step (train.py step_flops) = images·(P+1)·{per_vision_token:,} + images·(P+1)²·"
               "{vision_attention:,} + images·P·{per_patch:,} + tokens·{per_token:,} + Σ_rows T²·"
               "{attention:,} (6 per trained weight, 4 per frozen one a gradient passes, 2 per one it does"
               " not; attention 12·L·H·Q·T, 4 without a backward); ".format(**terms)
               + f"images=B={rows}, P={P}, T={T}, tokens=B·T={rows * T}, Σ_rows T²={rows * T * T}")
    return flops, formula


def decode_bytes(model, batch, avg_len):
    """Bytes one decode step reads: the decoder's weights (LoRA included) and lm_head, plus the KV cache so
    far."""
    t = model.config.text
    weights = nbytes(p for n, p in model.named_parameters()
                     if n.startswith(("language_model.layers", "lm_head")))
    kv = (batch * avg_len * 2 * t.num_layers * t.num_kv_heads * t.head_dim
          * next(model.parameters()).element_size())
    return weights, kv


def hardware(device):
    info = dict(platform=platform.platform(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                load_avg_at_start=os.getloadavg())
    with contextlib.suppress(OSError):
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                           if line.startswith("model name"))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return info

# -----------------------------------------------------------------------------
# The four measurements, then the report


def per_side(res, fn, ours="ours"):
    """fn(side's result) for ours (or another of our keys, e.g. "compiled") and theirs; None where a side has
    no timing (OOM)."""
    return [res[k]["s"] and fn(res[k], k) for k in (ours, "theirs")]


def bench_training(ours, pm, S, args, env, table):
    """SFT step, then the DPO step on the same rows as rows/2 pairs, with the same AdamW on each side."""
    amp = env["amp"]
    cfg = S["config"]
    rows = S["rows"]
    T = S["config"].image_seq_length + S["text"]
    sides = dict(  # model, logits(batch), DPO reference context
        ours=(ours, lambda b: ours(b["input_ids"], b["pixel_values"], b["attention_mask"]),
              lambda: disable_lora(ours)),
        # use_cache=False: LLaVA's train.py turns the cache off too
        theirs=(pm, lambda b: pm(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                                 attention_mask=b["attention_mask"], use_cache=False).logits,
                pm.disable_adapter))
    opts = {k: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-5, fused=env["cuda"])
            for k, (m, _, _) in sides.items()}  # fused: one kernel for all tensors, CUDA only
    sft_b = make_batch(cfg, rows, S["text"], env["device"], S["dtype"], seed=1)
    dpo_b = pair_batch(cfg, rows // 2, S["text"], env["device"], S["dtype"], seed=2)
    ours.train()
    pm.train()
    sft = measure({k: lambda k=k: train_step(lambda: sft_objective(sides[k][1], sft_b, amp), opts[k])
                   for k in sides}, args.repeats, args.warmup, env["device"])
    dpo = measure({k: lambda k=k: train_step(lambda: dpo_objective(sides[k][1], sides[k][2], dpo_b, amp),
                                             opts[k])
                   for k in sides}, args.repeats, args.warmup, env["device"])
    # both models live in this process, so a side's peak "alone" = its weights + optimizer state + its
    # call's own peak
    state = {k: nbytes(m.parameters())
             + nbytes(t for s in opts[k].state.values() for t in s.values() if torch.is_tensor(t))
             for k, (m, _, _) in sides.items()}
    flops = env["flops"]
    peak = env["peak_flops"]
    sft_sec = f"sft {rows}x{T} tok"
    dpo_sec = f"dpo {rows // 2} pairs x{T} tok"
    table.add(sft_sec, "step ms", *per_side(sft, lambda r, k: 1e3 * r["s"]))
    table.add(sft_sec, "tokens/s", *per_side(sft, lambda r, k: rows * T / r["s"]))
    table.add(sft_sec, "MFU %" if peak else "TFLOP/s (model)",
              *per_side(sft, lambda r, k: flops / r["s"] / (peak / 100 if peak else 1e12)))
    table.add(dpo_sec, "step ms", *per_side(dpo, lambda r, k: 1e3 * r["s"]))
    table.add(dpo_sec, "dpo step / sft step",
              *per_side(dpo, lambda r, k: sft[k]["s"] and r["s"] / sft[k]["s"]))
    for sec, res in ((sft_sec, sft), (dpo_sec, dpo)) if env["cuda"] else ():
        table.add(sec, "peak GiB (alone, est.)",
                  *per_side(res, lambda r, k: r["peak_step_gib"] + state[k] / 2**30))
    return dict(sft=sft, dpo=dpo)


@torch.no_grad()
def bench_vision(ours, pm, S, args, env, table):
    cfg, n = S["config"], S["images"]
    pix = make_batch(cfg, n, 2, env["device"], S["dtype"], seed=4)["pixel_values"]
    llava = pm.base_model.model.model  # transformers' LlavaModel, LoRA layers injected in place
    with env["amp"]():
        r = measure(dict(ours=lambda: ours.embed_images(pix),
                         theirs=lambda: llava.get_image_features(
                             pixel_values=pix, vision_feature_layer=cfg.vision.feature_layer,
                             vision_feature_select_strategy="default")),
                    args.repeats, args.warmup, env["device"])
    table.add(f"vision+projector x{n} img", "images/s", *per_side(r, lambda x, k: n / x["s"]))
    return dict(vision=r)


@torch.no_grad()
def bench_sampling(ours, pm, S, args, env, table):
    """Batch 16 (and 64), LoRA unmerged, then merged. Both sides decode exactly `new` tokens. Runs last:
    merging ours in place also changes the frozen tensors pm shares, so pm is merged on a copy first and not
    used after."""
    cfg = S["config"]
    new = S["new"]
    results = {}
    P = cfg.image_seq_length + S["prompt"]  # [BOS, <image> x L, prompt text]
    ours.eval()
    pm.eval()
    for label in ("unmerged",) if args.no_merged else ("unmerged", "merged"):
        if label == "merged":
            # one more copy of the weights, then ours merges in place
            pm = copy.deepcopy(pm).merge_and_unload()
            merge_lora(ours)
        for B in S["batches"]:
            one = make_batch(cfg, 1, S["prompt"], env["device"], S["dtype"], seed=3)
            pb = {k: v.expand(B, *v.shape[1:]).contiguous() for k, v in one.items()}  # one prompt, B rows
            calls = dict(ours=lambda: ours_generate(ours, pb, new), theirs=lambda: hf_generate(pm, pb, new),
                         ours_1=lambda: ours_generate(ours, pb, 1), theirs_1=lambda: hf_generate(pm, pb, 1))
            if args.compile:  # the same generate, decode step under torch.compile; warm-up call compiles
                calls.update(compiled=lambda: ours_generate(ours, pb, new, compile=True),
                             compiled_1=lambda: ours_generate(ours, pb, 1, compile=True))
            with env["amp"]():
                r = measure(calls, args.repeats, args.warmup, env["device"])
            results[f"sample_b{B}_{label}"] = r
            # generate(compile=True) keeps its cache: free it before the next B
            vars(ours).pop("decode_cache", None)
            weights, kv = decode_bytes(ours, B, P + new / 2)
            scale, unit = (env["peak_bw"] / 100, "% of peak bw") if env["peak_bw"] else (1e9, "GB/s")
            # rows: ours, then compiled
            for mine, tag in [("ours", "")] + [("compiled", " compiled")] * args.compile:
                sec = f"sample b{B} {label} P{P}+{new}{tag}"
                table.add(sec, "new tokens/s", *per_side(r, lambda x, k: B * new / x["s"], mine))
                dts = [r[k]["s"] and r[k + "_1"]["s"] and r[k]["s"] - r[k + "_1"]["s"]
                       for k in (mine, "theirs")]
                # None: noise ate the difference
                steps = [(new - 1) / dt if dt and dt > 0 else None for dt in dts]
                table.add(sec, "decode steps/s", *steps)
                table.add(sec, f"weights {unit}", *(s and weights * s / scale for s in steps))
                table.add(sec, f"weights+KV {unit}", *(s and (weights + kv) * s / scale for s in steps))
    return results


class Table(list):
    def add(self, section, metric, ours, theirs):
        ratio = ours / theirs if ours is not None and theirs else None
        self.append(dict(section=section, metric=metric, ours=ours, theirs=theirs, ratio=ratio))

    def print(self):
        def fmt(x):  # n/a: OOM (see raw) or a noisy difference
            return "n/a" if x is None else f"{x:.4g}"
        print(f"{'section':<38} {'metric':<24} {'ours':>10} {'theirs':>10} {'ours/theirs':>12}")
        for r in self:
            print(f"{r['section']:<38} {r['metric']:<24} {fmt(r['ours']):>10} {fmt(r['theirs']):>10} "
                  f"{fmt(r['ratio']):>12}")
        print("(ratio = ours / theirs: above 1 is better for rates, below 1 for ms and GiB; "
              "medians of alternating calls)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per side, alternating")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per side first")
    p.add_argument("--quick", action="store_true",
                   help="8 new tokens, the first sampling batch only, 16 images")
    p.add_argument("--compile", action="store_true",
                   help="sampling: also time generate(compile=True), our decode step compiled "
                   "(CUDA graphs on a GPU)")
    p.add_argument("--grad_ckpt", action="store_true", help="our decoder recomputes each block in backward")
    p.add_argument("--hf_grad_ckpt", action="store_true",
                   help="transformers' gradient_checkpointing_enable()")
    p.add_argument("--no_merged", action="store_true",
                   help="skip sampling with merged LoRA (one more weight copy)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default torch's); 1 on a shared machine")
    p.add_argument("--out", default=None, help="JSON path (default out/bench_<shape>.json)")
    args = p.parse_args(argv)
    import peft
    import transformers
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    S = dict(SHAPES[args.shape])
    if args.quick:
        S.update(new=min(S["new"], 8), batches=S["batches"][:1], images=min(S["images"], 16))
    cuda = device.type == "cuda"
    hw = hardware(device)
    peak_flops, peak_bw = next(((f, b) for name, f, b in PEAKS if cuda and name in hw["gpu"]), (None, None))

    ours = build_ours(S["config"], device, S["dtype"])
    ours.language_model.gradient_checkpointing = args.grad_ckpt
    pm = build_theirs(ours, device, S["dtype"])
    if args.hf_grad_ckpt:
        pm.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    # fp32 on CPU: exact up to summation order
    tol = 1e-4 if S["dtype"] == torch.float32 and not cuda else 0.1
    parity = check_parity(ours, pm, make_batch(S["config"], S["rows"], S["text"], device, S["dtype"], seed=1),
                          amp, tol)
    flops, formula = train_flops(ours, S["rows"], S["config"].image_seq_length + S["text"])
    env = dict(device=device, cuda=cuda, amp=amp, flops=flops, peak_flops=peak_flops, peak_bw=peak_bw)
    table = Table()
    raw = {}
    raw.update(bench_training(ours, pm, S, args, env, table))
    gc.collect()  # optimizer state is gone: room for the KV caches
    if cuda:
        torch.cuda.empty_cache()
    raw.update(bench_vision(ours, pm, S, args, env, table))
    raw.update(bench_sampling(ours, pm, S, args, env, table))  # last: it merges our LoRA in place

    versions = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                    trl="not installed: TRL's DPO loss was not timed", python=platform.python_version())
    print(f"\n{args.shape} ({S['dtype']}) on {hw.get('gpu') or hw.get('cpu')}, "
          f"{hw['torch_threads']} threads, load average {hw['load_avg_at_start'][0]:.2f}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"parity before timing: {parity}\n{formula}\n  = {flops / 1e9:.4g} GFLOP/step; "
          f"peak FLOP/s: {peak_flops or 'unknown (CPU: achieved FLOP/s reported)'}")
    table.print()
    hw["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    settings = dict(vars(args), **{k: v for k, v in S.items() if k not in ("config", "dtype")},
                    dtype=str(S["dtype"]), model=repr(S["config"]), sampling=SAMPLING,
                    lora={k: v._asdict() for k, v in TARGETS.items()}, peft_target_modules=HF_TARGETS,
                    autocast_bf16=cuda, fused_adamw=cuda, peak_flops=peak_flops, peak_bytes_per_s=peak_bw)
    formulas = dict(mfu=formula, flops_per_step=flops,
                    bandwidth="bytes per decode step (decoder weights incl. LoRA + lm_head; "
                    "+ KV cache at the mean length) x decode steps/s; steps/s = (new - 1) / (t(new) - t(1))",
                    memory="CUDA: max_memory_allocated during the call - allocated before it + the side's "
                    "weights and optimizer state; CPU: n/a (process max RSS under hardware)")
    report = dict(hardware=hw, versions=versions, settings=settings, formulas=formulas, parity=parity,
                  table=table, raw=raw)
    out = args.out or os.path.join("out", f"bench_{args.shape}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
