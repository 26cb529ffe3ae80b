# ----------------------------------------------------------------------------- sft.py and dpo.py
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import data as D
import dpo
import model as M
import sft

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def synth():
    return D.synth_data()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, synth):
    """A random tiny LLaVA for the synthetic data (48x48 images, 36 image tokens), with its tokenizer."""
    tok = D.load_tokenizer(synth / "tokenizer.json")
    cfg = M.LlavaConfig(vision=M.VisionConfig(32, 64, 2, 4, 48, 8), text=M.TextConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
        num_kv_heads=2), image_token_id=D.SYNTH_IMAGE_TOKEN_ID)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    M.save_pretrained(sft.init_weights(M.Llava(cfg)), d)
    (d / "tokenizer.json").write_text((synth / "tokenizer.json").read_text())
    return d


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, synth):
    recs = json.loads((synth / "train.json").read_text())[:16]
    p = tmp_path_factory.mktemp("data") / "train.json"
    p.write_text(json.dumps(recs))
    return p


def run_sft(args, nproc=1):
    cmd = [sys.executable, str(HERE / "sft.py")] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(HERE / "sft.py")]
    r = subprocess.run(cmd + args, capture_output=True, text=True, cwd=HERE, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def sft_args(tiny_dir, small_data, synth, out, *extra):
    return [f"--model={tiny_dir}", f"--data={small_data}", f"--image_dir={synth / 'images'}", f"--out_dir={out}",
            "--global_batch=8", "--micro_batch=2", "--max_steps=3", "--epochs=2", "--image_size=48", "--max_length=512",
            "--lr=1e-2", "--vision_lr=1e-2", "--projector_lr=1e-2", "--log_every=1", "--save_every=1", *extra]


def read_log(out):
    return [json.loads(x) for x in open(Path(out) / "log.jsonl")]


def trained(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=False)["trainable"]


def test_sft_two_processes_equal_one_process_with_accumulation(tiny_dir, small_data, synth, tmp_path):
    # no dropout: its random masks would depend on which process draws them
    # lr 1e-3: Adam divides by sqrt(v), so last-bit differences of near-zero gradients (DDP sums in another order)
    # move a weight by up to ~lr x 1e-3; the updates themselves are ~lr, far above the 1e-5 tolerance
    common = ["--lora_dropout=0", "--vit_lora_dropout=0", "--lr=1e-3", "--vision_lr=1e-3", "--projector_lr=1e-3"]
    run_sft(sft_args(tiny_dir, small_data, synth, tmp_path / "one", *common))
    run_sft(sft_args(tiny_dir, small_data, synth, tmp_path / "two", *common), nproc=2)
    a, b = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x["answer_loss"] - y["answer_loss"]) < 1e-5 and abs(x["question_loss"] - y["question_loss"]) < 1e-5
    wa, wb = trained(tmp_path / "one"), trained(tmp_path / "two")
    assert wa.keys() == wb.keys() and any("lora_a" in k for k in wa) and any(k.startswith("projector.") for k in wa)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    start = {k: v for k, v in M.from_pretrained(str(tiny_dir), dtype=torch.float32).state_dict().items() if k in wa}
    assert max((wa[k] - start[k]).abs().max().item() for k in start) > 1e-4  # the projector really moved
    assert (tmp_path / "one" / "final" / "adapter_model.safetensors").exists()


def test_sft_kill_and_resume_is_bit_identical(tiny_dir, small_data, synth, tmp_path, monkeypatch):
    """Stopped after step 2 (an exception right after its checkpoint), resumed: same losses and weights."""
    model_cfg = M.from_pretrained(str(tiny_dir), dtype=torch.float32).config
    tok = D.load_tokenizer(tiny_dir)
    recs = D.read_conversations(small_data, synth / "images")

    def run(out, stop_after=None, resume=False):
        cfg = replace(sft.Config(), model=str(tiny_dir), out_dir=str(out), global_batch=8, micro_batch=4, max_steps=4,
                      epochs=2, image_size=48, max_length=512, lr=1e-2, vision_lr=1e-2, projector_lr=1e-2,
                      log_every=1, save_every=2, resume=resume)
        torch.manual_seed(0)
        model = M.from_pretrained(str(tiny_dir), dtype=torch.float32)
        groups = sft.setup_trainable(model, cfg)  # LoRA with dropout 0.05 / 0.2: the RNG state must resume too
        save = sft.atomic_save

        def save_then_stop(obj, path):
            save(obj, path)
            if stop_after is not None and obj["step"] == stop_after:
                raise KeyboardInterrupt
        monkeypatch.setattr(sft, "atomic_save", save_then_stop)
        if resume:  # a new process would start from fresh RNG and weights; scramble both to be sure
            torch.manual_seed(1234)
        sft.fit(cfg, model, len(recs), sft.make_sft_prepare(recs, tok, cfg, model_cfg, "cpu"), sft.sft_loss, groups,
                str(out))
        return model

    full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", stop_after=2)
    resumed = run(tmp_path / "cut", resume=True)
    la, lb = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    assert [x["step"] for x in lb] == [1, 2, 3, 4]
    strip = lambda log: [{k: v for k, v in x.items() if k != "tok_s"} for x in log]  # wall-clock speed differs
    assert strip(la) == strip(lb)  # every other logged number, bit for bit
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


def test_question_loss_switch_masks_labels_and_gradients(tiny_dir, synth):
    tok = D.load_tokenizer(tiny_dir)
    model = M.from_pretrained(str(tiny_dir), dtype=torch.float32)
    rec = D.read_conversations(synth / "train.json", synth / "images")[0]
    grads = {}
    for on in (True, False):
        cfg = replace(sft.Config(), question_loss=on, sq_r=1.0, image_size=48, max_length=512)  # every later turn asks
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


def test_bad_config_stops_with_clear_messages(tiny_dir, small_data, synth, tmp_path, capsys):
    for bad, msg in (["--nonsense=1"], "unrecognized arguments: --nonsense=1"), (["--micro_batch=two"], "invalid int value"):
        with pytest.raises(SystemExit):
            sft.parse_config(sft.Config, bad)
        assert msg in capsys.readouterr().err
    cfg = replace(sft.Config(), global_batch=10, micro_batch=4)
    with pytest.raises(ValueError, match="global_batch 10 is not divisible by micro_batch 4 x world size 1"):
        sft.fit(cfg, None, 100, None, None, [], str(tmp_path))
    with pytest.raises(ValueError, match="--train must be lora, projector or full"):
        sft.setup_trainable(M.from_pretrained(str(tiny_dir), dtype=torch.float32), replace(sft.Config(), train="both"))
    cfg, given = sft.parse_config(sft.Config, ["--no-question_loss", "--lr=0.5"])
    assert cfg.question_loss is False and cfg.lr == 0.5 and given == {"question_loss": False, "lr": 0.5}

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
    model = M.from_pretrained(str(tiny_dir), dtype=torch.float32)
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
        assert sup[-1] == int(b["attention_mask"][row].sum()) - 1  # ends at the last real token, not in padding
        want = sum(logits[row, t - 1, labels[t]].item() for t in sup)  # position t-1 predicts token t
        assert abs(got[row].item() - want) < 1e-4


def test_reference_equals_stage1_and_precomputed_and_loss_is_log2_at_start(tiny_dir, synth, tmp_path):
    tok = D.load_tokenizer(tiny_dir)
    pairs = hand_pair(tok, None, synth) * 4
    cfg = replace(dpo.Config(), model=str(tiny_dir), out_dir=str(tmp_path), global_batch=4, micro_batch=2, max_steps=1,
                  lr=0.0, vision_lr=0.0, projector_lr=0.0, precompute_ref=True, log_every=1)
    torch.manual_seed(0)
    model = dpo.train_step(cfg, pairs, tok, synth / "images", "cpu")  # lr 0: the policy stays the stage-1 model
    stored = torch.load(tmp_path / "ref_logps.pt")["logps"]
    base = M.from_pretrained(str(tiny_dir), dtype=torch.float32)
    b = dpo.encode_pair_batch(pairs[:2], tok, base.config, synth / "images", 48, 512, "cpu")
    with torch.no_grad():
        live = dpo.Reference(model).logps(b)
        plain = dpo.sequence_logps(base, b)
    assert torch.allclose(live, plain, atol=1e-5)  # the reference is exactly the stage-1 model
    assert torch.allclose(stored[:2].T.reshape(-1), live, atol=1e-5)  # and equals the precomputed log-probs
    log = read_log(tmp_path)
    assert abs(log[0]["loss"] - math.log(2)) < 1e-6 and log[0]["reward_acc"] == 0.0


def test_dpo_steps_resume_without_losing_or_repeating_work(tiny_dir, synth, tmp_path, monkeypatch):
    tok = D.load_tokenizer(tiny_dir)
    model = M.from_pretrained(str(tiny_dir), dtype=torch.float32)
    cfg = replace(dpo.Config(), model=str(tiny_dir), out_dir=str(tmp_path), n_questions=2, describe_tokens=4,
                  q_max_tokens=6, a_max_tokens=4, gen_batch=2)
    monkeypatch.setattr(dpo, "is_wellformed", lambda q: len(q) > 0)  # a random model asks nothing well-formed
    images = sorted(os.listdir(synth / "images"))[:6]
    full = tmp_path / "full.jsonl"
    dpo.generate_step(cfg, model, tok, images, synth / "images", str(full), "cpu")
    cut = tmp_path / "cut.jsonl"
    real_write = dpo.E.generate_text
    calls = {"n": 0}

    def flaky(*a, **k):  # die during the third batch
        calls["n"] += 1
        if calls["n"] == 2 * (cfg.n_questions + 2) + 3:
            raise KeyboardInterrupt
        return real_write(*a, **k)
    monkeypatch.setattr(dpo.E, "generate_text", flaky)
    with pytest.raises(KeyboardInterrupt):
        dpo.generate_step(cfg, model, tok, images, synth / "images", str(cut), "cpu")
    with open(cut, "a") as f:
        f.write('{"batch": 2, "torn')  # a line cut by the kill
    monkeypatch.setattr(dpo.E, "generate_text", real_write)
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
        dpo.judge_step(cfg1, rows, synth / "images", judge, str(tmp_path / "pairs.jsonl"))
    judge.score_fn = lambda f, q, a: (seen.append((q, a)), score(f, q, a))[1]
    dpo.judge_step(cfg1, rows, synth / "images", judge, str(tmp_path / "pairs.jsonl"))
    n_items = len({json.dumps([r["image"], r["question"], r["answers"]]) for r in rows})
    assert len(seen) <= 2 * n_items + 2  # two answers per item; at most the interrupted item is scored again
    before = len(seen)
    dpo.judge_step(cfg1, rows, synth / "images", judge, str(tmp_path / "pairs.jsonl"))
    assert len(seen) == before  # a third run is all cache
