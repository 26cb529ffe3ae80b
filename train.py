"""
The training loop both stages share, and what it stands on: torchrun, parameter groups, the schedule,
atomic and sharded checkpoints, FSDP2 and logging.

- setup_distributed: RANK / WORLD_SIZE / LOCAL_RANK read from torchrun's environment; DDP or FSDP2.
- param_groups: the authors' three AdamW groups (LLM, vision tower, projector; `llava_trainer.py`
  create_optimizer), and cosine_lr_factor, transformers' cosine schedule with linear warmup.
- checkpoints: atomic_save (one file, DDP), save_sharded / load_sharded (torch.distributed.checkpoint, FSDP2);
  shard_model and gather_model put a Llava into FSDP2 units and back.
- fit: gradient accumulation over a global batch dealt round-robin to the ranks, one mean loss over the whole
  global batch, gradient clipping, exact and kill-safe resume (weights, optimizer, RNG states, step; checked
  against the fingerprint of the inputs and settings by start_run, which jobs call before loading weights).
- check_batch: batch settings that cannot train stop with one line before any weight loads.
- flop_terms / step_flops / peak_flops: a step's model FLOPs (6 per trained weight and token, 4 per frozen one
  that a gradient passes, 2 otherwise, plus attention's 12·L·H·Q·T), for fit's MFU on GPU, beside tok/s.
- memory_plan / format_plan / plan_row: GB per GPU of weights, gradients, AdamW state, activations and
  stage 2's KV cache, from the parameter counts (of a model on the meta device: `sft.py --plan`).

Stage 1 (sft.py) and stage 2 (dpo.py) each pass their own `prepare` (encode a micro batch) and `micro_loss`.
"""
import json
import math
import os
import random
import re
import time
import warnings
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lora import LoRASpec, add_lora, lora_layers, param_report
from model import Llava
from runs import (UsageError, at_least, cut_log, fail, first_line, open_run, remove_dir, replace_dir,
                  run_fingerprint, unlock_out_dir, write_fingerprint)

# -----------------------------------------------------------------------------
# torchrun


def setup_distributed(shard="ddp"):
    """Rank, world size and device from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    `shard="fsdp"` starts a process group even for a single process (FSDP's device mesh and the sharded
    checkpoints need one); without torchrun it lives in an in-memory store.
    """
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # TF32 for the fp32 matmuls autocast leaves (the authors' --tf32)
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    if (world > 1 or shard == "fsdp") and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if shard == "fsdp":
            # --cpu_offload leaves the gradient shards in CPU memory, and the clipping norm is summed over
            # them: gloo carries CPU tensors, NCCL the rest
            backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
            store = None if "MASTER_ADDR" in os.environ else dist.HashStore()
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
        else:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)

# -----------------------------------------------------------------------------
# Optimisation: parameter groups, schedule, the token loss


def param_groups(model, cfg):
    """AdamW groups of the trainable weights: LLM (cfg.lr), vision tower (cfg.vision_lr), projector
    (cfg.projector_lr), as the authors' create_optimizer (llava_trainer.py) splits them."""
    # the vision blocks after the feature layer (and the post-layernorm) never run in LLaVA: freeze them so
    # that no trainable weight goes without a gradient (DDP would wait for it forever)
    v = model.config.vision
    n_run = v.num_layers + 1 + v.feature_layer if v.feature_layer < 0 else v.feature_layer
    for n, p in model.vision_tower.named_parameters():
        unused_block = n.startswith("encoder.layers.") and int(n.split(".")[2]) >= n_run
        if n.startswith("post_layernorm.") or unused_block:
            p.requires_grad_(False)
    groups = {"llm": [], "vision": [], "projector": []}
    for n, p in model.named_parameters():
        if p.requires_grad:
            group = ("vision" if n.startswith("vision_tower.") else
                     "projector" if n.startswith("projector.") else "llm")
            groups[group].append(p)
    lrs = {"llm": cfg.lr, "vision": cfg.vision_lr, "projector": cfg.projector_lr}
    print0(param_report(model))
    return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


def cosine_lr_factor(step, total, warmup):
    """Linear warmup to 1, then cosine decay to 0 (transformers' get_cosine_schedule_with_warmup)."""
    if step < warmup:
        # HF uses step/warmup, which makes step 0 a no-op; this starts moving at once
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def token_nll(logits, labels):
    """Next-token cross-entropy of every position: logits (B, T, V), labels (B, T) -> (B, T - 1), where
    position t predicts token t + 1 and a label of -100 gives 0. Without materialising a full fp32
    log-softmax."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                          reduction="none")
    return nll.view(labels.shape[0], labels.shape[1] - 1)

# -----------------------------------------------------------------------------
# Model FLOPs and MFU (nanoGPT model.py estimate_mfu, PaLM appendix B: 6N + 12·L·H·Q·T per token)

# dense bf16 tensor-core peaks from NVIDIA's datasheets; more specific names first (matched as substrings)
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12,
              "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12}


def peak_flops(device):
    """bf16 peak of a CUDA device from the table above, or None (CPU, or a name the table lacks)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def matmul_weights(modules):
    """(trained, frozen) counts of the weights that multiply activations: every parameter of two or more
    dimensions (Linear, Conv2d, LoRA's A and B) outside embedding tables, which are looked up, not multiplied.
    A tied lm_head counts here as the matmul it is."""
    counts = [0, 0]
    for module in modules:
        for m in module.modules():
            if not isinstance(m, nn.Embedding):
                for p in m.parameters(recurse=False):
                    counts[not p.requires_grad] += p.numel() if p.dim() >= 2 else 0
    return tuple(counts)


def flop_terms(model):
    """Per-unit FLOP coefficients of one training step, vision side then text side, in the order the gradient
    flows back. A trained weight costs 6 FLOPs per token that passes it (forward 2, input gradient 2, weight
    gradient 2); a frozen one 4 if a gradient must pass it on to a trained weight before it (the LLM in every
    mode: the projector trains), else 2 (forward only: a frozen tower that no LoRA reaches). Attention's two
    matmuls cost 12·L·H·Q per token per key, 4 without a backward. The cluster projector is counted as if its
    weights met each patch once (an estimate)."""
    v, t = model.config.vision, model.config.text
    n_run = v.num_layers + 1 + v.feature_layer if v.feature_layer < 0 else v.feature_layer
    tower = model.vision_tower
    vis_tr, vis_fr = matmul_weights([tower.embeddings, *tower.encoder.layers[:n_run]])
    proj_tr, proj_fr = matmul_weights([model.projector])
    llm_tr, llm_fr = matmul_weights([model.language_model, model.lm_head])
    vis_back = vis_tr > 0
    head_dim = v.hidden_size // v.num_heads
    return {"per_vision_token": 6 * vis_tr + (4 if vis_back else 2) * vis_fr,  # image patches + CLS
            "vision_attention": (12 if vis_back else 4) * n_run * v.num_heads * head_dim,  # x (P + 1)²
            "per_patch": 6 * proj_tr + (4 if vis_back else 2) * proj_fr,  # the projector, on the P patches
            "per_token": 6 * llm_tr + 4 * llm_fr,  # every real token of the LLM's sequence, image ones too
            "attention": 12 * t.num_layers * t.num_heads * t.head_dim}  # x Σ_rows T² (causal not halved)


def step_flops(terms, model, tokens, tokens_sq, images):
    """Model FLOPs of a step of `tokens` real LLM tokens whose row lengths squared sum to `tokens_sq`, with
    `images` images."""
    v = model.config.vision
    patches = (v.image_size // v.patch_size) ** 2
    per_image = ((patches + 1) * terms["per_vision_token"] + (patches + 1) ** 2 * terms["vision_attention"]
                 + patches * terms["per_patch"])
    vision = images * per_image
    return vision + tokens * terms["per_token"] + tokens_sq * terms["attention"]

# -----------------------------------------------------------------------------
# The memory plan: what one GPU holds, from the parameter counts (a model on the meta device will do)


def memory_plan(model, cfg, world, rows=None):
    """GB (10^9 bytes) per GPU of the training state and activations, for `cfg.shard` over `world` ranks.
    Call it once the trainable set is marked (requires_grad); a DTensor's numel is the global one. `rows`:
    sequences a micro batch (cfg.micro_batch; DPO's pairs are two each)."""
    t, gb = model.config.text, 1e9
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    shards = world if cfg.shard == "fsdp" else 1  # FSDP2 shards weights, gradients and AdamW state alike
    plan = {"weights": 4 * total / shards / gb,  # fp32, as the trainer loads them (frozen ones too)
            "gradients": 4 * trained / shards / gb,  # fp32, one per trained weight
            "optimizer": 8 * trained / shards / gb}  # AdamW: exp_avg and exp_avg_sq, fp32
    if cfg.shard == "fsdp":
        # on GPU each unit runs on a bf16 all-gathered copy: the root (embeddings, projector, head) stays
        # gathered through the step; the running unit and the one prefetched beside it are the largest
        units = [*model.language_model.layers, model.vision_tower]
        unit = max(sum(p.numel() for p in u.parameters()) for u in units)
        root = total - sum(p.numel() for u in units for p in u.parameters())
        plan["gathered bf16"] = 2 * (root + 2 * unit) / gb
    # Activations of the decoder for one micro batch, bf16 (2 bytes a value). Korthikanti et al. 2022
    # ("Reducing Activation Recomputation in Large Transformer Models", §4.1) store per layer
    # b·T·h·34 + 5·b·heads·T² bytes; the T² term is the attention matrix, its softmax and dropout mask,
    # which SDPA's flash / memory-efficient kernels never keep (sft_loss passes no mask, so flash applies):
    # it is dropped. Their 34 assumes a 4h MLP; LLaMA's SwiGLU (11008 = 2.7h, three matrices) is close.
    b, T, h = rows or cfg.micro_batch, cfg.max_length, t.hidden_size
    per_layer = b * T * h * 34
    if cfg.grad_ckpt:  # only each block's input is kept, then one block is recomputed at a time in backward
        act = t.num_layers * b * T * h * 2 + per_layer
    else:
        act = t.num_layers * per_layer
    plan["activations"] = act / gb
    plan["logits"] = b * T * t.vocab_size * 4 / gb  # fp32 logits for the cross-entropy (and its gradient)
    if all(hasattr(cfg, k) for k in ("gen_batch", "n_questions", "describe_tokens", "q_max_tokens")):
        # stage-2 sampling: K and V, bf16, per layer, kv head, head dim and token, over rows × (prompt + new):
        # a question's prompt is the image and its description, an answer's the image and its question.
        # The unchunked worst case; --gen_tokens (or half the free memory, dpo.gen_token_budget) chunks it
        new = max(cfg.describe_tokens + cfg.q_max_tokens, cfg.q_max_tokens + cfg.a_max_tokens)
        tokens = cfg.gen_batch * cfg.n_questions * (model.config.image_seq_length + new)
        tokens = min(tokens, cfg.gen_tokens) if getattr(cfg, "gen_tokens", 0) > 0 else tokens
        plan["kv cache (generation)"] = 2 * t.num_layers * t.num_kv_heads * t.head_dim * 2 * tokens / gb
    return {"params": (total, trained), "shard": f"{cfg.shard} x {world}", **plan}


def format_plan(plan):
    """The plan as a short table, GB per GPU; the training total leaves out generation's KV cache."""
    total, trained = plan["params"]
    lines = [f"memory plan, GB per GPU ({plan['shard']}; {trained / 1e6:,.0f}M trained, "
             f"{(total - trained) / 1e6:,.0f}M frozen):"]
    rows = {k: v for k, v in plan.items() if k not in ("params", "shard")}
    lines += [f"  {k:<22}{v:9.2f}" for k, v in rows.items()]
    train_total = sum(v for k, v in rows.items() if not k.startswith("kv"))
    return "\n".join(lines + [f"  {'training total':<22}{train_total:9.2f}"])


def plan_row(plan, name):
    """The plan as a row of the README's memory table (markdown): GB per GPU, activations with the logits."""
    get = plan.get
    cells = [get("weights"), get("gradients"), get("optimizer"), get("gathered bf16", 0.0),
             get("activations") + get("logits")]
    cells = [f"{c:.2f}" for c in cells + [sum(cells)]]
    return f"| {name} | {plan['shard']} | " + " | ".join(cells) + " | to be measured on GPU |"

# -----------------------------------------------------------------------------
# Checkpoints: atomic single-file ones, and sharded ones (FSDP2)


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def shard_model(model, cfg, device, groups):
    """`--shard=fsdp`: shard `model` in place with FSDP2 and return the AdamW `groups` over its new parameters
    (FSDP2 replaces each weight by a DTensor Parameter holding this rank's shard). `--shard=ddp`: `groups` as
    given.

    One FSDP unit per decoder block, one for the vision tower, and the root for the rest: a unit's full
    weights exist only while it runs forward or backward (all-gathered, then freed), and its gradients are
    reduce-scattered to their shards. Frozen weights (a LoRA run's base) are sharded too: FSDP2 keeps
    trainable and frozen DTensors side by side in one unit.
    """
    if cfg.shard not in ("ddp", "fsdp"):
        raise ValueError(f"--shard must be ddp or fsdp, not {cfg.shard!r}")
    if cfg.shard == "ddp":
        if cfg.cpu_offload:
            raise ValueError("--cpu_offload needs --shard=fsdp")
        return groups
    # imported here, as in the other FSDP helpers: DTensor costs a second of imports that only fsdp needs
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    device = torch.device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # GPU: bf16 weights in forward and backward, gradients reduced in fp32, AdamW updating fp32 shards.
    # CPU: fp32 throughout, so that a sharded run equals an unsharded one
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    # pinned host memory speeds the copies to the GPU; without a GPU there is none to pin (nor offloading)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cfg.cpu_offload else OffloadPolicy()
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    # the tower returns x[:, 1:], a view that FSDP2 warns about; nothing writes to it in place (Llava.embed
    # copies the features into a clone of the token embeddings)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    name = {id(p): n for n, p in model.named_parameters()}
    for block in model.language_model.layers:
        fully_shard(block, **kw)
    fully_shard(model.vision_tower, **kw)
    fully_shard(model, **kw)  # the root: token embeddings, projector, final norm, lm_head
    params = dict(model.named_parameters())
    return [{**g, "params": [params[name[id(p)]] for p in g["params"]]} for g in groups]


def gather_model(model):
    """A trained FSDP model as a plain Llava (LoRA layers included) in rank 0's CPU memory, for the exports
    and the evaluation after training; None on the other ranks. Every rank must call it: the weights are
    all-gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):  # the module tree without memory; the gathered tensors are assigned into it
        plain = Llava(model.config)
        # the same layers with the same specs: each full name, escaped, is a pattern matching only itself
        specs = {re.escape(n): LoRASpec(m.r, m.alpha, m.dropout_p) for n, m in lora_layers(model).items()}
        add_lora(plain, specs)
    plain.load_state_dict(state, assign=True)
    if model.config.text.tie_word_embeddings:  # assign gave the two names two tensors
        plain.lm_head.weight = plain.language_model.embed_tokens.weight
    trains = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in plain.named_parameters():
        p.requires_grad_(trains[n])
    plain.language_model.gradient_checkpointing = model.language_model.gradient_checkpointing
    plain.template, plain.name_or_path = (getattr(model, k, None) for k in ("template", "name_or_path"))
    return plain


def save_sharded(model, opt, path, meta, rank):
    """FSDP checkpoint (torch.distributed.checkpoint): every rank writes its shards of what trains and of the
    optimizer state, with the metadata that lets any number of ranks read them back. Written to `path`.tmp,
    where rank 0 adds meta["fingerprint"] and, last, meta.pt (the mark of a complete directory), then swaps it
    in (runs.replace_dir): a kill at any instant leaves a complete checkpoint that fit's start recovers. On
    several nodes, out_dir must be shared."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    tmp = path + ".tmp"
    if rank == 0 and os.path.exists(tmp):
        remove_dir(tmp, "meta.pt")  # a killed save's leftovers
    dist.barrier()
    model_state, optim_state = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    # returns once all ranks wrote
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    if rank == 0:
        write_fingerprint(tmp, meta["fingerprint"])
        atomic_save(meta, os.path.join(tmp, "meta.pt"))
        replace_dir(tmp, path, "meta.pt")
    dist.barrier()


def load_sharded(model, opt, path, rank):
    """Resume from `save_sharded`'s directory, whatever world size wrote it (each rank reads the parts of the
    saved shards that overlap its own); returns the step, or 0 if there is no checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    if not os.path.exists(path):  # a half-done swap was recovered at fit's start (runs.recover_dir)
        return 0
    if not os.path.exists(os.path.join(path, "meta.pt")):
        fail(f"--resume: {path} is incomplete (no meta.pt); pass --overwrite to start afresh")
    model_state, optim_state = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(state, checkpoint_id=path)  # fails on any key the checkpoint lacks
    except (Exception, dcp.CheckpointException) as e:  # a truncated .distcp (the latter: a BaseException)
        fail(f"--resume: {path} cannot be read ({first_line(e)}); pass --overwrite to start afresh")
    # not strict: the frozen weights are not in the checkpoint, they stay as loaded
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    meta = torch.load(os.path.join(path, "meta.pt"), weights_only=False)
    set_rng_state(meta["rng"][rank] if rank < len(meta["rng"]) else meta["rng"][0])
    print0(f"resumed from {path} at step {meta['step']} (saved by {len(meta['rng'])} ranks)")
    return meta["step"]

# -----------------------------------------------------------------------------
# The loop


class Logger:
    """Rank-0 progress lines with tokens/s and ETA, and the same numbers as JSONL in the output directory."""

    def __init__(self, out_dir, total_steps, start_step):
        self.total = total_steps
        self.start = start_step
        self.t0 = time.time()
        self.path = os.path.join(out_dir, "log.jsonl")
        if int(os.environ.get("RANK", 0)) == 0:  # a resumed run logs the steps after its checkpoint again
            cut_log(self.path, start_step)

    def log(self, step, **m):
        if int(os.environ.get("RANK", 0)) != 0:
            return
        eta = (time.time() - self.t0) / (step + 1 - self.start) * (self.total - step - 1)
        metrics = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())
        print(f"step {step + 1}/{self.total} {metrics} eta {eta / 60:.1f}m", flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step + 1, **m}) + "\n")


def summarize(sums):
    """Metric sums -> means: '<name>_sum' / '<name>_n' pairs become '<name>' (left out where n is 0, e.g. the
    question loss when no token is a question)."""
    return {k[:-4]: v / sums[k[:-4] + "_n"] for k, v in sums.items()
            if k.endswith("_sum") and sums.get(k[:-4] + "_n")}


def autocast(cfg, device):
    """The precision of every training forward, the DPO reference's included (live or precomputed): bf16
    autocast on CUDA (the authors' --bf16), none on CPU; `cfg.amp="bf16"` takes the GPU's path on CPU too
    (for the tests), "fp32" turns it off on CUDA."""
    amp = getattr(cfg, "amp", "")
    if amp not in ("", "bf16", "fp32"):
        raise ValueError(f"--amp must be bf16 or fp32 (or empty: bf16 on CUDA, fp32 on CPU), not {amp!r}")
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=amp == "bf16" or (amp == "" and kind == "cuda"))


def start_run(cfg, n_examples, out_dir, world=1, rank=0, marked=(), inputs=None):
    """fit's first act, for a job to call before any weight loads: take out_dir and check its checkpoint
    against these inputs and settings (runs.open_run; a refusal stops every rank with rank 0's one line).
    Returns fit's `run`: (checkpoint path, fingerprint)."""
    fsdp = cfg.shard == "fsdp"
    ckpt_path = os.path.join(out_dir, "checkpoint" if fsdp else "checkpoint.pt")
    other = os.path.join(out_dir, "checkpoint.pt" if fsdp else "checkpoint")
    fp = run_fingerprint(cfg, n_examples, schedule(cfg, n_examples, world)[1], inputs)
    box = [None]
    try:
        if rank == 0:
            open_run(cfg, out_dir, fp, ckpt_path, other, marked)
    except UsageError as e:
        box = [str(e)]
        unlock_out_dir(out_dir)  # a refused run holds nothing (a lock held by another run stays)
    if dist.is_initialized():  # every rank stops with rank 0's message, or none does
        dist.broadcast_object_list(box)
    if box[0]:
        fail(box[0])
    return ckpt_path, fp


def fit(cfg, model, n_examples, prepare, micro_loss, groups, out_dir, world=1, rank=0, device="cpu",
        marked=(), inputs=None, run=None):
    """The training loop both stages share.

    Each step takes `global_batch` example indices (a seeded permutation per epoch, so the data position
    is just the step number), splits them into micro batches dealt round-robin to the ranks, and
    accumulates gradients. `prepare(indices, epoch)` encodes one micro batch and says how many items it
    normalises over (supervised tokens for SFT, pairs for DPO); counts are summed over the whole global
    batch first, so the loss is one mean over the global batch however it is split across processes.
    `micro_loss(model, batch)` returns (summed loss, {metric: summed value}).

    Under `--shard=fsdp` the model comes sharded (`shard_model`), checkpoints are sharded DCP directories that
    any world size resumes, and the return value is the trained model gathered on rank 0 (`gather_model`;
    None elsewhere).

    Kill-safe: `--resume` continues bit for bit, logs each step once, refuses changed inputs (start_run;
    `marked`: keys the synthetic default set; `inputs`: more identities, e.g. a hash of DPO's pairs). `run`:
    what start_run returned, when the job called it before loading the model."""
    ckpt_path, fp = run or start_run(cfg, n_examples, out_dir, world, rank, marked, inputs)
    try:
        return _fit(cfg, model, n_examples, prepare, micro_loss, groups, ckpt_path, fp, world, rank, device)
    except BaseException:
        if rank == 0:
            unlock_out_dir(out_dir)  # the run is over: a rerun in this process's lifetime may take out_dir
        raise


def check_batch(cfg, world, n_examples=None):
    """Stop with one line where the batch settings cannot train: jobs call it before any weight loads. The
    global batch splits into micro batches over the ranks; the data fills one global batch at least."""
    at_least(micro_batch=cfg.micro_batch, global_batch=cfg.global_batch)
    if cfg.global_batch % (cfg.micro_batch * world):
        fail(f"--global_batch={cfg.global_batch} is not divisible by --micro_batch={cfg.micro_batch} x world "
             f"size {world}: accumulation is derived")
    if cfg.epochs <= 0:
        fail(f"--epochs={cfg.epochs}: must be above 0 (--max_steps stops earlier)")
    if n_examples is not None and n_examples < cfg.global_batch:
        fail(f"{n_examples} examples are fewer than one global batch (--global_batch={cfg.global_batch})")


def schedule(cfg, n_examples, world):
    """(steps per epoch, total steps, warmup steps), after checking the batch settings (check_batch)."""
    check_batch(cfg, world, n_examples)
    steps_per_epoch = n_examples // cfg.global_batch
    total = math.ceil(steps_per_epoch * cfg.epochs)
    if cfg.max_steps > 0:
        total = min(total, cfg.max_steps)
    return steps_per_epoch, total, math.ceil(cfg.warmup_ratio * total)


def _fit(cfg, model, n_examples, prepare, micro_loss, groups, ckpt_path, fp, world, rank, device):
    """fit once out_dir is checked: the optimizer, the resume, the steps."""
    fsdp = cfg.shard == "fsdp"
    micro_per_step = cfg.global_batch // cfg.micro_batch
    steps_per_epoch, total, warmup = schedule(cfg, n_examples, world)
    # fused kernels on GPU, multi-tensor ops on CPU (where --cpu_offload keeps the weights AdamW updates)
    cuda = torch.device(device).type == "cuda" and not cfg.cpu_offload
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, fused=cuda,
                            foreach=not cuda)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    ddp = model
    if world > 1 and not fsdp:
        device_ids = [device] if device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    step = 0
    if cfg.resume and fsdp:
        step = load_sharded(model, opt, ckpt_path, rank)
    elif cfg.resume and os.path.exists(ckpt_path):
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        except Exception as e:  # truncated (a full disk, a torn copy): torch's zip error names no file
            fail(f"--resume: {ckpt_path} cannot be read ({first_line(e)}); pass --overwrite to start afresh")
        model.load_state_dict(ck["trainable"], strict=False)  # what trains; the rest stays as loaded
        opt.load_state_dict(ck["optimizer"])
        set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        step = ck["step"]
        print0(f"resumed from {ckpt_path} at step {step}")
    logger = Logger(os.path.dirname(ckpt_path), total, step)
    peak = peak_flops(device)
    terms = flop_terms(model)
    print0("model FLOPs per step = images·(P+1)·{per_vision_token:.3g} + images·(P+1)²·{vision_attention:.3g}"
           " + images·P·{per_patch:.3g} + tokens·{per_token:.3g} + Σ_rows T²·{attention:.3g} (6 per trained"
           " weight, 4 per frozen one that a gradient passes, 2 per one it does not; attention 12·L·H·Q·T;"
           " the DPO reference's forward not counted); ".format(**terms)
           + (f"mfu against a peak of {peak:.3g} FLOP/s" if peak else "no mfu (no GPU, or not in the table)"))
    model.train()
    amp = autocast(cfg, device)
    while step < total:
        epoch, pos = divmod(step, steps_per_epoch)
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        idx = order[pos * cfg.global_batch:(pos + 1) * cfg.global_batch]
        micro = [idx[i * cfg.micro_batch:(i + 1) * cfg.micro_batch] for i in range(micro_per_step)]
        chunks = micro[rank::world]  # dealt round-robin to the ranks
        t0 = time.time()  # the whole step: data and a live DPO reference (prepare), forward, backward, AdamW
        with amp:  # the DPO reference's log-probs: the policy's precision
            batches = [prepare(c, epoch) for c in chunks]
        count = torch.tensor(float(sum(b["count"] for b in batches)), device=device)
        if world > 1:
            dist.all_reduce(count)
        factor = cosine_lr_factor(step, total, warmup)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        sums = {}
        tokens_sq = images = 0
        for j, b in enumerate(batches):
            # DDP all-reduces gradients on every backward unless told not to: sync only on the last micro
            # batch. FSDP reduce-scatters on every backward: skipping that would hold full unsharded
            # gradients until the last micro batch, the memory that sharding saves
            if not fsdp:
                ddp.require_backward_grad_sync = j == len(batches) - 1
            with amp:
                loss_sum, metrics = micro_loss(ddp, b)
            # DDP and FSDP average gradients over ranks; the world factor turns it back into the global sum
            (loss_sum * world / count).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            # for the MFU: each row's real length squared (attention; read once per step), the images
            rows = b["attention_mask"].sum(1)  # (B,) integers: exact
            tokens_sq = tokens_sq + (rows * rows).sum()
            images += 0 if b["pixel_values"] is None else len(b["pixel_values"])
        sums.update(tokens_sq=float(tokens_sq), images=float(images))
        # with FSDP the gradients are DTensor shards: the norm is a DTensor, the full model's norm
        norm = torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if world > 1:
            keys = sorted(sums)
            t = torch.tensor([sums[k] for k in keys], device=device)
            dist.all_reduce(t)
            sums = dict(zip(keys, t.tolist()))
        if step % cfg.log_every == 0 or step == total:
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()  # kernels may still be queued: wait before reading the clock
            dt = time.time() - t0
            speed = {"tok_s": sums.get("tokens", 0) / dt}
            if peak:
                flops = step_flops(terms, model, sums.get("tokens", 0), sums["tokens_sq"], sums["images"])
                speed["mfu"] = flops / (dt * world * peak)
            logger.log(step - 1, **summarize(sums), lr=opt.param_groups[0]["lr"], grad_norm=float(norm),
                       **speed)
        if step % cfg.save_every == 0 or step == total:
            rngs = [rng_state()] * world  # several ranks: each one's own, gathered
            if world > 1:
                dist.all_gather_object(rngs, rng_state())
            if fsdp:
                meta = {"step": step, "rng": rngs, "config": asdict(cfg), "fingerprint": fp}
                save_sharded(model, opt, ckpt_path, meta, rank)
            elif rank == 0:
                atomic_save({"trainable": trainable_state(model), "optimizer": opt.state_dict(), "step": step,
                             "rng": rngs, "config": asdict(cfg)}, ckpt_path)
    return gather_model(model) if fsdp else model
