"""Medical VQA evaluation: VQA-RAD, SLAKE (English), PathVQA and the synthetic set, scored exactly as the
papers score them (STLLaVA-Med §4.1 and Table 1, LLaVA-Med Table 3).

    python evaluate.py slake --pred answers.jsonl                       # score an existing answer file
    python evaluate.py slake --model ckpt/ [--adapter lora/] [--out answers.jsonl] [--batch_size 8]
    python evaluate.py slake --compare base.jsonl ours.jsonl            # paired difference, with its CI
    python evaluate.py vqa_rad --export_train train.json                # the train split, for sft.py --data

- Holds: the dataset loaders, LLaVA-Med's metric rules, answer files (LLaVA-Med's fields, appended per
  batch, fingerprinted: the same inputs resume, others are refused), bootstrap CIs, paired comparisons,
  and the train splits as conversation JSON.
- Metrics: LLaVA-Med's rules, quirks kept (metrics.py).
- Beyond the papers: run_eval.py's closed rule, a strict closed accuracy, 95% bootstrap CIs, paired ones.
- Prompt: the model's own template (checkpoint.template_of; `--template` overrides), e.g. LLaVA-1.5's
  `vicuna_v1` as STLLaVA-Med's `llava/eval/model_vqa.py --conv-mode llava_v1`, or LLaVA-Med v1.5's
  `mistral_instruct`. The question is sent as is (neither LLaVA-Med v1 nor STLLaVA-Med add an "answer yes
  or no" suffix); `--closed_suffix` appends one to CLOSED questions (using the ground-truth answer type).
  Differences from the authors: they decode at temperature 0.2 (ST, whose README says greedy) or sample at
  0.7 (LLaVA-Med v1), we decode greedily; ST's model_vqa.py does not pad images to square, we pad like
  training does (`--no_pad` for ST's way).
"""
import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import report as R
from metrics import normalize_word, score_item
import runs
from runs import UsageError, fail, identity

# -----------------------------------------------------------------------------
# Loaders: each returns [{"qid": str, "image": Path, "question", "answer", "answer_type": OPEN|CLOSED,
# "modality"?}], in the file's order. Ids are strings, so 12 and "12" match (VQA-RAD mixes the two).

DOWNLOAD = {
    "vqa_rad": "VQA-RAD from https://osf.io/89kps/ : VQA_RAD_Dataset_Public.json and the image folder "
               "(as images/ or 'VQA_RAD Image Folder/')",
    "slake": "SLAKE 1.0 from https://www.med-vqa.com/slake/ : test.json and imgs.zip unpacked as imgs/",
    "pathvqa": "PathVQA (github.com/UCSD-AI4H/PathVQA) as test.json, a list of {image_path, question, "
               "answer, answer_type} or LLaVA-Med's converted pvqa test.json, with its images",
    "synth": "nothing: leave --data out and synth.synth_data() generates it",
}


class DataError(UsageError):
    """Test data missing or not in the dataset's format: a one-line user error (exit code 2)."""


# the fields each format's loader reads (synth writes VQA-RAD's)
FIELDS = {"vqa_rad": ("qid", "image_name", "question", "answer", "answer_type"),
          "slake": ("qid", "img_name", "question", "answer", "answer_type", "q_lang", "modality"),
          "pathvqa": ("image_path", "question", "answer"), "llava_med": ("id", "image", "answer_type")}


def answer_type(t, answer):
    """'CLOSED'/'OPEN' from the files' spellings ('CLOSED ' in VQA-RAD train, 'CLOSE' in BioMed-VITAL)."""
    if t is None:  # PathVQA copies without the field: yes/no answers are the closed ones (our choice)
        return "CLOSED" if str(answer).strip().lower() in ("yes", "no") else "OPEN"
    t = str(t).strip().upper()
    if t in ("CLOSED", "CLOSE", "OPEN"):
        return "OPEN" if t == "OPEN" else "CLOSED"
    raise DataError(f"unknown answer_type {t!r}: expected OPEN or CLOSED")


def _qa(qid, image, question, answer, atype, **extra):
    return {"qid": str(qid), "image": Path(image), "question": str(question).strip(),
            "answer": str(answer).strip(), "answer_type": answer_type(atype, answer), **extra}


def _read_json(path, dataset):
    if not Path(path).is_file():
        raise DataError(f"{path} not found. Download {DOWNLOAD[dataset]}, into {Path(path).parent}/ "
                        "(or pass --data DIR)")
    try:
        with open(path) as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}): empty or cut short? Download {DOWNLOAD[dataset]}")
    if not isinstance(records, list) or not records:
        raise DataError(f"{path} holds no questions: expected a JSON list of {dataset} records")
    conv = isinstance(records[0], dict) and ("conversations" in records[0] or "conversatons" in records[0])
    fmt = "llava_med" if conv else "vqa_rad" if dataset == "synth" else dataset
    runs.check_format(records, path, FIELDS, fmt)
    return records, fmt


def _first_dir(root, names):
    return next((root / n for n in names if (root / n).is_dir()), root)


def load_llava_med(records, root):
    """LLaVA-Med's converted test JSON: id, image, conversations (human question, gpt answer), answer_type.
    run_eval_batch.py reads `conversatons` (sic) when `conversations` is absent; so do we."""
    images = _first_dir(root, ["images", "imgs"])
    out = []
    for r in records:
        conv = r.get("conversations", r.get("conversatons")) or [{}, {}]
        question = conv[0]["value"].replace("<image>", "").strip()
        out.append(_qa(r["id"], images / r["image"], question, conv[1]["value"], r["answer_type"]))
    return out


def dataset_file(name, data_dir=None, split="test"):
    """The JSON of `name`'s `split` in `data_dir` (a folder or a file in it; default data/<name> here; synth:
    generated). VQA-RAD's public JSON holds both splits."""
    if data_dir is None and name == "synth":
        from synth import synth_data
        data_dir = synth_data()
    root = Path(data_dir) if data_dir is not None else Path(__file__).resolve().parent / "data" / name
    if name == "vqa_rad" and root.is_dir() and (root / "VQA_RAD_Dataset_Public.json").exists():
        return root / "VQA_RAD_Dataset_Public.json"
    if root.is_file():
        return root if split == "test" or root.name.startswith("VQA_RAD") else root.with_name(f"{split}.json")
    return root / f"{split}.json"


def load_dataset(name, data_dir=None, check_images=True, split="test"):
    """The questions of `name`'s `split` (test or train) from `data_dir` (see dataset_file)."""
    path = dataset_file(name, data_dir, split)
    root = path.parent
    records, fmt = _read_json(path, name)
    if fmt == "llava_med":
        examples = load_llava_med(records, root)
    elif fmt == "vqa_rad":  # VQA-RAD's public JSON; the synthetic set writes the same fields
        images = _first_dir(root, ["images", "VQA_RAD Image Folder"])
        # phrase_type "test_freeform" and "test_para" are the test questions, "freeform" and "para" train's
        examples = [_qa(r["qid"], images / r["image_name"], r["question"], r["answer"], r["answer_type"],
                        question_type=r.get("question_type"), organ=r.get("image_organ"))
                    for r in records if r.get("phrase_type", "test").startswith("test") == (split == "test")]
    elif fmt == "slake":
        examples = [_qa(r["qid"], root / "imgs" / r["img_name"], r["question"], r["answer"], r["answer_type"],
                        modality=r["modality"], question_type=r.get("content_type"))
                    for r in records if r["q_lang"] == "en"]
    elif fmt == "pathvqa":  # the id is the record's index; image paths may be written with Windows "\\"
        examples = [_qa(i, root / r["image_path"].replace("\\", "/"), r["question"], r["answer"],
                        r.get("answer_type")) for i, r in enumerate(records)]
    if not examples:
        raise DataError(f"{path}: none of its {len(records)} records is a {split} question of {name}")
    missing = [str(e["image"]) for e in examples if check_images and not e["image"].is_file()]
    if missing:
        raise DataError(f"{len(missing)} image(s) missing, e.g. {missing[0]}. "
                        f"Download {DOWNLOAD[name]}, into {root}/")
    return examples

# -----------------------------------------------------------------------------
# Answer files: JSONL rows as LLaVA-Med's model_vqa.py writes them: question_id, prompt, text, answer_id,
# model_id, metadata (read: question_id and text, or `prediction`)
ANSWER_FIELDS = ("question_id", "prompt", "text", "model_id", "answer_id", "metadata")


def read_answers(path, examples=None, dataset="DATASET"):
    """[(question_id as str, text)] in file order; a bad line names its number. With `examples` (the whole
    test set), most ids must be its questions: another dataset's file would score as all missing."""
    if not os.path.isfile(path):
        fail(f"answer file {path} not found (`evaluate.py {dataset} --model DIR --out {path}` writes one)")
    rows = [(str(r["question_id"]), str(r.get("text", r.get("prediction"))))
            for r in runs.read_output_jsonl(path, ("question_id",), repair=False)]
    if examples is not None:
        runs.check_overlap(path, [q for q, _ in rows], [e["qid"] for e in examples],
                           f"{dataset} questions (another dataset's answers, or other --data?)")
    return rows


def match_answers(examples, rows):
    """Texts aligned with `examples` by id, plus a report. A missing id is scored as an empty answer (wrong),
    so the denominator stays the full test set; duplicates keep their first answer; unknown ids are ignored.
    All three are reported, never dropped silently (the official script just asserts equal id lists)."""
    first, dup = {}, []
    for qid, text in rows:
        if qid in first:
            dup.append(qid)
        else:
            first[qid] = text
    known = {e["qid"] for e in examples}
    missing = [e["qid"] for e in examples if e["qid"] not in first]
    unknown = [q for q in first if q not in known]
    report = {"n_missing": len(missing), "missing_ids": missing,
              "n_duplicate": len(dup), "duplicate_ids": dup,
              "n_unknown": len(unknown), "unknown_ids": unknown}
    return [first.get(e["qid"], "") for e in examples], report

# -----------------------------------------------------------------------------
# Scoring, bootstrap and report

HEADLINE = ("closed_accuracy", "open_recall", "open_f1", "closed_accuracy_strict")
# reported key -> (per-question score, answer type it averages over, or None for every question)
METRICS = {
    "closed_accuracy": ("closed", "CLOSED"), "closed_accuracy_run_eval": ("closed_run_eval", "CLOSED"),
    "closed_accuracy_strict": ("closed_strict", "CLOSED"), "open_recall": ("recall", "OPEN"),
    "open_precision": ("precision", "OPEN"), "open_f1": ("f1", "OPEN"), "open_accuracy": ("open_hit", "OPEN"),
    "exact_match_score": ("em_score", "OPEN"), "exact_match": ("exact", None),
}
LABELS = {
    "closed_accuracy": "Closed accuracy (papers; run_eval_batch.py)",
    "closed_accuracy_run_eval": "Closed accuracy (run_eval.py rule)",
    "closed_accuracy_strict": "Closed accuracy (strict, ours)", "open_recall": "Open recall (papers' Open)",
    "open_precision": "Open precision", "open_f1": "Open F1", "open_accuracy": "Open accuracy (gt substring)",
    "exact_match_score": "LLaVA-Med 'exact match score' (open)", "exact_match": "Exact match (all, ours)",
}


def score(examples, texts):
    """Per-question scores as arrays {score name: (N,)}, plus boolean masks for the answer types."""
    items = [score_item(t, e["answer"]) for e, t in zip(examples, texts)]
    s = {k: np.array([it[k] for it in items], dtype=float) for k in items[0]} if items else {}
    for t in ("CLOSED", "OPEN"):
        s[t] = np.array([e["answer_type"] == t for e in examples], dtype=bool)
    return s


def summarize(s, keep=None):
    """Metrics in percent (macro over questions, as the official scripts average), over rows `keep`."""
    keep = np.ones(len(s["OPEN"]), bool) if keep is None else keep
    out = {"n": int(keep.sum()), "n_closed": int((keep & s["CLOSED"]).sum()),
           "n_open": int((keep & s["OPEN"]).sum())}
    for key, (col, atype) in METRICS.items():
        rows = keep & s[atype] if atype else keep
        # None: no question of that type
        out[key] = round(100 * float(s[col][rows].mean()), 4) if rows.any() else None
    return out


def bootstrap(values, n, seed):
    """95% percentile interval of the mean x100, resampling questions with replacement (seeded)."""
    if n <= 0 or len(values) == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, len(values), size=(n, len(values)))
    lo, hi = np.percentile(100 * values[idx].mean(1), [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def confidence_intervals(s, n, seed):
    """A CI for each headline number, each resampled within its own answer type."""
    return {k: bootstrap(s[METRICS[k][0]][s[METRICS[k][1]]], n, seed) for k in HEADLINE}


def _fmt(x, width=7):
    return f"{x:{width}.2f}" if x is not None else f"{'-':>{width}}"


def report(name, examples, texts, match, n_boot=1000, seed=0):
    """Print the table; return the result dict (the caller prints it as the last JSON line)."""
    s = score(examples, texts)
    res = {"dataset": name, **summarize(s), "ci": confidence_intervals(s, n_boot, seed), **match}
    print(f"\n{name}: {res['n']} questions ({res['n_closed']} closed, {res['n_open']} open)")
    for key in METRICS:
        ci = res["ci"].get(key)
        print(f"  {LABELS[key]:<44} {_fmt(res[key])}"
              + (f"   95% CI [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
    if any("modality" in e for e in examples):  # SLAKE: by imaging modality
        mods = sorted({e.get("modality", "?") for e in examples})
        res["by_modality"] = {m: summarize(s, np.array([e.get("modality", "?") == m for e in examples]))
                              for m in mods}
        print(f"\n  {'modality':<10}{'n_closed':>9}{'n_open':>8}"
              f"{'closed':>9}{'strict':>9}{'recall':>9}{'f1':>9}")
        for m, r in res["by_modality"].items():
            print(f"  {m:<10}{r['n_closed']:>9}{r['n_open']:>8}" + "".join(f"{_fmt(r[k], 9)}" for k in
                  ("closed_accuracy", "closed_accuracy_strict", "open_recall", "open_f1")))
    for what in ("missing", "duplicate", "unknown"):
        if ids := match.get(f"{what}_ids"):
            print(f"  WARNING: {len(ids)} {what} question id(s): {', '.join(ids[:10])}"
                  + " ..." * (len(ids) > 10) + (" (scored as empty answers)" if what == "missing" else ""))
    return res


def compare(examples, texts_a, texts_b, n_boot=1000, seed=0):
    """Paired difference B - A on each headline metric; both files' scores resampled with the same indices."""
    a, b = score(examples, texts_a), score(examples, texts_b)
    sa, sb = summarize(a), summarize(b)
    out = {}
    for key in HEADLINE:
        col, atype = METRICS[key]
        d = b[col][a[atype]] - a[col][a[atype]]  # (n,) per-question differences on the same questions
        if len(d) == 0:
            continue
        ci = bootstrap(d, n_boot, seed)
        out[key] = {"a": sa[key], "b": sb[key], "diff": round(100 * float(d.mean()), 4), "ci": ci}
        print(f"  {LABELS[key]:<44} A {sa[key]:7.2f}  B {sb[key]:7.2f}  B-A {out[key]['diff']:+7.2f}"
              + (f"   95% CI [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""))
    return out

# The synthetic default's scorecard: each stage's per-question scores, then one table with paired intervals.
# Scale: percent for rates, plain means for the judge's 1-10 score and the findings' counts.
STAGE_METRICS = {"closed_accuracy": 100, "open_recall": 100, "open_f1": 100, "judge_score": 1,
                 "hallucinations": 1, "wellformed_questions": 100}


def synth_stage(model, tokenizer, synth, out, sampling, n_images=200, n_boot=1000):
    """Score a model on the synthetic test: greedy answers (written to `out`) under the papers' rules and the
    oracle judge (its 1-10 score, wrong unasked findings), and the share of well-formed questions it asks,
    sampled at stage 2's settings (`sampling`: temperature, top_k, top_p, seed) about `n_images` test
    images, twice each. Returns {metric: per-question array}."""
    import torch
    import synth as S
    from data import ask_questions
    examples = load_dataset("synth", str(synth))
    if os.path.exists(out):
        os.remove(out)  # another model's answers, or this one's from an earlier run: answer afresh
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    evaluate_model(model, tokenizer, "synth", str(synth), out, n_boot=n_boot)
    texts, _ = match_answers(examples, read_answers(out))
    facts = json.loads((Path(synth) / "facts.json").read_text())
    f = [facts[Path(e["image"]).name] for e in examples]
    s = score(examples, texts)
    images = sorted({e["image"] for e in examples})[:n_images]
    g = torch.Generator(model.lm_head.weight.device).manual_seed(sampling["seed"])
    kw = dict(temperature=sampling["temperature"], top_k=sampling["top_k"], top_p=sampling["top_p"])
    asked = ask_questions(model, tokenizer, images * 2, model.config.vision.image_size, generator=g, **kw)
    return {"closed_accuracy": s["closed"][s["CLOSED"]], "open_recall": s["recall"][s["OPEN"]],
            "open_f1": s["f1"][s["OPEN"]],
            "judge_score": np.array([S.score_answer(x, e["question"], t)
                                     for x, e, t in zip(f, examples, texts)]),
            "hallucinations": np.array([S.hallucinations(x, e["question"], t)
                                        for x, e, t in zip(f, examples, texts)], float),
            "wellformed_questions": np.array([S.parse_question(q) is not None for q in asked], float),
            "questions": asked}


def stage_table(stages, n_boot=1000, seed=0):
    """Print and return each stage's metrics with 95% intervals and the paired difference to the stage before
    (questions resampled with the same indices; sampled questions paired by image and draw)."""
    names = list(stages)
    table = {}
    print(f"\n{'synthetic test':22}" + "".join(f"{n:>24}" + (f"{'vs before':>24}" if i else "")
                                             for i, n in enumerate(names)))
    for key, scale in STAGE_METRICS.items():
        row = {}
        line = f"{key:22}"
        for i, name in enumerate(names):
            v = np.asarray(stages[name][key], float)
            ci = bootstrap(v * scale / 100, n_boot, seed)
            row[name] = {"mean": round(scale * float(v.mean()), 4), "ci": ci}
            line += f"{row[name]['mean']:8.2f} [{ci[0]:6.2f},{ci[1]:6.2f}] "
            if i:
                d = v - np.asarray(stages[names[i - 1]][key], float)
                dci = bootstrap(d * scale / 100, n_boot, seed)
                row[f"{name} - {names[i - 1]}"] = {"diff": round(scale * float(d.mean()), 4), "ci": dci}
                line += f"{scale * d.mean():+8.2f} [{dci[0]:+6.2f},{dci[1]:+6.2f}] "
        table[key] = row
        print(line)
    return table


def synth_scorecard(policy, tokenizer, stage1, out_dir, synth, device, seed=0):
    """The synthetic default's table after stage 2 (dpo.py): the base and stage 1 from sft.py's scorecard
    beside the stage-1 model (when made with it; else stage 1 is scored here) and the stage-2 policy, with
    paired intervals; out_dir/scorecard.json and out_dir/report.html."""
    import synth as S
    sampling = dict(S.QUESTION_SAMPLING, seed=seed)
    sft_dir = os.path.dirname(os.path.abspath(stage1))
    before, card = os.path.join(sft_dir, "answers_stage1.jsonl"), os.path.join(sft_dir, "scorecard.json")
    card = json.load(open(card)) if os.path.exists(card) and os.path.exists(before) else {}
    if card.get("model") == identity(stage1):
        stages = card["stages"]
    else:
        from checkpoint import from_pretrained
        print(f"no scorecard of {stage1} beside it: scoring stage 1 here")
        model = from_pretrained(stage1, dtype=policy.lm_head.weight.dtype, device=device).eval()
        before = os.path.join(out_dir, "answers_stage1.jsonl")
        stages = {"stage 1": synth_stage(model, tokenizer, synth, before, sampling)}
    after = os.path.join(out_dir, "answers_stage2.jsonl")
    stages["stage 2"] = synth_stage(policy, tokenizer, synth, after, sampling)
    table = stage_table(stages)
    with open(os.path.join(out_dir, "scorecard.json"), "w") as f:
        json.dump({"model": identity(os.path.join(out_dir, "merged")), "table": table}, f)
    stage_report(out_dir, synth, before, after, Path(stage1).parent / "log.jsonl")


def stage_report(out_dir, synth, before, after, stage1_log):
    """out_dir/report.html for the synthetic run: the test questions whose answers changed between two
    answer files (stage 1 -> stage 2), and stage 1's training curves (its log.jsonl)."""
    examples = load_dataset("synth", str(synth))
    ta, _ = match_answers(examples, read_answers(before))
    tb, _ = match_answers(examples, read_answers(after))
    diff = compare(examples, ta, tb)
    scores = (score(examples, ta), score(examples, tb))
    changed = R.comparison(diff, examples, (ta, tb), scores, LABELS, ("stage 1", "stage 2"))
    stage1 = R.training_curves(stage1_log, "Stage 1 training curves")
    R.write_run(out_dir, [changed[0], stage1], changed[1:])
    print(json.dumps({"difference": diff}))

# -----------------------------------------------------------------------------
# Answering with a model: batched greedy decoding (data.generate_text), written as it goes


def answer(examples, model_path, out, vision_path=None, adapter=None, batch_size=8, max_new_tokens=1024,
           closed_suffix="", pad=True, device=None, dtype=None, template=None):
    """Load a checkpoint (and adapter) and answer every question not yet in `out`."""
    import torch
    from data import load_tokenizer
    from checkpoint import from_pretrained
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    model = from_pretrained(model_path, vision_path, dtype=dtype, device=device)
    if adapter:
        import lora
        # merged: plain Linear layers decode faster
        model = lora.merge_lora(lora.load_adapter(model, adapter))
    answer_with(model, load_tokenizer(model_path), examples, out, batch_size, max_new_tokens, closed_suffix,
                pad, model_id=os.path.basename(os.path.normpath(model_path)), template=template)


def forward_passes(reply_tokens, max_new_tokens):
    """Forward passes one batch's generate ran: the prefill yields the first token and each decode step one
    more, until every row has written EOS (the longest reply + 1) or max_new_tokens columns are full."""
    return min(max(reply_tokens, default=0) + 1, max_new_tokens)


def answer_with(model, tokenizer, examples, out, batch_size=8, max_new_tokens=1024, closed_suffix="",
                pad=True, model_id="model", template=None, rank=0, world=1):
    """Answer every question not yet in `out` (JSONL, appended and fsync'd per batch, so reruns resume), with
    `template` (default the model's own, `model.template`). Over `world` ranks, rank r answers examples r,
    r + world, ... into its own part (out.rank{r}, resumable the same way), joined by `merge_answers`."""
    import torch
    from checkpoint import default_template
    from data import generate_text, preprocess_image
    template = template or getattr(model, "template", None) or default_template(model.config.text.model_type)
    size = model.config.vision.image_size
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    mine = examples[rank::world]
    path = out if world == 1 else f"{out}.rank{rank}"
    # read once; a torn last line (a kill mid-write) is cut off (not in `out`, which another rank may rewrite)
    done = {str(r["question_id"]) for p in {path, out} for r in runs.read_output_jsonl(p, ("question_id",),
                                                                                        p == path)}
    todo = [e for e in mine if e["qid"] not in done]
    print(f"{len(mine) - len(todo)} of {len(mine)} already answered in {path}", file=sys.stderr)
    t0 = time.time()
    n_tok = 0
    n_steps = 0
    with open(path, "a") as f:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            questions = [e["question"] + (closed_suffix if e["answer_type"] == "CLOSED" else "")
                         for e in batch]
            convs = [[{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": None}]
                     for q in questions]
            pixels = torch.stack([preprocess_image(e["image"], size=size, pad_to_square=pad) for e in batch])
            texts = generate_text(model, tokenizer, convs, pixels, template, max_new_tokens)
            # reply lengths re-encoded from the text (generate_text returns text): exact up to the strip
            lengths = [len(tokenizer.encode(t, add_special_tokens=False).ids) for t in texts]
            n_tok += sum(lengths) + len(batch)  # + EOS
            # LLaVA-Med model_vqa.py's fields; its answer_id is a shortuuid, ours a hash of the row, so the
            # same answers give the same file
            rows = [[e["qid"], q, t, model_id] for e, q, t in zip(batch, questions, texts)]
            sha = [hashlib.sha256(json.dumps(r).encode()).hexdigest()[:22] for r in rows]
            runs.append_jsonl(f, [dict(zip(ANSWER_FIELDS, r + [h, {}])) for r, h in zip(rows, sha)])
            # each forward pass (prefill, then one per decode step) reads every weight once (gpt-fast's
            # "bandwidth achieved"); the KV cache reads are left out, so this is a lower bound
            n_steps += forward_passes(lengths, max_new_tokens)
            dt = time.time() - t0
            k = i + len(batch)
            print(f"[{k}/{len(todo)}] {n_tok / dt:.1f} tok/s, {weight_bytes * n_steps / dt / 1e9:.2f} GB/s "
                  f"of weights ({n_steps} forward passes = prefill + decode steps taken, each reading "
                  f"{weight_bytes / 1e9:.2f} GB), ETA {dt / k * (len(todo) - k):.0f}s", file=sys.stderr)


def merge_answers(examples, out):
    """Once every rank has answered: the answers of `out` and of its parts (out.rank*), one per question, in
    the test set's order, written atomically into `out`; then the parts removed (runs.merge_parts)."""
    runs.merge_parts(out, "question_id", [e["qid"] for e in examples])


def evaluate_model(model, tokenizer, dataset, data_dir=None, out="answers.jsonl", batch_size=32,
                   max_new_tokens=32, n_boot=1000, seed=0, rank=0, world=1, group=None):
    """Answer a test set with an in-memory model and score it: the result dict of `report`. Over `world`
    ranks the answering is sharded (`answer_with`); after a barrier (on `group`) rank 0 merges the parts
    and scores; the other ranks return None."""
    examples = load_dataset(dataset, data_dir)
    answer_with(model, tokenizer, examples, out, batch_size, max_new_tokens, rank=rank, world=world)
    if world > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier(group=group)
        if rank != 0:
            return None
        merge_answers(examples, out)
    texts, match = match_answers(examples, read_answers(out))
    return report(dataset, examples, texts, match, n_boot, seed)

# -----------------------------------------------------------------------------
# Downstream fine-tuning (LLaVA-Med's last stage): a train split as LLaVA conversation JSON


def export_train(name, data_dir, out):
    """Write `name`'s train split as LLaVA-Med's per-dataset fine-tuning data, one record per question: {id,
    image (relative to the --image_dir printed), answer_type, conversations: [human "<image>\\n<question>",
    gpt "<answer>"]}, the one-turn form of LLaVA-Med's converted test.json. A train question with the same
    image file and normalised question as a test question is a leak, dropped and counted (VQA-RAD's splits
    share images, so an image alone is no leak)."""
    if name == "synth":
        fail("--export_train: the synthetic train split is conversation JSON already (synth.py's train.json)")
    key = lambda e: (str(e["image"]), normalize_word(e["question"].lower()))  # noqa: E731
    train = load_dataset(name, data_dir, check_images=False, split="train")
    test = {key(e) for e in load_dataset(name, data_dir, check_images=False)}
    kept = [e for e in train if key(e) not in test]
    image_dir = os.path.commonpath([str(e["image"].parent) for e in kept])
    turns = lambda e: [{"from": "human", "value": "<image>\n" + e["question"]},  # noqa: E731
                       {"from": "gpt", "value": e["answer"]}]
    runs.replace_text(out, json.dumps([{"id": e["qid"], "image": os.path.relpath(e["image"], image_dir),
                                        "answer_type": e["answer_type"], "conversations": turns(e)}
                                       for e in kept], indent=1))
    print(f"{out}: {len(kept)} {name} train questions; dropped {len(train) - len(kept)} that are test "
          f"questions too (same image and normalised question). Train: python sft.py --data={out} "
          f"--image_dir={image_dir}")
    return {"n": len(kept), "n_dropped": len(train) - len(kept), "image_dir": image_dir}

# -----------------------------------------------------------------------------
# Command line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", choices=["vqa_rad", "slake", "pathvqa", "synth"])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--pred", help="score this answer file (JSONL: question_id, text)")
    what.add_argument("--model", help="answer with this checkpoint directory, then score")
    what.add_argument("--compare", nargs=2, metavar=("A", "B"), help="paired difference B - A of two files")
    what.add_argument("--export_train", metavar="JSON",
                      help="write the train split, less test questions, as conversation JSON for sft.py")
    ap.add_argument("--data", help="dataset directory or test JSON (default data/<dataset>)")
    ap.add_argument("--vision_path", help="local CLIP checkpoint, if the model directory has no vision tower")
    ap.add_argument("--adapter", help="LoRA adapter directory (PEFT layout) applied on top of --model")
    ap.add_argument("--out", help="answer file to write (default answers-<dataset>.jsonl)")
    ap.add_argument("--overwrite", action="store_true", help="answer afresh, whatever --out holds")
    ap.add_argument("--batch_size", type=int, default=8, help="questions per generation call (default 8)")
    ap.add_argument("--max_new_tokens", type=int, default=1024,
                    help="new tokens an answer may take (default 1024, the authors')")
    ap.add_argument("--limit", type=int, help="only the first N >= 1 test questions (answering and scoring)")
    ap.add_argument("--closed_suffix", default="", help='for CLOSED questions, e.g. " Answer yes or no."')
    ap.add_argument("--no_pad", action="store_true", help="centre-crop images instead of padding to square")
    ap.add_argument("--device", help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on cuda")
    ap.add_argument("--template", help="prompt template, a data.TEMPLATES key (default the model's own)")
    ap.add_argument("--bootstrap", type=int, default=1000,
                    help="resamples for the 95%% CIs (default 1000; 0: none)")
    ap.add_argument("--seed", type=int, default=0, help="the bootstrap's seed (default 0)")
    ap.add_argument("--json", help="also write the result JSON here")
    ap.add_argument("--report", help="also write an HTML report here (report.py), with a per-question JSONL")
    args = ap.parse_args(argv)
    runs.at_least(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit)
    runs.at_least(0, bootstrap=args.bootstrap)
    if args.export_train:
        return export_train(args.dataset, args.data, args.export_train)
    if args.model:  # everything answering needs is checked before a weight is read
        from data import TEMPLATES
        if args.template and args.template not in TEMPLATES:
            fail(f"--template={args.template}: unknown; valid: {', '.join(TEMPLATES)}")
        device = str(runs.check_device(args.device))
        runs.check_model_dir(args.model, "--model", args.adapter, args.vision_path)
        dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    every = load_dataset(args.dataset, args.data, check_images=args.model is not None)
    examples = every[:args.limit] if args.limit else every
    if args.compare:
        (ta, ma), (tb, mb) = (match_answers(examples, read_answers(p, every, args.dataset))
                              for p in args.compare)
        print(f"\n{args.dataset}: {args.compare[1]} (B) vs {args.compare[0]} (A), {len(examples)} questions")
        res = dict(dataset=args.dataset, a=ma, b=mb, **compare(examples, ta, tb, args.bootstrap, args.seed))
        if args.report:
            scores = (score(examples, ta), score(examples, tb))
            R.write_comparison(args.report, res, examples, (ta, tb), scores, LABELS, args.compare)
    else:
        pred = args.pred
        if args.model:  # the answer file records what made it: the same inputs resume it, others are refused
            pred = args.out or f"answers-{args.dataset}.jsonl"
            fp = runs.fingerprint(model=identity(args.model), adapter=identity(args.adapter), dtype=dtype,
                                  vision_path=identity(args.vision_path), dataset=args.dataset,
                                  data=identity(str(dataset_file(args.dataset, args.data))),
                                  template=args.template or "the model's own", pad=not args.no_pad,
                                  max_new_tokens=args.max_new_tokens, closed_suffix=args.closed_suffix)
            runs.start_or_resume(pred, fp, args.overwrite, "--overwrite (or another --out)")
            runs.print_settings({**vars(args), "out": pred, "device": device, "dtype": dtype})
            answer(examples, args.model, pred, args.vision_path, args.adapter, args.batch_size,
                   args.max_new_tokens, args.closed_suffix, not args.no_pad, device, dtype, args.template)
        texts, match = match_answers(examples, read_answers(pred, every, args.dataset))
        res = report(args.dataset, examples, texts, match, args.bootstrap, args.seed)
        if args.report:
            R.write_evaluation(args.report, res, examples, texts, score(examples, texts), summarize, LABELS)
    line = json.dumps(res)
    if args.json:
        Path(args.json).write_text(line + "\n")
    print(line)  # the last line of stdout: one JSON object
    return res


if __name__ == "__main__":
    runs.run_main(main)
