"""
Stage 1 of STLLaVA-Med: reasoning and learning to question (supervised fine-tuning).

The policy learns to answer (ASSISTANT turns) and to ask (VUSER turns): the loss is one mean
cross-entropy over every supervised token, answers and questions alike (STLLaVA-Med §2; the authors'
`llava/train/train.py` `preprocess_v1_sq2`). LoRA on the language model (r128/α256) and on the vision
tower (r32/α64), the projector trained in full, three learning rates (`sqllava_med.sh`).

    python sft.py                                     # synthetic default, one CPU process
    python sft.py --model=ckpt/llava-v1.5-7b --data=instruct.json --image_dir=images/
    torchrun --standalone --nproc_per_node=8 sft.py --model=... --data=... --image_dir=...
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 sft.py ...
    torchrun --standalone --nproc_per_node=8 sft.py --shard=fsdp ...   # FSDP2: weights, grads, AdamW sharded
    python sft.py --plan --model=llava-1.5-7b --shard=fsdp --world=8  # memory per GPU: no GPU, no weights

With neither --model nor --data, the synthetic default: stage 1 starts from synth_base/, a tiny stand-in for
the general-purpose LLaVA the paper starts from (it sees, describes and answers, and has never asked a
question), shipped in the repository; `python sft.py --make_base` trains it from scratch on pretrain.json.

The same trainer runs LLaVA-Med's curriculum (LLaVA-Med §4): `--train=projector --align_captions` (concept
alignment on image-caption pairs), then `--train=llm` (instruction tuning: projector and LLM, tower frozen,
one learning rate). At LLaVA-Med's scale and values (its v1 README: global batch 128, 2e-3 for one epoch,
then 2e-5 for three; the full fine-tune sharded, as its FSDP run):

    torchrun --standalone --nproc_per_node=8 sft.py --model=ckpt/llava-v1.5-7b --data=alignment_500k.json \
        --image_dir=images/ --train=projector --align_captions --template=vicuna_v1 --no-question_loss \
        --projector_lr=2e-3 --epochs=1 --out_dir=out/align
    torchrun --standalone --nproc_per_node=8 sft.py --model=out/align/final --data=instruct_60k.json \
        --image_dir=images/ --train=llm --template=vicuna_v1 --no-question_loss --lr=2e-5 --epochs=3 \
        --shard=fsdp --out_dir=out/instruct

The same on the synthetic data, with the tiny model's learning rates: README.md, LLaVA-Med's curriculum.
"""
import json
import os
import random
import sys
import time
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn

import data as D
import evaluate as E
import synth as S
from checkpoint import from_pretrained, save_pretrained
from lora import add_lora, lora_targets, mark_trainable, merge_lora, save_adapter
from model import CONFIGS, Llava
from runs import check_model_dir, fail, identity, parse_config, read_records, run_main
from train import (check_batch, fit, format_plan, memory_plan, param_groups, plan_row, print0,
                   setup_distributed, shard_model, start_run, token_nll)


@dataclass
class Config:
    # what to train on; empty --model/--data = the synthetic default
    model: str = ""  # checkpoint directory (llava-hf or original LLaVA layout)
    vision_path: str = ""  # CLIP directory when the checkpoint does not hold the tower
    data: str = ""  # LLaVA conversation JSON (id, image, conversations)
    image_dir: str = ""  # the folder --data's image paths are relative to; "" = the JSON's own folder
    out_dir: str = "out/sft"  # checkpoint, log.jsonl, config.json, final/ (and merged/) go here
    # what trains: lora = the paper (LoRA on both towers + projector); projector = LLaVA-Med's alignment;
    # llm = LLaVA-Med's instruction tuning (projector + LLM, tower frozen, cfg.lr for all); full = everything
    train: Literal["lora", "projector", "llm", "full"] = "lora"
    question_loss: bool = True  # STLLaVA-Med: supervise VUSER questions too; off = plain LLaVA answers-only
    lm_loss: bool = False  # every text token supervised, as a language model pretrains (the synthetic base)
    # LLaVA-Med concept alignment: each caption record gets a "describe" instruction, drawn per epoch from
    # the paper's brief (< 30 words) or detailed list (data.caption_to_alignment)
    align_captions: bool = False
    sq_r: float = 0.5  # probability that a later human turn becomes a VUSER turn (sqllava_med.sh --sq_r 0.5)
    template: Literal[tuple(D.TEMPLATES)] = "vicuna_v1_sq"  # conversation template (data.TEMPLATES)
    lora_r: int = 128  # LLM LoRA rank (sqllava_med.sh)
    lora_alpha: int = 256  # LLM LoRA scale: the update is B A x alpha / r
    lora_dropout: float = 0.05  # dropout on the LLM LoRA's input
    vit_lora_r: int = 32  # vision-tower LoRA rank (sqllava_med.sh --vit_lora_enable)
    vit_lora_alpha: int = 64  # vision-tower LoRA scale
    vit_lora_dropout: float = 0.2  # dropout on the vision-tower LoRA's input
    # optimisation (sqllava_med.sh): AdamW, no weight decay, cosine with 3% warmup
    lr: float = 2e-4  # peak learning rate of the LLM (its LoRA; all its weights in full; everything in llm)
    vision_lr: float = 5e-5  # the vision tower's (sqllava_med.sh; the paper's "5x10^-?" is garbled)
    projector_lr: float = 2e-5  # the projector's (the script's mm_projector_lr)
    weight_decay: float = 0.0  # AdamW's, on every group
    warmup_ratio: float = 0.03  # share of the steps the learning rate warms up linearly, then cosine to 0
    grad_clip: float = 1.0  # clip the global gradient norm to this
    global_batch: int = 128  # = micro_batch x accumulation x world size; accumulation is derived
    micro_batch: int = 8  # examples a forward pass, per process
    epochs: float = 3  # passes over --data (the script runs 3; the paper says one epoch)
    max_steps: int = -1  # stop after this many optimizer steps (smoke runs, tests); -1 = the epochs' count
    max_length: int = 2048  # tokens a conversation keeps, image tokens included; the rest is cut
    image_size: int = 0  # 0 = the vision tower's own (config.json); images are resized to this
    grad_ckpt: bool = True  # recompute each decoder block in backward (the authors' --gradient_checkpointing)
    seed: int = 0  # LoRA initialisation, data order, questioner roles
    # ddp: every rank holds the whole model; fsdp: FSDP2 shards weights, gradients and optimizer state over
    # the ranks (train.shard_model)
    shard: Literal["ddp", "fsdp"] = "ddp"
    cpu_offload: bool = False  # fsdp only: the shards and the optimizer state live in CPU memory
    # bookkeeping
    save_every: int = 200  # steps between checkpoints (out_dir/checkpoint*)
    resume: bool = False  # continue from out_dir's checkpoint, bit for bit; changed settings are refused
    overwrite: bool = False  # start afresh where out_dir holds a checkpoint made from other inputs
    merge: bool = False  # also write the merged model (llava-hf layout) after LoRA training
    log_every: int = 10  # steps between printed log lines (log.jsonl has every step)
    plan: bool = False  # print the memory plan of --model (a model.CONFIGS name) on the meta device; exit
    world: int = 0  # the plan's world size; 0 = the real one
    make_base: bool = False  # synthetic: train the base from scratch on pretrain.json, with SYNTH_BASE


# With neither --model nor --data the synthetic default replaces the paper-scale values above, unless the
# command line sets them: a small batch and larger learning rates train the tiny model in minutes on a CPU.
# The LLM LoRA at 7e-4: closed accuracy after stage 1 (base 86.6) moves with the seed by a few points at
# every rate tried (seed 0: 76.9 at 2e-3, 81.0 at 1e-3, 79.6 at 5e-4; seed 1: 76.8 at 1e-3, 82.2 at 7e-4).
SYNTH_OVERRIDES = dict(global_batch=16, micro_batch=16, epochs=3, lr=7e-4, vision_lr=2e-3, projector_lr=2e-3,
                       max_length=512, save_every=100, log_every=20,
                       grad_ckpt=False)  # the tiny model fits anyway: recomputing only costs time
# --make_base: the tiny model from scratch, every weight, as a language model of single-turn captions and QA
SYNTH_BASE = dict(train="full", question_loss=False, lm_loss=True, sq_r=0.0, template="vicuna_v1", lr=1.5e-3,
                  vision_lr=1.5e-3, projector_lr=1.5e-3, global_batch=32, micro_batch=32, epochs=8,
                  save_every=500)
SYNTH_HELP = {**SYNTH_OVERRIDES, "micro_batch": "global_batch / world size"}  # for --help
SYNTH_RULE = ("With neither --model nor --data, the synthetic default: its values apply to every flag not "
              "given; --make_base's are " + " ".join(f"--{k}={v}" for k, v in SYNTH_BASE.items()))

# -----------------------------------------------------------------------------
# Stage 1 pieces: trainable set, encoding, the loss


def setup_trainable(model, cfg):
    """Inject LoRA / freeze per `cfg.train`; returns the AdamW parameter groups."""
    if cfg.train == "lora":
        add_lora(model, lora_targets(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                     cfg.vit_lora_r, cfg.vit_lora_alpha, cfg.vit_lora_dropout))
        mark_trainable(model, lora=True, full=("projector",))
    elif cfg.train == "projector":
        mark_trainable(model, lora=False, full=("projector",))
    elif cfg.train == "llm":
        # LLaVA-Med §4 stage 2: "We only keep the visual encoder weights frozen, and continue to update both
        # the pre-trained weights of the projection layer and LM" (embeddings and lm_head included: a full
        # fine-tune), with one learning rate, 2e-5 in its v1 README
        mark_trainable(model, lora=False, full=("projector", "language_model", "lm_head"))
        return [{**g, "lr": cfg.lr} for g in param_groups(model, cfg)]
    elif cfg.train == "full":
        mark_trainable(model, lora=False, full=("vision_tower", "projector", "language_model", "lm_head"))
    else:
        raise ValueError(f"--train must be lora, projector, llm or full, not {cfg.train!r}")
    return param_groups(model, cfg)


def make_sft_prepare(examples, tokenizer, cfg, model_cfg, device):
    """Encode a micro batch: questioner roles redrawn per epoch (seeded per example), right padding."""
    def prepare(indices, epoch):
        items = []
        for i in indices:
            ex = examples[i]
            if cfg.align_captions:
                ex = D.caption_to_alignment(ex, random.Random(hash((cfg.seed, epoch, i))))
            turns = ex["conversations"]
            if cfg.template == "vicuna_v1_sq" and cfg.sq_r > 0:
                turns = D.assign_questioner_roles(turns, cfg.sq_r, random.Random(hash((cfg.seed, epoch, i))))
            ids, labels, is_question = D.encode_conversation(
                turns, tokenizer, cfg.template, model_cfg.image_seq_length, model_cfg.image_token_id,
                cfg.max_length, return_question_mask=True)
            if not cfg.question_loss:
                labels = [-100 if q else lab for lab, q in zip(labels, is_question)]
            if cfg.lm_loss:
                labels = [-100 if t == model_cfg.image_token_id else t for t in ids]
            items.append({"input_ids": ids, "labels": labels, "question_mask": is_question,
                          "image": ex["image"]})
        b = D.collate(items, padding_side="right", image_size=cfg.image_size or model_cfg.vision.image_size)
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        b["count"] = int((b["labels"][:, 1:] != -100).sum())
        return b
    return prepare


def sft_loss(model, b):
    """Summed next-token cross-entropy over supervised tokens, plus answer/question sums for the log."""
    # No attention mask, on purpose: the batch is right-padded, so a real token's keys (those before it) are
    # all real and its position is its index, as the mask's cumsum would give. Plain causal attention is then
    # exact at every supervised position, and SDPA may take its flash kernel (no (B, 1, T, T) mask, no host
    # sync). Pads see pads and predict labels of -100: their logits differ from the masked path's, unused.
    logits = model(b["input_ids"], b["pixel_values"])
    ce = token_nll(logits, b["labels"])  # (B, T - 1): position t predicts token t + 1
    labels = b["labels"][:, 1:]
    supervised = labels != -100
    question = b["question_mask"][:, 1:].bool() & supervised
    answer = supervised & ~question
    return ce.sum(), {"answer_loss_sum": ce[answer].sum().item(), "answer_loss_n": int(answer.sum()),
                      "question_loss_sum": ce[question].sum().item(), "question_loss_n": int(question.sum()),
                      "tokens": int(b["attention_mask"].sum())}

# -----------------------------------------------------------------------------
# The synthetic base model, and the entry point


def init_weights(model, std=0.02):
    """From-scratch initialisation (LLaMA-style normal(0, 0.02); norms at 1), for the synthetic base model."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    return model


def main(argv=None):
    cfg, given = parse_config(Config, argv, SYNTH_HELP, "sft.py [--flag=value ...]", SYNTH_RULE)
    if cfg.plan:  # no GPU, no weights, no data: the parameter counts are all the plan needs
        with torch.device("meta"):
            model = Llava(CONFIGS.get(cfg.model) or fail(f"--plan --model: one of {', '.join(CONFIGS)}"))
        setup_trainable(model, cfg)
        plan = memory_plan(model, cfg, cfg.world or 1)
        return print(format_plan(plan) + "\n" + plan_row(plan, f"{cfg.model}, {cfg.train}"))
    synthetic = not cfg.model and not cfg.data
    if bool(cfg.model) != bool(cfg.data) or (cfg.make_base and not synthetic):
        fail("give --model and --data together (stage 1 on your data), or neither (the synthetic default; "
             "--make_base trains its base)")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's: the synthetic default splits its batch over it
    if synthetic:  # the synthetic default's values, for every key the command line did not set
        synth_values = {**SYNTH_OVERRIDES, **(SYNTH_BASE if cfg.make_base else {})}
        synth_values["micro_batch"] = max(1, given.get("global_batch", synth_values["global_batch"]) // world)
        cfg = replace(cfg, **{k: v for k, v in synth_values.items() if k not in given})
    else:  # the inputs are checked before any weight loads: a bad record stops here, named
        check_model_dir(cfg.model, vision_path=cfg.vision_path)
    marked = [k for k in synth_values if k not in given] if synthetic else []  # starred in config.json
    check_batch(cfg, world, None if synthetic else len(read_records(cfg.data, need=("conversations",))))
    rank, world, device = setup_distributed(cfg.shard)
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    tokenizer = D.load_tokenizer(S.synth_data() / "tokenizer.json" if synthetic else cfg.model)
    if synthetic:
        synth = S.synth_data()
        if not cfg.make_base and D.load_tokenizer(S.BASE_DIR).to_str() != tokenizer.to_str():
            fail(f"{S.BASE_DIR} was made for another synthetic world than {synth.name}: "
                 "remake it with `python sft.py --make_base` (see its README.md)")
        cfg = replace(cfg, model="" if cfg.make_base else str(S.BASE_DIR), image_dir=str(synth / "images"),
                      data=str(synth / ("pretrain.json" if cfg.make_base else "train.json")))
    examples = D.read_conversations(cfg.data, cfg.image_dir)
    run = start_run(cfg, len(examples), cfg.out_dir, world, rank, marked)  # checked before any weight loads
    if cfg.make_base:
        text = replace(CONFIGS["tiny"].text, vocab_size=tokenizer.get_vocab_size())
        mc = replace(CONFIGS["tiny"], text=text, image_token_id=S.SYNTH_IMAGE_TOKEN_ID)
        model = init_weights(Llava(mc)).to(device)
    else:
        model = from_pretrained(cfg.model, cfg.vision_path or None, dtype=torch.float32, device=device)
    model.language_model.gradient_checkpointing = cfg.grad_ckpt
    stages = {}
    if synthetic and not cfg.make_base and rank == 0:  # the base, before training: the scorecard's first row
        stages["base"] = E.synth_stage(model.eval(), tokenizer, synth,
                                       os.path.join(cfg.out_dir, "answers_base.jsonl"),
                                       dict(S.QUESTION_SAMPLING, seed=cfg.seed))
    groups = shard_model(model.train(), cfg, device, setup_trainable(model, cfg))
    print0(format_plan(memory_plan(model, cfg, world)))
    prepare = make_sft_prepare(examples, tokenizer, cfg, model.config, device)
    # under fsdp: the trained model gathered on rank 0 (None on the others)
    model = fit(cfg, model, len(examples), prepare, sft_loss, groups, cfg.out_dir, world, rank, device,
                run=run)
    if rank == 0:
        final = os.path.join(cfg.out_dir, "final")
        if cfg.train == "lora":
            save_adapter(model, final)
            if cfg.merge or synthetic:
                save_pretrained(merge_lora(model), os.path.join(cfg.out_dir, "merged"))
        else:
            save_pretrained(model, final)
        for d in ("final", "merged"):  # the next stage loads its tokenizer from the model directory
            if os.path.isdir(os.path.join(cfg.out_dir, d)):
                D.copy_tokenizer(synth if synthetic else cfg.model, os.path.join(cfg.out_dir, d))
        minutes = (time.time() - t_start) / 60
        print0(f"stage 1 done in {minutes:.1f} min; outputs in {cfg.out_dir}")
        if cfg.make_base:
            with open(os.path.join(final, "README.md"), "w") as f:
                f.write(f"The synthetic default's base model ({S.SYNTH_VERSION}), trained from scratch by\n\n"
                        f"    python sft.py {' '.join(sys.argv[1:] if argv is None else argv)}\n\n"
                        f"seed {cfg.seed}, {minutes:.1f} min on {world} {device.type} process(es).\n")
        elif synthetic:
            stages["stage 1"] = E.synth_stage(model.eval(), tokenizer, synth,
                                              os.path.join(cfg.out_dir, "answers_stage1.jsonl"),
                                              dict(S.QUESTION_SAMPLING, seed=cfg.seed))
            save_scorecard(stages, os.path.join(cfg.out_dir, "merged"), cfg.out_dir)
    if dist.is_initialized():
        dist.barrier()  # leave together: a rank that exits while rank 0 still writes can make gloo abort
        dist.destroy_process_group()


def save_scorecard(stages, model_dir, out_dir):
    """Print the stages' table and keep their per-question scores (scorecard.json) for dpo.py's table."""
    table = E.stage_table(stages)
    print0("questions asked about unseen test images at stage 2's settings, e.g. "
           + " | ".join(stages[list(stages)[-1]]["questions"][:4]))
    rows = {n: {k: [float(x) for x in v] if k != "questions" else v for k, v in st.items()}
            for n, st in stages.items()}
    with open(os.path.join(out_dir, "scorecard.json"), "w") as f:
        json.dump({"model": identity(model_dir), "stages": rows, "table": table}, f)


if __name__ == "__main__":
    run_main(main)
