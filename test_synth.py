"""Tests of the synthetic "toy radiology" default (synth_draft.py; merged into data.py later)."""
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer

import synth_draft as synth  # after the merge: import data as synth

FACT_KEYS = {"modality", "organ", "count", "side", "size"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synth.synth_data(tmp_path_factory.mktemp("cache"), seed=0)


def load(root, name):
    return json.loads((root / name).read_text())


def all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_per_seed(root, tmp_path):
    again = all_files(synth.synth_data(tmp_path / "a", seed=0))
    assert again == all_files(root)  # same bytes, tokenizer.json and PNGs included
    other = all_files(synth.synth_data(tmp_path / "b", seed=1))
    assert other.keys() == again.keys()
    assert other["train.json"] != again["train.json"] and other["images/synth_test_00000.png"] != again["images/synth_test_00000.png"]


def test_cache_idempotent_and_crash_safe(tmp_path, monkeypatch):
    monkeypatch.setenv("STLLAVA_CACHE", str(tmp_path))
    def crash(root, seed):
        (root / "train.json").write_text("[")  # half-written, then the process dies
        raise RuntimeError("boom")
    monkeypatch.setattr(synth, "_synth_generate", crash)
    with pytest.raises(RuntimeError):
        synth.synth_data(seed=3)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left to be mistaken for a dataset
    monkeypatch.undo()
    monkeypatch.setenv("STLLAVA_CACHE", str(tmp_path))
    path = synth.synth_data(seed=3)
    assert path.parent == tmp_path and path.name == f"{synth.SYNTH_VERSION}-seed3"
    stamp = (path / "train.json").stat().st_mtime_ns
    monkeypatch.setattr(synth, "_synth_generate", crash)  # a second call must not regenerate
    assert synth.synth_data(seed=3) == path and (path / "train.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_files_have_the_real_data_forms(root):
    facts, train, caps, test = (load(root, f) for f in ("facts.json", "train.json", "captions.json", "test.json"))
    names = sorted(p.name for p in (root / "images").iterdir())
    assert names == sorted(facts) and all(set(f) == FACT_KEYS for f in facts.values())
    assert sum("_train_" in n for n in names) == 800 and sum("_test_" in n for n in names) == 100
    for n in names[:: 50]:
        img = Image.open(root / "images" / n)
        assert img.mode == "L" and img.size == (synth.SYNTH_IMAGE_SIZE,) * 2
    assert len(train) == 1600 and len({r["id"] for r in train}) == len(train)
    for r in train:  # LLaVA conversation JSON
        assert set(r) == {"id", "image", "conversations"} and "_train_" in r["image"]
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and 3 <= len(turns) // 2 <= 4
        assert turns[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in turns) == 1
    assert len(caps) == 800 and all(c["conversations"][0]["value"] == "<image>\n" + synth.CAPTION_INSTRUCTION for c in caps)
    assert len(test) == 400 and {r["qid"] for r in test} == set(range(400))
    for r in test:  # VQA-RAD's fields
        assert set(r) >= {"qid", "image_name", "question", "answer", "answer_type", "phrase_type"}
        assert r["phrase_type"] == "test_freeform" and r["answer_type"] in ("CLOSED", "OPEN") and "_test_" in r["image_name"]
    assert Counter(r["answer_type"] for r in test) == {"CLOSED": 200, "OPEN": 200}
    assert load(root, "config.json")["image_size"] == 48


def test_parser_reads_back_every_question_and_answer(root):
    facts, train, caps, test = (load(root, f) for f in ("facts.json", "train.json", "captions.json", "test.json"))
    kind_of = {"MODALITY": "modality", "ORGAN": "organ", "PRES": "lesion", "COUNT": "count", "POS": "side", "SIZE": "size"}
    for r in test:
        f, q = facts[r["image_name"]], synth.parse_question(r["question"])
        assert q["type"] == kind_of[r["question_type"]] and q["closed"] == (r["answer_type"] == "CLOSED")
        assert synth.answer_question(f, r["question"]) == r["answer"]
        if q["closed"]:
            assert synth.parse_answer(r["answer"]) == {"yesno": r["answer"]}
            assert synth.synth_truth(f, q["type"], q["value"]) == (r["answer"] == "yes")
        else:
            assert synth.parse_answer(r["answer"]) == {q["type"]: f[q["type"]]}
    for r in train:
        f, turns = facts[r["image"]], r["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            question = human["value"].removeprefix("<image>\n")
            if question == synth.DESCRIBE:
                assert synth.parse_question(question) is None
                stated = synth.parse_answer(gpt["value"])
                assert stated == {k: v for k, v in f.items() if v != "none"}  # a caption states every fact
            else:
                assert synth.parse_question(question) is not None and synth.answer_question(f, question) == gpt["value"]
    for c in caps:
        assert synth.parse_answer(c["conversations"][1]["value"]) == {k: v for k, v in facts[c["image"]].items() if v != "none"}


def test_parse_question_is_tolerant_but_strict():
    assert synth.parse_question("  IS this an  MRI scan?\n") == {"type": "modality", "closed": True, "value": "mri"}
    assert synth.parse_question("How many lesions are there? ") == {"type": "count", "closed": False, "value": None}
    assert synth.parse_question("Is the lesion count 2?")["value"] == 2
    for bad in ["", "Is this a pet scan?", "What organ is shown", "What organ is shown? yes", "Is the lesion huge?",
                "Can you describe the image in detail?", "What organ is is shown?", "Is this a ct scan? Is this a ct scan?"]:
        assert synth.parse_question(bad) is None, bad


def test_answer_question_by_hand():
    two = {"modality": "x-ray", "organ": "abdomen", "count": 2, "side": "both", "size": "large"}
    none = {"modality": "mri", "organ": "chest", "count": 0, "side": "none", "size": "none"}
    cases = [(two, "Is this an x-ray scan?", "yes"), (two, "Is the modality ct?", "no"), (two, "What organ is shown?",
             "abdomen"), (two, "Is the lesion on the left side?", "yes"), (two, "Is the right side affected?", "yes"),
             (two, "Is the lesion count 1?", "no"), (two, "How big is the lesion?", "large"), (two, "Where is the lesion?",
             "both"), (none, "Is there a lesion?", "no"), (none, "How many lesions are there?", "0"),
             (none, "Is there a lesion on the left?", "no"), (none, "What size is the lesion?", "none"),
             (none, "Is the lesion small?", "no"), (none, "Does this scan show the chest?", "yes"),
             (none, "Can you describe the image in detail?", None)]
    for facts, question, answer in cases:
        assert synth.answer_question(facts, question) == answer, question
    assert synth.synth_caption(two) == "An x-ray scan of the abdomen with 2 large lesions on both sides."
    assert synth.synth_caption(none) == "An mri scan of the chest with no lesions."


def test_parse_answer():
    assert synth.parse_answer("No.") == {"yesno": "no"}
    assert synth.parse_answer("There are no lesions") == {"count": 0}
    assert synth.parse_answer("yes, an X-ray of the chest, lesions left and right") == {
        "yesno": "yes", "modality": "x-ray", "organ": "chest", "side": "both"}
    assert synth.parse_answer("ct or mri") == {"modality": None}  # contradiction


def test_closed_questions_balanced(root):
    test = Counter(r["answer"] for r in load(root, "test.json") if r["answer_type"] == "CLOSED")
    assert test["yes"] == test["no"] == 100
    train = Counter(t["value"] for r in load(root, "train.json") for t in r["conversations"][1::2] if t["value"] in ("yes", "no"))
    assert abs(train["yes"] - train["no"]) <= 10 and train["yes"] > 1000


def test_score_answer_ranks_right_over_wrong(root):
    facts = load(root, "facts.json")
    for r in load(root, "test.json"):
        f, q = facts[r["image_name"]], synth.parse_question(r["question"])
        values = ("yes", "no") if q["closed"] else [str(v) for v in synth._VALUES[q["type"]]] + ["both"] * (q["type"] == "side")
        for wrong in set(values) - {r["answer"]}:
            assert synth.score_answer(f, r["question"], r["answer"]) == 10 > synth.score_answer(f, r["question"], wrong)
    f = {"modality": "ct", "organ": "brain", "count": 1, "side": "left", "size": "small"}
    score = lambda q, a: synth.score_answer(f, q, a)
    assert score("Is this a ct scan?", "yes") == 10 > score("Is this a ct scan?", "yes, it is a ct scan of the brain") > \
        score("Is this a ct scan?", "yes, it is a ct scan of the chest") > score("Is this a ct scan?", "brain") > \
        score("Is this a ct scan?", "no") > score("Is this a ct scan?", "") == 1
    assert score("Where is the lesion?", "left") == 10 > score("Where is the lesion?", "right") == 2
    assert score(synth.DESCRIBE, synth.synth_caption(f)) == 10 > score(synth.DESCRIBE, "A ct scan of the brain.") > \
        score(synth.DESCRIBE, "An mri scan of the chest.") == 1
    none = {"modality": "ct", "organ": "brain", "count": 0, "side": "none", "size": "none"}
    assert synth.score_answer(none, "Where is the lesion?", "none") == 10 > synth.score_answer(none, "Where is the lesion?", "left")


def test_tokenizer(root):
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    assert 512 <= tok.get_vocab_size() <= 1024 and tok.get_vocab_size() == load(root, "config.json")["vocab_size"]
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<image>")] == [0, 1, 2, synth.SYNTH_IMAGE_TOKEN_ID]
    assert tok.encode("</s>", add_special_tokens=False).ids == [2] and tok.encode("yes").ids[0] == 1  # BOS like LLaMA
    text = "USER: <image>\nIs this an mri scan? ASSISTANT: no</s>VUSER: Where is the lesion?</s> ASSISTANT: left</s>"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids.count(2) == 3 and ids.count(3) == 1 and ids[ids.index(3) - 1] != 3
    texts = [t["value"] for r in load(root, "train.json") for t in r["conversations"]] + [
        synth._SYNTH_SYSTEM_SQ, "  odd\twhitespace \n\n, accents é, CJK 中文, emoji 🩻", ""]
    for t in texts:
        assert tok.decode(tok.encode(t, add_special_tokens=False).ids, skip_special_tokens=False) == t
    n_words = sum(len(t.split()) for t in texts[:2000])
    assert sum(len(tok.encode(t, add_special_tokens=False).ids) for t in texts[:2000]) < 1.5 * n_words  # compresses
    assert len(tok.encode(synth._SYNTH_SYSTEM_SQ, add_special_tokens=False).ids) < 1.4 * len(synth._SYNTH_SYSTEM_SQ.split())


def test_images_show_their_facts(root):
    """Cheap learnability check: the cues are where the generator says (full check: report in the PR)."""
    facts = load(root, "facts.json")
    for name, f in list(facts.items())[::40]:
        a = np.asarray(Image.open(root / "images" / name), dtype=float)
        bg = {"ct": 0, "mri": 60, "x-ray": 200}[f["modality"]]
        assert abs(np.median(a[:, :2]) - bg) < 15  # the background column at the edge sets the modality look
        # lesion cores: 3x3 means above 240 (the 235 skull ring is too thin to reach that, noise averages out)
        bright = np.lib.stride_tricks.sliding_window_view(a, (3, 3)).mean((-1, -2)) > 240  # (46, 46), centre x = j + 1
        left, right = bright[:, :23].sum(), bright[:, 23:].sum()
        assert (left > 2) == (f["side"] in ("left", "both")) and (right > 2) == (f["side"] in ("right", "both"))
