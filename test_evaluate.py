# ----------------------------------------------------------------------------- evaluate.py
# Metrics: hand-worked cases whose expected values are derived here from LLaVA-Med's definitions
# (eval_metrics/glossary.py, evaluate_metrics.py @ b9a98a7), not copied from our output.
# Data: the real VQA-RAD / SLAKE test sets in ../shared/data (skipped when absent).
import copy
import json
import random
from pathlib import Path

import pytest
from PIL import Image

import evaluate as E

SHARED = Path(__file__).resolve().parent.parent / "shared" / "data"
need_data = pytest.mark.skipif(not (SHARED / "slake" / "test.json").exists() or
                               not (SHARED / "vqa_rad" / "VQA_RAD_Dataset_Public.json").exists(),
                               reason=f"real VQA-RAD/SLAKE test sets not found at {SHARED} (see shared/data/README.md)")


def last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def write_answers(path, pairs):
    with open(path, "w") as f:
        for qid, text in pairs:
            f.write(json.dumps({"question_id": qid, "text": text}) + "\n")

# --- metric rules, by hand ------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("3.5 cm. x-ray (ct)", "3.5 cm x ray ct"),  # " (" has a space -> "(" removed; ")" and "-" -> space; "cm." loses its dot
    ("x-ray - ct", "xray ct"),         # one spaced "-" in the ORIGINAL string makes every "-" vanish: "x-ray" -> "xray"
    ("ct(mr/(", "ct mr"),              # "/" -> space puts " (" in the EDITED string only; the test reads the original,
                                       # so "(" still becomes a space (testing the edited string would give "ctmr")
    ("1,000 x-ray", "1000 xray"),      # a digit,digit anywhere: every punctuation mark is removed, not spaced
    ("left/right", "left right"),      # no space next to "/": it becomes a space
    ("Is it? Yes!", "is it yes"),      # "? " has a space -> "?" removed; "!" has none -> a space, stripped by split
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
    assert E.normalize_word(raw.lower()) == expected


def test_period_limit_is_32():
    # re.UNICODE (=32) is passed as `count`: only the first 32 periods not followed by a digit go
    s = " ".join(["x."] * 40)
    assert E.normalize_word(s).count(".") == 40 - 32


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
    assert E.calculate_f1score(pred.lower(), gt.lower()) == pytest.approx(prf(tp, fp, fn))


def test_empty_prediction_scores_zero():
    s = E.score_item("", "yes")
    assert (s["closed"], s["closed_run_eval"], s["closed_strict"], s["f1"], s["recall"], s["em_score"]) == (0,) * 6
    assert E.calculate_f1score("lung", "the") == (0.0, 0.0, 0.0)  # a gt that normalises to nothing scores 0 too


def test_exact_match_score():
    # distinct gt words present in the prediction / number of prediction words
    assert E.calculate_exactmatch("left lung left", "left lung") == pytest.approx(2 / 3)
    assert E.calculate_exactmatch("lung", "left lung lung") == pytest.approx(1 / 1)
    assert E.score_item("The Lung.", "lung")["exact"] == 1.0 and E.score_item("lungs", "lung")["exact"] == 0.0


@pytest.mark.parametrize("pred, gt, official, run_eval, strict", [
    ("normal", "no", 1, 1, 0),       # the substring quirk: "no" is inside "normal"
    ("the eyes", "yes", 1, 1, 0),    # "yes" inside "eyes"
    ("Yes, it is.", "yes", 1, 1, 1),
    ("No, there is no mass.", "yes", 0, 0, 0),  # "yes" nowhere
    ("There is no mass", "no", 1, 1, 0),  # official hit; strict wants the answer to lead with it
    ("liver", "liver", 1, 0, 1),     # run_eval.py also needs "yes"/"no" somewhere: a non-yes/no closed answer fails
    ("the liver or the heart", "liver", 1, 0, 1),  # whole word for non-yes/no gt in the strict rule
    ("livers", "liver", 1, 0, 0),    # substring hit, not a whole word
    ("", "no", 0, 0, 0),
])
def test_closed_rules(pred, gt, official, run_eval, strict):
    s = E.score_item(pred, gt)
    assert (s["closed"], s["closed_run_eval"], s["closed_strict"]) == (official, run_eval, strict)

# --- loaders on the real data ---------------------------------------------------------------------------------


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
    (tmp_path / "test.json").write_text(json.dumps([{"qid": 1, "img_name": "xmlab1/source.jpg", "question": "q",
                                                     "answer": "yes", "q_lang": "en", "answer_type": "CLOSED",
                                                     "modality": "CT"}]))
    with pytest.raises(E.DataError, match="1 image"):
        E.load_dataset("slake", tmp_path)
    assert len(E.load_dataset("slake", tmp_path, check_images=False)) == 1  # --pred needs no images


def test_pathvqa_and_synth_loaders(tmp_path):
    (tmp_path / "images" / "test").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "test" / "p0.jpg")
    recs = [{"image_path": "images\\test\\p0.jpg", "question": "is it?", "answer": "yes", "answer_type": "CLOSED"},
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
    conv = [{"id": e["qid"], "image": str(e["image"].relative_to(SHARED / "slake" / "imgs")), "answer_type": e["answer_type"],
             "conversations": [{"from": "human", "value": e["question"] + "\n<image>"}, {"from": "gpt", "value": e["answer"]}]}
            for e in ex]
    (tmp_path / "test.json").write_text(json.dumps(conv))
    (tmp_path / "imgs").symlink_to(SHARED / "slake" / "imgs")
    got = E.load_dataset("slake", tmp_path)
    key = lambda e: (e["qid"], e["question"], e["answer"], e["answer_type"], e["image"].name)
    assert [key(e) for e in got] == [key(e) for e in ex]

# --- scoring files ----------------------------------------------------------------------------------------------


@need_data
@pytest.mark.parametrize("name", ["vqa_rad", "slake"])
def test_ground_truth_scores_100(name, tmp_path, capsys):
    ex = E.load_dataset(name, SHARED / name, check_images=False)
    write_answers(tmp_path / "gt.jsonl", [(e["qid"], e["answer"]) for e in ex])
    res = E.main([name, "--pred", str(tmp_path / "gt.jsonl"), "--data", str(SHARED / name), "--bootstrap", "50",
                  "--json", str(tmp_path / "r.json")])
    assert last_json(capsys) == json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(res))
    for k in ("closed_accuracy", "closed_accuracy_strict", "open_recall", "open_f1", "open_precision", "exact_match"):
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
    assert same["closed_accuracy"]["diff"] == 0 and same["closed_accuracy"]["ci"] == [0.0, 0.0]  # paired: no noise
    res = E.main(["vqa_rad", "--compare", str(tmp_path / "no.jsonl"), str(tmp_path / "gt.jsonl")] + data)
    closed = [e for e in ex if e["answer_type"] == "CLOSED"]
    always_no = 100 * sum(E.normalize_word(e["answer"].lower()) in "no" for e in closed) / len(closed)
    d = res["closed_accuracy"]
    assert d["a"] == pytest.approx(always_no, abs=1e-3) and d["diff"] == pytest.approx(100 - always_no, abs=1e-3)
    assert d["ci"][0] < d["diff"] < d["ci"][1]
    assert "closed_accuracy" in last_json(capsys)

# --- end to end: a tiny random model answers 20 real SLAKE questions -----------------------------------------


@need_data
def test_tiny_model_end_to_end(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    M = pytest.importorskip("model")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    ex = E.load_dataset("slake", SHARED / "slake")[:20]
    tok = Tokenizer(models.BPE())  # byte-level BPE with LLaMA's special-token layout, "<image>" = 3 as in "tiny"
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([E.SYSTEM] + [e["question"] + " " + e["answer"] for e in ex], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<image>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    cfg = copy.deepcopy(M.CONFIGS["tiny"])
    cfg.text.vocab_size, cfg.image_token_id = tok.get_vocab_size(), tok.token_to_id("<image>")
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    M.save_pretrained(M.Llava(cfg), str(ckpt))
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
    scored = E.main(["slake", "--pred", str(out), "--data", str(SHARED / "slake"), "--limit", "20", "--bootstrap", "0"])
    assert scored == res and last_json(capsys) == json.loads(json.dumps(res))
    # resumable: a run killed mid-write leaves a torn line; the rerun drops it and answers only what is missing
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:17]) + lines[17][:15])
    E.main(run)
    assert out.read_text().splitlines(keepends=True)[:17] == lines[:17]
    assert [json.loads(line)["question_id"] for line in out.read_text().splitlines()] == [e["qid"] for e in ex]
