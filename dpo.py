"""
Stage 2 of STLLaVA-Med: preference revelation (STLLaVA-Med §2, stage 2).

1. generate: the stage-1 model describes each image, then speaks as the questioner (the conversation ends in
   "...</s>VUSER:") and samples questions; each question is answered twice in a fresh single-turn prompt
   (heliossun/STLLaVA-Med `llava/eval/visual_sq.py`, `llava/eval/model_collectA.py`).
2. judge: an expert (GPT-4o over plain HTTP, any OpenAI-compatible server, or the synthetic oracle) scores
   both answers; the higher-scored is chosen, the lower rejected (judge.py).
3. train: DPO (Eq. 1 of STLLaVA-Med) of a fresh LoRA policy on the stage-1 model against the frozen stage-1
   model as the reference (`base_dpo_trainer.py`, `dpo_finetune.sh`).

    python dpo.py                                   # all three on the synthetic default, oracle judge
    python dpo.py generate --model=out/sft/merged --data=instruct.json --image_dir=images/
    torchrun --standalone --nproc_per_node=8 dpo.py generate ...   # each rank samples its share of the images
    OPENAI_API_KEY=... python dpo.py judge --data=instruct.json --image_dir=images/ \
        --base_url=https://api.openai.com/v1 --judge_model=gpt-4o
    torchrun --standalone --nproc_per_node=8 dpo.py train --model=out/sft/merged --data=... --shard=fsdp

Without --data, the synthetic data and the oracle judge. Every step resumes where a killed run stopped (the
same inputs; others are refused), and the judge never pays for a verdict twice.
"""
import glob
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

import data as D
import evaluate as E
import judge as J
import report as R
import synth as S
from checkpoint import from_pretrained, save_pretrained, template_of
from runs import (append_jsonl, check_reuse, content_hash, fail, fingerprint, fingerprint_path, identity,
                  lock_out_dir, parse_config, read_records, remove_output, replace_text, run_main,
                  write_config, write_fingerprint)
from lora import add_lora, disable_lora, lora_targets, mark_trainable, merge_lora, save_adapter
from train import (atomic_save, autocast, check_batch, fit, format_plan, memory_plan, param_groups, print0,
                   setup_distributed, shard_model, start_run, token_nll)


@dataclass
class Config:
    model: str = ""  # the merged stage-1 model; "" = out/sft/merged, what `python sft.py` writes
    data: str = ""  # LLaVA conversation JSON whose images are used; "" = the synthetic default (oracle judge)
    image_dir: str = ""  # the folder --data's image paths are relative to; "" = the JSON's own folder
    out_dir: str = "out/dpo"  # generations, pairs, judge cache, checkpoint, final/ and merged/ go here
    # generation (visual_sq.py, model_collectA.py)
    n_images: int = 10000  # images to ask about (visual_sq.py takes os.listdir(image_folder)[10000:20000])
    n_questions: int = 5  # questions sampled per image (visual_sq.py's n_shot)
    describe_tokens: int = 1024  # new tokens of the image description that precedes the questions
    q_temperature: float = 1.2  # question sampling temperature (visual_sq.py)
    q_top_k: int = 300  # question sampling top-k
    q_top_p: float = 0.95  # question sampling top-p
    q_max_tokens: int = 300  # new tokens a question may take
    a_temperature: float = 1.2  # answer sampling (the paper: "temperature 1.2, TopK=100, TopP=0.95")
    a_top_k: int = 100  # answer sampling top-k
    a_top_p: float = 0.95  # answer sampling top-p
    a_max_tokens: int = 1024  # new tokens an answer may take
    answer_seeds: str = "40,42"  # one seed per answer (model_collectA.py: set_seed(40), then set_seed(42))
    gen_batch: int = 16  # images a batch (each written whole, so a killed run loses at most one)
    gen_tokens: int = 0  # KV-cache tokens a generation call may hold; 0 = sized from free memory
    # the answers' prompt (and DPO's): "" = the model's own (config.json conv_template, e.g. vicuna_v1 as
    # model_collectA.py's llava_v1, mistral_instruct for LLaVA-Med v1.5)
    template: Literal[("", *D.TEMPLATES)] = ""
    # judge (judge.py)
    judge: Literal["gpt", "oracle"] = "gpt"  # gpt: an OpenAI-compatible server; oracle: the synthetic facts
    base_url: str = "https://api.openai.com/v1"  # the judge server's OpenAI-compatible API root
    judge_model: str = "gpt-4o"  # the model name sent to the server
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the server's key
    workers: int = 4  # concurrent requests
    timeout: float = 60.0  # seconds for a whole request
    max_tries: int = 6  # HTTP tries per call
    retry_failed: bool = False  # ask again for verdicts that failed in an earlier run
    swap: bool = False  # also judge with the answers swapped and average (against position bias)
    price_in: float = 2.5  # USD per million prompt tokens, gpt-4o's list price: set both for another server
    price_out: float = 10.0  # USD per million completion tokens
    # DPO (base_dpo_trainer.py, dpo_finetune.sh)
    beta: float = 0.1  # DPO's KL strength (the trainer's default; train_dpo.py does not pass one)
    lr: float = 5e-6  # peak learning rate of the LLM LoRA
    vision_lr: float = 2e-5  # the vision-tower LoRA's (dpo_finetune.sh --vision_tower_lr; the paper: 2e-6)
    projector_lr: float = 2e-5  # the projector's (--mm_projector_lr)
    lora_r: int = 128  # LLM LoRA rank
    lora_alpha: int = 256  # LLM LoRA scale: the update is B A x alpha / r
    lora_dropout: float = 0.05  # dropout on the LLM LoRA's input
    vit_lora_r: int = 32  # vision-tower LoRA rank
    vit_lora_alpha: int = 64  # vision-tower LoRA scale
    vit_lora_dropout: float = 0.1  # dropout on the vision-tower LoRA's input (0.2 in stage 1)
    weight_decay: float = 0.0  # AdamW's, on every group
    warmup_ratio: float = 0.03  # share of the steps the learning rate warms up linearly, then cosine to 0
    grad_clip: float = 1.0  # clip the global gradient norm to this
    # pairs an optimizer step: per-device 4 x grad-accum 16 per GPU in dpo_finetune.sh (the paper: 256 on 4)
    global_batch: int = 64
    micro_batch: int = 4  # pairs a forward pass, per process (chosen and rejected: twice the rows)
    epochs: float = 1  # passes over the pairs
    max_steps: int = -1  # stop after this many optimizer steps (smoke runs, tests); -1 = the epochs' count
    max_length: int = 2048  # tokens a prompt and answer keep, image tokens included; the rest is cut
    precompute_ref: bool = False  # reference log-probs computed once and stored with the pairs
    # "" = bf16 autocast on CUDA (dpo_finetune.sh --bf16), fp32 on CPU; bf16 = the GPU's path on CPU too;
    # the reference always runs under the policy's (train.autocast)
    amp: Literal["", "bf16", "fp32"] = ""
    grad_ckpt: bool = True  # recompute each decoder block in backward, as the authors train
    seed: int = 0  # sampling, LoRA initialisation, pair order
    # ddp: every rank holds the whole model; fsdp: FSDP2 shards the policy, and with it the reference (the
    # same weights); train.shard_model
    shard: Literal["ddp", "fsdp"] = "ddp"
    cpu_offload: bool = False  # fsdp only: the shards and the optimizer state live in CPU memory
    save_every: int = 50  # steps between checkpoints (out_dir/checkpoint*)
    resume: bool = False  # continue training from out_dir's checkpoint, bit for bit; changed settings refused
    log_every: int = 5  # steps between printed log lines (log.jsonl has every step)
    overwrite: bool = False  # the steps that run start afresh, whatever out_dir holds from other inputs


# The synthetic default: the tiny model, the oracle judge and CPU-sized settings (each overridable).
# Questions are sampled cooler than the paper's (synth.QUESTION_SAMPLING says why), answers as the paper's.
# At lr 5e-5 one seed of three lost 7.8 points of closed accuracy (81.2 -> 73.5); at 2e-5 none lost any.
SYNTH_OVERRIDES = dict(n_images=800, n_questions=5, describe_tokens=48,
                       **{f"q_{k}": v for k, v in S.QUESTION_SAMPLING.items()}, q_max_tokens=24,
                       a_max_tokens=24, gen_batch=200,
                       lr=2e-5, vision_lr=2e-5, projector_lr=2e-5, global_batch=32, micro_batch=32, epochs=2,
                       log_every=5, grad_ckpt=False)  # the tiny model fits: recomputing only costs time

# -----------------------------------------------------------------------------
# 1. generate: self-asked questions and two sampled answers each


def is_wellformed(q, max_chars=300):
    """A usable question: non-empty, ends with '?', not runaway length (the authors keep everything)."""
    return 0 < len(q) <= max_chars and q.rstrip().endswith("?")


def is_synth_question(q):
    """What the oracle judge can score: a well-formed question of the synthetic grammar."""
    return is_wellformed(q) and S.parse_question(q) is not None


def read_batches(path):
    """Lines of complete batches only: a batch written partly before a kill is dropped and redone."""
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line
    per_batch = {}
    for r in rows:
        per_batch.setdefault(r["batch"], []).append(r)
    return [r for b in sorted(per_batch) for r in per_batch[b]
            if len(per_batch[b]) == per_batch[b][0]["batch_lines"]]


def gen_token_budget(cfg, model, device):
    """Tokens of KV cache one generation call may hold, rows × (prompt + new tokens): --gen_tokens, or what
    half the free CUDA memory holds at 2 × layers × kv heads × head dim values a token (4 GiB on CPU)."""
    if cfg.gen_tokens > 0:
        return cfg.gen_tokens
    t = model.config.text
    per_token = 2 * t.num_layers * t.num_kv_heads * t.head_dim * model.lm_head.weight.element_size()
    device = torch.device(device)
    free = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else 4 << 30
    return max(1, free // per_token)


def row_generators(seed, n, device):
    """One generator per row, seeded from the batch's seed and the row's index: a row samples the same
    tokens whichever rows share its call (the authors seed once per process, set_seed(40) / (42))."""
    return [torch.Generator(device=device).manual_seed((seed * 1_000_003 + i) % 2**63) for i in range(n)]


def generate_rows(model, tokenizer, convs, px, template, max_new_tokens, budget, sampling=(0.0, None, None),
                  seed=None):
    """D.generate_text over the rows in order, in chunks whose rows × (longest prompt + max_new_tokens) fits
    `budget` (one row at least); px: (rows, 3, H, W), row i's image. `seed`: each row samples from its own
    generator (row_generators), so the chunking does not change what is sampled; None is greedy."""
    c = model.config
    lens = [len(D.encode_prompt(t, tokenizer, template, c.image_seq_length, c.image_token_id)) for t in convs]
    gens = None if seed is None else row_generators(seed, len(convs), model.lm_head.weight.device)
    out, start = [], 0
    while start < len(convs):
        end, longest = start + 1, lens[start]
        while end < len(convs) and (end + 1 - start) * (max(longest, lens[end]) + max_new_tokens) <= budget:
            longest = max(longest, lens[end])
            end += 1
        out += D.generate_text(model, tokenizer, convs[start:end], px[start:end], template, max_new_tokens,
                               *sampling, None if gens is None else gens[start:end])
        start = end
    return out


def part_paths(out_path):
    return sorted(glob.glob(glob.escape(out_path) + ".rank*"))


def merge_parts(out_path):
    """Once every rank has generated: the complete batches of out_path and of the ranks' parts, in batch
    order, into out_path (a batch found twice taken once, from out_path first), then the parts removed."""
    parts = part_paths(out_path)
    if not parts:
        return
    by_batch = {}  # batch -> {file: rows}
    for p in [out_path, *parts]:
        for r in read_batches(p):
            by_batch.setdefault(r["batch"], {}).setdefault(p, []).append(r)
    replace_text(out_path, "".join(json.dumps(r) + "\n" for b in sorted(by_batch)
                                   for r in next(iter(by_batch[b].values()))))
    for p in parts:
        os.remove(p)


def generate_step(cfg, model, tokenizer, images, image_dir, out_path, device, keep=None, rank=0, world=1):
    """Questions and answer pairs for every image, one JSONL line per question, written batch by batch.

    Each image is described once (greedily), then its n_questions questions are sampled from that one
    prompt (visual_sq.py). Every sampled row draws from its own generator, seeded from the batch and the
    row, so a resumed run writes exactly what an uninterrupted one would, at any --gen_tokens. Over `world`
    ranks, rank r takes batches r, r + world, ... into its own part (out_path.rank{r}; merge_parts joins
    them); a batch written by any earlier run, at any world size, is not redone.
    """
    path = out_path if world == 1 else f"{out_path}.rank{rank}"
    done = read_batches(path)
    with open(path, "w") as f:  # rewrite without any partial batch
        f.writelines(json.dumps(r) + "\n" for r in done)
    done_batches = {r["batch"] for p in {out_path, path, *part_paths(out_path)} for r in read_batches(p)}
    seeds = [int(s) for s in cfg.answer_seeds.split(",")]
    a_template = cfg.template or getattr(model, "template", "vicuna_v1")  # the answers' prompt
    size = model.config.vision.image_size
    budget = gen_token_budget(cfg, model, device)
    batches = [images[i:i + cfg.gen_batch] for i in range(0, len(images), cfg.gen_batch)]
    mine = [b for b in range(len(batches)) if b % world == rank and b not in done_batches]
    t0 = time.time()
    for n_done, b in enumerate(mine):
        names = batches[b]
        px = D.load_images([Path(image_dir) / n for n in names], size)
        desc = generate_rows(model, tokenizer, [D.questioner_turns()] * len(names), px, "vicuna_v1_sq",
                             cfg.describe_tokens, budget)
        k = cfg.n_questions  # row i * k + j: image i's question j, all from image i's one description
        qs = generate_rows(model, tokenizer, [D.questioner_turns(d) for d in desc for _ in range(k)],
                           px.repeat_interleave(k, 0), "vicuna_v1_sq", cfg.q_max_tokens, budget,
                           (cfg.q_temperature, cfg.q_top_k, cfg.q_top_p), cfg.seed * 1_000_003 + b)
        qs = [q.removesuffix("</s>").strip() for q in qs]
        per_image = [qs[i * k:(i + 1) * k] for i in range(len(names))]
        # a question an image got twice is kept once
        unique = [(n, q) for n, qs in zip(names, per_image) for q in dict.fromkeys(qs)]
        items = [(n, q) for n, q in unique if (keep or is_wellformed)(q)]
        dropped = len(unique) - len(items)
        repeats = sum(len(qs) for qs in per_image) - len(unique)
        answers = []
        for s in seeds:  # two answers per question, each from its own seed
            convs = [[{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": None}]
                     for _, q in items]
            apx = px[[names.index(n) for n, _ in items]]  # each question's image
            answers.append(generate_rows(model, tokenizer, convs, apx, a_template, cfg.a_max_tokens, budget,
                                         (cfg.a_temperature, cfg.a_top_k, cfg.a_top_p), s * 1_000_003 + b))
        sampling = {"q": [cfg.q_temperature, cfg.q_top_k, cfg.q_top_p],
                    "a": [cfg.a_temperature, cfg.a_top_k, cfg.a_top_p]}
        lines = [{"batch": b, "batch_lines": len(items) + 1, "image": n, "question": q,
                  "answers": [a[i] for a in answers], "seeds": seeds, "sampling": sampling}
                 for i, (n, q) in enumerate(items)]
        lines.append({"batch": b, "batch_lines": len(items) + 1, "images": len(names), "dropped": dropped,
                      "repeats": repeats})  # the batch's end
        with open(path, "a") as f:
            append_jsonl(f, lines)  # durable before the next batch starts
        dt = time.time() - t0
        print0(f"generate: batch {b + 1}/{len(batches)}, {len(items)} questions kept, "
               f"{dropped} malformed and {repeats} repeats dropped, "
               f"ETA {dt / (n_done + 1) * (len(mine) - n_done - 1):.0f}s")
    rows = read_batches(path)
    qa = [r for r in rows if "question" in r]
    print0(f"generate: {len(qa)} questions with two answers each in {path} "
           f"({sum(r.get('dropped', 0) for r in rows)} malformed and "
           f"{sum(r.get('repeats', 0) for r in rows)} repeated questions dropped)")
    return qa

# -----------------------------------------------------------------------------
# 2. judge: both answers scored, higher = chosen


def make_judge(cfg, synth=None):
    if cfg.judge == "oracle":
        facts = json.loads(((synth or S.synth_data()) / "facts.json").read_text())
        return J.OracleJudge(S.score_answer, facts)
    ledger = J.Ledger(os.path.join(cfg.out_dir, "judge_spend.jsonl"), cfg.price_in, cfg.price_out)
    if note := J.price_note(cfg.base_url, cfg.price_in, cfg.price_out):
        print0(note)
    return J.GPTJudge(J.ChatClient(cfg.base_url, cfg.judge_model, cfg.api_key_env, cfg.timeout, cfg.max_tries,
                                   ledger=ledger))


ROLE_TAG = re.compile(r"</s>|\b(?:V?USER|ASSISTANT):|\[/?INST\]")  # where the templates' masking splits


def judge_step(cfg, rows, image_dir, judge, pairs_path, gen_path):
    """Rate every (question, answers) row; write preference pairs, fingerprinted with the generations they
    were judged from. Ties and failures are dropped and counted; a refused key, or every item failing,
    stops the run."""
    cache = J.Cache(os.path.join(cfg.out_dir, "judge_cache.jsonl"))
    items = [{"image": r["image"], "question": r["question"], "answers": r["answers"]} for r in rows]
    try:
        rated, stats = J.rate_items(items, judge, cache, cfg.swap, str(image_dir), cfg.workers,
                                    retry_failed=cfg.retry_failed, report=print0)
    except J.Fatal as e:  # a refused key: one line, the whole run
        raise SystemExit(f"judge: stopped: {e}")
    if items and stats["failed_items"] == len(items):
        raise SystemExit(f"judge: every one of {len(items)} verdicts failed, e.g. {rated[0]['error']}")
    pairs = []
    ties = 0
    failed = 0
    for r in rated:
        if "error" in r:
            failed += 1
            continue
        s1, s2 = r["scores"]
        # ties say nothing (the paper is silent); an empty answer or one with a role tag DPO cannot encode
        if s1 == s2 or not all(a.strip() and not ROLE_TAG.search(a) for a in r["answers"]):
            ties += 1
            continue
        win = 0 if s1 > s2 else 1
        pairs.append({"image": r["image"], "question": r["question"], "chosen": r["answers"][win],
                      "rejected": r["answers"][1 - win], "scores": [r["scores"][win], r["scores"][1 - win]]})
    replace_text(pairs_path, "".join(json.dumps(p) + "\n" for p in pairs))
    judged_by = cfg.judge_model if cfg.judge == "gpt" else "oracle"
    gen = content_hash(gen_path)
    write_fingerprint(pairs_path, fingerprint(generations=gen, judge=judged_by, swap=cfg.swap))
    print0(J.summary(stats, judge, cfg.price_in, cfg.price_out))
    print0(f"judge: {len(pairs)} preference pairs, {ties} ties or empty answers and {failed} failed verdicts "
           f"dropped -> {pairs_path}")
    R.write_verdicts(cfg.out_dir, rated, image_dir)  # verdicts.jsonl and the run's report.html
    return pairs

# -----------------------------------------------------------------------------
# 3. train: DPO


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1):
    """Eq. 1 of STLLaVA-Med (Rafailov et al. 2023), sigmoid loss, per pair:

        loss = -log σ(β [(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))])

    Returns (losses, chosen_rewards, rejected_rewards), rewards = β (log π - log π_ref), detached.
    """
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return losses, beta * chosen.detach(), beta * rejected.detach()


def sequence_logps(model, b):
    """Summed log-probabilities of the supervised (answer) tokens of each row: (2B,) for chosen ++
    rejected."""
    # no attention mask: right padding makes plain causal attention exact at every answer token (sft.sft_loss)
    logits = model(b["input_ids"], b["pixel_values"])
    return -token_nll(logits, b["labels"]).sum(-1)  # ignored positions contribute 0


class Reference:
    """The frozen stage-1 model without a second copy of its weights: the policy with its LoRA switched off
    and the stage-1 projector swapped back in (the projector trains in full, so it alone is copied).
    The authors build the reference's image features with the policy's vision tower and projector
    (`concatenated_forward` in base_dpo_trainer.py); here the reference uses its own, so it stays fixed."""

    def __init__(self, model):
        self.model = model
        self.projector = {k: v.detach().clone() for k, v in model.projector.state_dict().items()}

    @torch.no_grad()
    def logps(self, b):
        trained = {k: v.detach().clone() for k, v in self.model.projector.state_dict().items()}
        self.model.projector.load_state_dict(self.projector)
        was_training = self.model.training
        self.model.eval()  # no LoRA dropout in the reference
        try:
            with disable_lora(self.model):
                return sequence_logps(self.model, b)
        finally:
            self.model.projector.load_state_dict(trained)
            self.model.train(was_training)


def encode_pair_batch(pairs, tokenizer, model_cfg, image_dir, image_size, max_length, device,
                      template="vicuna_v1"):
    """chosen_1..chosen_B ++ rejected_1..rejected_B as one right-padded batch (one forward for both, as the
    authors' concatenated_forward does); single-turn prompts (`vicuna_v1`, train_dpo.py's --version v1, or
    the model's template), loss on the answer + "</s>"."""
    items = []
    for key in ("chosen", "rejected"):
        for p in pairs:
            turns = [{"from": "human", "value": "<image>\n" + p["question"]},
                     {"from": "gpt", "value": p[key]}]
            ids, labels = D.encode_conversation(turns, tokenizer, template, model_cfg.image_seq_length,
                                                model_cfg.image_token_id, max_length)
            items.append({"input_ids": ids, "labels": labels, "image": Path(image_dir) / p["image"]})
    b = D.collate(items, padding_side="right", image_size=image_size)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}


def train_step(cfg, pairs, tokenizer, image_dir, device, rank=0, world=1, marked=()):
    """DPO of a fresh LoRA (+ projector) on the merged stage-1 model; returns the trained model (under
    --shard=fsdp gathered on rank 0, None on the other ranks)."""
    digest = hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest()  # judge rewrites the file
    template = cfg.template or template_of(cfg.model)
    ref_path = os.path.join(cfg.out_dir, "ref_logps.pt")
    ref_fp = fingerprint(pairs=digest, model=identity(cfg.model), template=template, amp=cfg.amp,
                         max_length=cfg.max_length, micro_batch=cfg.micro_batch)
    saved = torch.load(ref_path) if cfg.precompute_ref and os.path.exists(ref_path) else {}
    # the stored reference log-probs and out_dir's checkpoint are checked before any weight loads
    reuse_ref = bool(saved) and check_reuse(ref_path, ref_fp, cfg.overwrite, old=saved.get("fingerprint"))
    run = start_run(cfg, len(pairs), cfg.out_dir, world, rank, marked, {"pairs": digest})
    model = from_pretrained(cfg.model, dtype=torch.float32, device=device)
    model.language_model.gradient_checkpointing = cfg.grad_ckpt
    # the same LoRA initialisation on every rank (DDP would broadcast rank 0's, FSDP shards what each rank
    # holds) and in every rerun
    torch.manual_seed(cfg.seed)
    add_lora(model, lora_targets(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                 cfg.vit_lora_r, cfg.vit_lora_alpha, cfg.vit_lora_dropout))
    mark_trainable(model, lora=True, full=("projector",))
    groups = shard_model(model, cfg, device, param_groups(model, cfg))
    print0(format_plan(memory_plan(model, cfg, world, rows=2 * cfg.micro_batch)))  # chosen + rejected
    # after sharding, so that it copies the projector's shards; FSDP2 reshards a module before its state_dict
    # and load_state_dict, so the swaps in Reference.logps always meet shards, even after a no-grad forward
    ref = Reference(model)
    size = model.config.vision.image_size
    if cfg.precompute_ref:  # one pass of the reference over all pairs, saved with the pairs
        if reuse_ref:
            stored = saved["logps"]
        else:
            chunks = []
            for i in range(0, len(pairs), cfg.micro_batch):
                b = encode_pair_batch(pairs[i:i + cfg.micro_batch], tokenizer, model.config, image_dir, size,
                                      cfg.max_length, device, template)
                with autocast(cfg, device):  # what the live reference computes, under fit's autocast
                    chunks.append(ref.logps(b).view(2, -1).T)
            stored = torch.cat(chunks).cpu()  # (P, 2): chosen, rejected
            if rank == 0:
                atomic_save({"fingerprint": ref_fp, "logps": stored}, ref_path)  # one file: one atomic write

    def prepare(indices, epoch):
        b = encode_pair_batch([pairs[i] for i in indices], tokenizer, model.config, image_dir, size,
                              cfg.max_length, device, template)
        b["ref"] = stored[indices].T.reshape(-1).to(device) if cfg.precompute_ref else ref.logps(b)
        b["count"] = len(indices)
        return b

    def micro_loss(policy, b):
        logps = sequence_logps(policy, b)
        n = len(logps) // 2
        losses, rc, rr = dpo_loss(logps[:n], logps[n:], b["ref"][:n], b["ref"][n:], cfg.beta)
        loss_sum = losses.sum()
        metrics = {"loss_sum": losses.sum().item(), "loss_n": n,
                   "reward_acc_sum": (rc > rr).sum().item(), "reward_acc_n": n,
                   "margin_sum": (rc - rr).sum().item(), "margin_n": n,
                   "chosen_reward_sum": rc.sum().item(), "chosen_reward_n": n,
                   "rejected_reward_sum": rr.sum().item(), "rejected_reward_n": n,
                   "tokens": int(b["attention_mask"].sum())}
        return loss_sum, metrics

    return fit(cfg, model, len(pairs), prepare, micro_loss, groups, cfg.out_dir, world, rank, device, run=run)

# -----------------------------------------------------------------------------
# Entry point


def image_list(cfg, synth):
    if synth is not None and not cfg.data:
        names = sorted({r["image"] for r in json.loads((synth / "train.json").read_text())})
        return names[:cfg.n_images], synth / "images"
    image_dir = Path(cfg.image_dir or Path(cfg.data).parent)  # "": the JSON's folder, as read_conversations
    records = D.read_conversations(cfg.data, image_dir, skip_bad=True)
    names = sorted({os.path.relpath(r["image"], image_dir) for r in records if r["image"]})
    if not names:
        fail(f"{cfg.data}: no usable record with an image under {image_dir} (see above); --image_dir=FOLDER "
             "names the images' folder")
    return names[:cfg.n_images], image_dir


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    steps = ["generate", "judge", "train"]
    if argv and not argv[0].startswith("-"):  # the step to run; none: all three
        if argv[0] not in steps:
            fail(f"the step is generate, judge or train (or none: all three), not {argv[0]!r}")
        steps, argv = [argv[0]], argv[1:]
    usage, rule = "dpo.py [generate | judge | train] [--flag=value ...]", __doc__.split("\n\n")[-1]
    cfg, given = parse_config(Config, argv, dict(SYNTH_OVERRIDES, judge="oracle"), usage, rule)
    # no --data: the synthetic data and oracle judge; no --model either: the default's settings too
    synthetic = not cfg.data
    default = synthetic and not cfg.model
    if synthetic and "judge" not in given:
        if given.keys() & {"base_url", "judge_model", "api_key_env"}:
            fail("without --data the synthetic data is judged by the offline oracle: give --data and --model "
                 "to judge your data with the server, or --judge=gpt to send the synthetic answers to it")
        cfg = replace(cfg, judge="oracle")
    marked = [k for k in SYNTH_OVERRIDES if default and k not in given]  # starred in config.json
    marked += ["judge"] * (synthetic and "judge" not in given)
    if default:
        cfg = replace(cfg, **{k: v for k, v in SYNTH_OVERRIDES.items() if k not in given})
    cfg = replace(cfg, model=cfg.model or "out/sft/merged")
    if steps != ["judge"] and not os.path.exists(os.path.join(cfg.model, "config.json")):
        fail(f"no stage-1 model at {cfg.model}: run `python sft.py` first, or pass --model=DIR")
    synth = S.synth_data() if synthetic or cfg.judge == "oracle" else None
    rank, world, device = setup_distributed(cfg.shard)
    if rank == 0:  # a second run into this out_dir is refused; the settings printed and kept
        lock_out_dir(cfg.out_dir)
        write_config(cfg.out_dir, asdict(cfg), marked)
    tokenizer = D.load_tokenizer(cfg.model) if steps != ["judge"] else None  # the judge reads text only
    images, image_dir = image_list(cfg, synth)
    gen_path = os.path.join(cfg.out_dir, "generations.jsonl")
    pairs_path = os.path.join(cfg.out_dir, "pairs.jsonl")
    t0 = time.time()
    # generation and judging outlast NCCL's default 10-minute timeout: between the steps the ranks wait for
    # each other on a gloo group with a long one
    wait = torch.distributed.new_group(backend="gloo", timeout=timedelta(days=7)) if world > 1 else None
    # what makes the generations: a rerun with other inputs is refused, the same inputs resume
    gen_fp = fingerprint(model=identity(cfg.model), data=identity(cfg.data) or S.SYNTH_VERSION,
                         images=[len(images), images[:1], images[-1:]], template=cfg.template, seed=cfg.seed,
                         **{k: getattr(cfg, k) for k in ("n_questions", "describe_tokens", "q_temperature",
                            "q_top_k", "q_top_p", "q_max_tokens", "a_temperature", "a_top_k", "a_top_p",
                            "a_max_tokens", "answer_seeds", "gen_batch")})
    if "generate" in steps:
        if not check_reuse(gen_path, gen_fp, cfg.overwrite) and rank == 0:  # afresh: no old batch survives
            for p in [gen_path, *part_paths(gen_path)]:
                remove_output(p)
        if rank == 0:
            write_fingerprint(gen_path, gen_fp)
        if wait is not None:
            torch.distributed.barrier(group=wait)
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        model = from_pretrained(cfg.model, dtype=dtype, device=device)
        keep = is_synth_question if synthetic else None  # the oracle scores the grammar's questions only
        generate_step(cfg, model, tokenizer, images, image_dir, gen_path, device, keep, rank, world)
        del model
        if wait is not None:
            torch.distributed.barrier(group=wait)
        if rank == 0:
            merge_parts(gen_path)
            if not any("question" in r for r in read_batches(gen_path)):
                raise SystemExit(f"generate: no usable question was sampled; {gen_path} holds none to judge")
    if "judge" in steps and rank == 0:
        rows = [r for r in read_batches(gen_path) if "question" in r]
        if not rows:  # no file, or every sampled question was malformed
            fail(f"no questions to judge in {gen_path}: run `python dpo.py generate` into this out_dir")
        judge_step(cfg, rows, image_dir, make_judge(cfg, synth), pairs_path, gen_path)
    if wait is not None:
        torch.distributed.barrier(group=wait)  # the judge runs on rank 0: HTTP-bound, one process is enough
    if "train" in steps:
        pairs = read_records(pairs_path, need=("image", "question", "chosen", "rejected"))
        if not pairs:
            fail(f"no preference pairs in {pairs_path}: every verdict was a tie or failed")
        check_batch(cfg, world, len(pairs))  # before the model loads
        fp = fingerprint_path(pairs_path)
        judged = json.load(open(fp)).get("generations") if os.path.exists(fp) else None
        if os.path.exists(gen_path) and judged != content_hash(gen_path):
            fail(f"{pairs_path} was not judged from {gen_path} as it is now: run `python dpo.py judge` first")
        model = train_step(cfg, pairs, tokenizer, image_dir, device, rank, world, marked)
        if rank == 0:
            save_adapter(model, os.path.join(cfg.out_dir, "final"))
            D.copy_tokenizer(cfg.model, os.path.join(cfg.out_dir, "final"))  # the adapter loads alone
            merged = os.path.join(cfg.out_dir, "merged")
            save_pretrained(merge_lora(model), merged)
            D.copy_tokenizer(cfg.model, merged)
            print0(f"stage 2 done in {(time.time() - t0) / 60:.1f} min; policy in {merged}")
        if default and len(steps) == 3 and rank == 0:
            E.synth_scorecard(model.eval(), tokenizer, cfg.model, cfg.out_dir, synth, device, cfg.seed)
    if torch.distributed.is_initialized():
        # leave together: a rank that exits while rank 0 still writes can make gloo abort
        torch.distributed.barrier(group=wait)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
