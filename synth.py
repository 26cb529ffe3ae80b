"""
The synthetic default, "toy radiology": a seeded, deterministic stand-in for LLaVA-Med's data that a tiny
model learns in minutes on a CPU, and the oracle that scores answers against each image's known facts. It is
this project's own toy world, from neither paper; only its file formats follow LLaVA's and VQA-RAD's.

48x48 grayscale "scans" whose look encodes a few facts (modality, organ, lesion count, side and size), with
captions, conversations and VQA-RAD-like test questions from a small fixed grammar, so that answers can be
scored (`score_answer`, the offline stand-in for STLLaVA-Med's GPT-4o judge, App. B.2) and the questions the
model learns to ask can be parsed (`parse_question`). The visual cues are large and high-contrast on purpose:
the point is to exercise the pipeline, not to be hard. "left"/"right" are the image's (not the radiological
convention, where the patient's left is on the image's right), to keep the toy unambiguous.

    python -c "import synth; print(synth.synth_data())"   # where the files are (generated on first use)

Three kinds of text, as in the paper's story. pretrain.json is the general-purpose LLaVA's data: clean
single-turn captions and answers on images of their own, what the shipped base model (synth_base/) was
trained on, as a language model over the whole text (`sft.py --make_base`): it reads and writes questions,
but has never gone on after an answer, let alone asked as the VUSER.
train.json is the stage-1 instruction data and, like LLaVA-Med's GPT-written conversations, imperfect: most
answers add a hedge or an unasked finding, wrong half the time (`_flaw`), which the stage-1 model imitates and
the oracle judge (correctness and concision) penalises, so stage 2 has something to correct. test.json's
answers are clean.

Files: images/, pretrain.json, train.json and captions.json (LLaVA conversation JSON; captions use
LLaVA-Med's Table 6 instruction), test.json (VQA-RAD's fields), facts.json ({image: facts}), tokenizer.json
(byte-level BPE with LLaMA's special ids), config.json.
"""
import json
import math
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import data as D

SYNTH_VERSION = "synth-v3"  # bump when the generator changes, so stale caches are not reused
SYNTH_IMAGE_SIZE = 48
SYNTH_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>"]  # ids 0..3, as LLaMA's unk/bos/eos + image
SYNTH_IMAGE_TOKEN_ID = 3
SYNTH_VOCAB_SIZE = 640
SYNTH_SPLITS = {"pretrain": 5000, "train": 800, "test": 400}  # images per split; 1,600 test questions
SYNTH_CONVS_PER_IMAGE = 2                    # train conversations per image, 3-4 rounds each
FLAW_RATE = 0.6  # answers in train.json with a flaw: over 1/2, so an imitating model's greedy answer has one
MODALITIES = ("ct", "mri", "x-ray")
ORGANS = ("brain", "chest", "abdomen")
SIDES = ("left", "right")  # a lesion-free image has side and size "none"
SIZES = ("small", "large")
# the shipped stand-in for a general-purpose pretrained LLaVA (`python sft.py --make_base` made it)
BASE_DIR = Path(__file__).resolve().parent / "synth_base"
# How stage 2 samples questions on the synthetic default, and how the scorecard measures them: cooler than
# the paper's T 1.2 / top-k 300. A 1M-parameter model's tail over a 635-token vocabulary is not a 7B model's:
# after stage 1, 8% of questions sampled at T 1.2 / top-k 100 were well-formed (a junk first token), 37% at
# T 1.0 / top-k 20, 94.5% at T 0.7 / top-k 5 (200 samples). Answers keep the paper's sampling.
QUESTION_SAMPLING = dict(temperature=0.7, top_k=5, top_p=0.95)
CAPTION_INSTRUCTION = D.ALIGN_BRIEF[0]  # "Describe the image concisely.", the captions' one instruction

# --- facts and drawing --------------------------------------------------------------------------------------

def synth_facts(rng):
    """Draw one image's facts uniformly: count 0-2; one lesion sits left or right, two sit one per side."""
    count = int(rng.integers(3))
    side = ["none", SIDES[rng.integers(2)], "both"][count]
    size = SIZES[rng.integers(2)] if count else "none"
    return {"modality": MODALITIES[rng.integers(3)], "organ": ORGANS[rng.integers(3)],
            "count": count, "side": side, "size": size}

# modality = global look (background, organ intensity, texture); lesions are always the brightest thing
_LOOK = {"ct": (0, 120), "mri": (60, None), "x-ray": (200, 80)}  # (background, organ; None = stripes)

def synth_draw(facts, rng):
    """Render facts as a 48x48 grayscale PIL image, with small seeded jitter in position/size and noise."""
    yy, xx = np.mgrid[0:SYNTH_IMAGE_SIZE, 0:SYNTH_IMAGE_SIZE] + 0.5
    cx = 24 + rng.uniform(-1.5, 1.5)  # drawn before cy: the draw order fixes every image
    cy = 24 + rng.uniform(-1.5, 1.5)
    bg, fg = _LOOK[facts["modality"]]
    img = np.full(xx.shape, float(bg))
    # the organ's tissue: one intensity, or MRI's horizontal stripes (2 px each) when fg is None
    tissue = np.where((yy // 2) % 2 == 0, 70.0, 150.0) if fg is None else np.full(xx.shape, float(fg))
    if facts["organ"] == "brain":    # a disc inside a bright skull ring
        r = np.hypot(xx - cx, yy - cy)
        organ = r < 17
        rim = (r >= 17) & (r < 19.5)
    elif facts["organ"] == "chest":  # two tall lung ovals with a gap between them
        organ = sum(((xx - cx - dx) / 8) ** 2 + ((yy - cy) / 17) ** 2 < 1 for dx in (-10.5, 10.5)) > 0
        rim = np.zeros_like(organ)
    else:                            # abdomen: one wide rectangle filling the corners the others leave empty
        organ = (abs(xx - cx) < 20.5) & (abs(yy - cy) < 13.5)
        rim = np.zeros(xx.shape, bool)
    img[organ] = tissue[organ]
    img[rim] = 235.0
    lesion_sides = {"none": [], "left": [-10], "right": [10], "both": [-10, 10]}[facts["side"]]
    for dx in lesion_sides:          # lesion centres at x ~ 14 (left) / 34 (right)
        lx = cx + dx + rng.uniform(-1.5, 1.5)  # before ly, as above
        ly = cy + rng.uniform(-4, 4)
        radius = (3.0 if facts["size"] == "small" else 5.5) + rng.uniform(-0.3, 0.3)
        img[np.hypot(xx - lx, yy - ly) < radius] = 255.0
    img += rng.normal(0, 8, img.shape)  # scanner noise, so a model cannot key on exact pixel values
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8))  # 2-D uint8 -> mode "L"

# --- facts -> text ------------------------------------------------------------------------------------------

def _an(word):
    return "an" if word[0] in "aeiomx" else "a"  # "an mri", "an x-ray", "a ct"

def synth_caption(facts):
    """A one-sentence caption stating every fact:
    'An mri scan of the brain with 1 small lesion on the left side.'"""
    n = facts["count"]
    lesions = "no lesions"
    if n:
        where = "on both sides" if n == 2 else f"on the {facts['side']} side"
        lesions = f"{n} {facts['size']} lesion{'s' * (n > 1)} {where}"
    article = _an(facts["modality"]).capitalize()
    return f"{article} {facts['modality']} scan of the {facts['organ']} with {lesions}."

# The question grammar: (fact type, closed?) -> templates; {v} is the value asked about, {a} its article.
# Open answers are the bare value ("ct", "brain", "2", "left"/"right"/"both", "small"); closed ones yes/no.
QUESTION_TEMPLATES = {
    ("modality", False): ["What is the imaging modality?", "What modality is this scan?",
                          "How was this image taken?"],
    ("modality", True): ["Is this {a} {v} scan?", "Was this image taken with {v}?", "Is the modality {v}?"],
    ("organ", False): ["What organ is shown?", "Which part of the body is this?",
                       "What organ does this scan show?"],
    ("organ", True): ["Is this an image of the {v}?", "Does this scan show the {v}?", "Is the {v} shown?"],
    ("lesion", True): ["Is there a lesion?", "Are there any lesions?", "Is there an abnormality?"],
    ("count", False): ["How many lesions are there?", "How many lesions are visible?",
                       "What is the number of lesions?"],
    ("count", True): ["Is the number of lesions {v}?", "Is the lesion count {v}?"],
    ("side", False): ["Which side is the lesion on?", "Where is the lesion?", "On which side is the lesion?"],
    ("side", True): ["Is the lesion on the {v} side?", "Is there a lesion on the {v}?",
                     "Is the {v} side affected?"],
    ("size", False): ["How big is the lesion?", "What size is the lesion?", "How large is the lesion?"],
    ("size", True): ["Is the lesion {v}?", "Is it a {v} lesion?", "Does the lesion look {v}?"],
}
_VALUES = {"modality": MODALITIES, "organ": ORGANS, "lesion": (None,), "count": (0, 1, 2), "side": SIDES,
           "size": SIZES}  # the values a closed question may ask about
_VQA_RAD_TYPE = {"modality": "MODALITY", "organ": "ORGAN", "lesion": "PRES", "count": "COUNT", "side": "POS",
                 "size": "SIZE"}  # VQA-RAD's question_type names
_VQA_RAD_ORGAN = {"brain": "HEAD", "chest": "CHEST", "abdomen": "ABD"}

def synth_truth(facts, kind, value):
    """Is 'kind == value' true of the image? (closed questions; a lesion on "both" sides is on each side)."""
    if kind in ("lesion", "side"):
        return facts["count"] > 0 if kind == "lesion" else facts["side"] in (value, "both")
    return facts[kind] == value

def answer_question(facts, question):
    """The reference answer to a grammar question about an image with these facts (None if off-grammar)."""
    q = parse_question(question)
    if q is None:
        return None
    if q["closed"]:
        return "yes" if synth_truth(facts, q["type"], q["value"]) else "no"
    return str(facts[q["type"]])  # side/size of an image without lesions is "none"

# --- parsing and the oracle judge ---------------------------------------------------------------------------

def _norm(text):
    return " ".join(text.lower().split())  # case- and whitespace-insensitive, nothing else

_QUESTION_RES = [(kind, closed, re.compile(re.escape(_norm(t)).replace(r"\{a\}", "(?:a|an)").replace(
    r"\{v\}", "(?P<v>" + "|".join(re.escape(str(v)) for v in _VALUES[kind]) + ")")))
    for (kind, closed), ts in QUESTION_TEMPLATES.items() for t in ts]

def parse_question(text):
    """{"type", "closed", "value"} for a question of the grammar (case/whitespace-tolerant), else None."""
    for kind, closed, pattern in _QUESTION_RES:
        if m := pattern.fullmatch(_norm(text)):
            v = m.groupdict().get("v")
            return {"type": kind, "closed": closed, "value": int(v) if kind == "count" and v else v}
    return None

_WORDS = {**{m: ("modality", m) for m in MODALITIES}, "xray": ("modality", "x-ray"),
          **{o: ("organ", o) for o in ORGANS}, **{s: ("size", s) for s in SIZES},
          **{str(i): ("count", i) for i in range(10)}, "zero": ("count", 0), "one": ("count", 1),
          "two": ("count", 2), "none": ("count", 0), "left": ("side", "left"), "right": ("side", "right"),
          "both": ("side", "both")}

def parse_answer(text):
    """The facts an answer states: {"yesno", "modality", "organ", "count", "side", "size"} (keys present only
    when stated). "no lesion(s)"/"none" state count 0, "left ... right" states side "both"; a type stated with
    contradicting values maps to None (counts as wrong)."""
    words = re.findall(r"x-ray|[a-z0-9]+", text.lower())  # "left-sided" still states "left"
    found = {}
    for w in words:
        if w in _WORDS:
            found.setdefault(_WORDS[w][0], set()).add(_WORDS[w][1])
    if re.search(r"\bno lesions?\b", text.lower()):
        found.setdefault("count", set()).add(0)
    if found.get("side", set()) >= {"left", "right"}:  # "left and right" means both; "both" may also be said
        found["side"] = (found["side"] - {"left", "right"}) | {"both"}
    stated = {k: next(iter(v)) if len(v) == 1 else None for k, v in found.items()}
    if words and words[0] in ("yes", "no"):  # yes/no only as the first word: "no lesions" is not a "no"
        stated = {"yesno": words[0], **stated}
    return stated

def score_answer(facts, question, answer):
    """Oracle judge score in [1, 10]. For a grammar question: 10 for the right answer said concisely, minus 1
    per 3 extra words (at most 3) and 3 per wrong fact said on the side; 3 off-topic (minus 2 per wrong fact);
    2 wrong (minus 1 per further wrong fact); 1 empty. For a free question (e.g. "describe"):
    1 + 9 * (right - wrong facts stated) / (facts a caption states)."""
    stated = parse_answer(answer)
    wrong = {k for k, v in stated.items() if k in facts and v != facts[k]}
    expected = answer_question(facts, question)
    if expected is None:
        right = sum(k in facts and v == facts[k] for k, v in stated.items())
        score = 1 + 9 * max(0, right - len(wrong)) / len(parse_answer(synth_caption(facts)))
    elif not answer.split():
        score = 1
    else:
        key = parse_answer(expected)  # e.g. {"yesno": "no"} or {"side": "left"} or {"count": 0} for "none"
        wrong -= key.keys()
        if all(stated.get(k) == v for k, v in key.items()):
            extra = len(answer.split()) - len(expected.split())
            score = 10 - min(3, math.ceil(max(0, extra) / 3)) - 3 * len(wrong)
        elif not key.keys() & stated.keys():
            score = 3 - 2 * len(wrong)
        else:
            score = 2 - len(wrong)
    return float(min(10, max(1, score)))

def hallucinations(facts, question, answer):
    """Wrong findings an answer states beyond what was asked: facts it gets wrong about other types."""
    asked = parse_question(question)
    key = parse_answer(answer_question(facts, question)).keys() if asked else set()
    return sum(k in facts and k not in key and v != facts[k] for k, v in parse_answer(answer).items())

# --- the instruction data's flaws ---------------------------------------------------------------------------
# No flaw says "no" or "yes", even inside a word ("not", "none", "abnormal", "eyes"): the papers' closed rule
# is a substring test, so a flaw that did would move closed accuracy for reasons of its own.
HEDGES = ("i think", "probably", "most likely", "it seems")

def _finding(facts, kind, wrong, rng):
    """A sentence stating one fact of `kind`, or a wrong value of it."""
    if kind in ("modality", "organ"):
        values = MODALITIES if kind == "modality" else ORGANS
        v = rng.choice([x for x in values if x != facts[kind]]) if wrong else facts[kind]
        return f"it looks like {_an(v)} {v} scan" if kind == "modality" else f"the {v} is shown"
    side, size = facts["side"], facts["size"]  # lesions: a wrong finding flips side or size, or invents one
    if wrong:
        if side == "none":
            side, size = rng.choice(SIDES), rng.choice(SIZES)
        elif rng.random() < 0.5 and side != "both":
            side = "left" if side == "right" else "right"
        else:
            size = "small" if size == "large" else "large"
    if side == "both":
        return f"the lesions look {size}, one on each side"
    return f"there is a {size} lesion on the {side} side"

def _flaw(facts, kind, answer, rng):
    """`answer` with a flaw GPT-written data has: a hedge, or an unasked finding (wrong half the time)."""
    if rng.random() < 0.4:
        return f"{answer}, {rng.choice(HEDGES)}."
    # a finding about something else than the question: lesions for modality/organ questions, else the scan
    kinds = ["modality", "organ"]
    if kind in kinds:
        kinds = [k for k in kinds if k != kind] + ["lesion"] * (facts["count"] > 0 or rng.random() < 0.5)
    kind = rng.choice(kinds)
    wrong = rng.random() < 0.5 or (kind == "lesion" and facts["count"] == 0)  # invent a lesion, or err
    return f"{answer}, and {_finding(facts, kind, wrong, rng)}."

# --- questions, conversations and files --------------------------------------------------------------------

def _yes_no_bag(rng):
    """Shuffled bags of 10 yes + 10 no targets: balanced splits, and no order a model could exploit."""
    while True:
        bag = [True, False] * 10
        rng.shuffle(bag)
        yield from bag

def _synth_qa(facts, closed, bag, rng, asked):
    """Sample a grammar question and its answer, of a type not yet in `asked` (a set of (type, closed),
    updated). Closed answers follow the yes/no bag; side/size are only asked about images with lesions. If no
    type of the requested kind is left (a lesion-free image has 3 open types), the other kind is asked."""
    def options(closed, want_yes):
        kinds = ["modality", "organ", "count"] + ["lesion"] * closed + ["side", "size"] * (facts["count"] > 0)
        return kinds, [(k, v) for k in kinds if (k, closed) not in asked
                       for v in (_VALUES[k] if closed else (None,))
                       if not closed or synth_truth(facts, k, v) == want_yes]
    if not (options(closed, True)[1] and options(closed, False)[1]):
        closed = not closed
    want_yes = closed and next(bag)
    kinds, opts = options(closed, want_yes)
    # type first, then value: the types stay evenly asked whatever their number of values
    kind = rng.choice(sorted({k for k, _ in opts}, key=kinds.index))
    value = rng.choice([v for k, v in opts if k == kind])
    asked.add((kind, closed))
    q = rng.choice(QUESTION_TEMPLATES[kind, closed]).format(v=value, a=_an(str(value)))
    return kind, closed, q, ("yes" if want_yes else "no") if closed else str(facts[kind])

def _synth_conversation(facts, rng, bag, flaw_rate=0.0, closed_share=0.5):
    """3-4 rounds; half the conversations open with the stage-2 "describe" request answered by the caption.
    A share `flaw_rate` of the other answers gets a flaw."""
    turns = []
    asked = set()
    for i in range(rng.choice([3, 4])):
        if i == 0 and rng.random() < 0.5:
            q = D.DESCRIBE
            a = synth_caption(facts)
        else:
            kind, _, q, a = _synth_qa(facts, rng.random() < closed_share, bag, rng, asked)
            if rng.random() < flaw_rate:
                a = _flaw(facts, kind, a, rng)
        turns += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q},
                  {"from": "gpt", "value": a}]
    return turns

def _synth_tokenizer(texts):
    """Byte-level BPE (round-trips any text, like GPT-2's) with LLaMA's special-token layout; encode() adds
    BOS as LlamaTokenizerFast does, "</s>" and "<image>" in text encode as single special ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=SYNTH_VOCAB_SIZE, special_tokens=SYNTH_SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok

def _render(turns):
    """A conversation roughly as vicuna_v1_sq renders it, for the tokenizer's corpus."""
    roles = iter(["USER", "ASSISTANT", "VUSER", "ASSISTANT"] * 2)
    return " ".join([D.QUESTIONER_SYSTEM] + [f"{next(roles)}: {t['value']}" + "</s>" * (t["from"] == "gpt")
                                             for t in turns])

def _synth_generate(root, seed):
    """Write images/, pretrain.json, train.json, captions.json, test.json, facts.json, tokenizer.json and
    config.json into root."""
    (root / "images").mkdir()
    rng = random.Random(seed)
    out = {"pretrain": [], "train": [], "captions": [], "test": []}
    all_facts = {}
    corpus = []  # the tokenizer's training text
    for s, (split, n) in enumerate(SYNTH_SPLITS.items()):
        bag = _yes_no_bag(random.Random(seed * 1000 + s))  # one per split: each split is balanced on its own
        for i in range(n):
            # a per-image stream: images do not shift when n changes
            img_rng = np.random.default_rng([seed, s, i])
            name = f"synth_{split}_{i:05d}.png"
            facts = synth_facts(img_rng)
            synth_draw(facts, img_rng).save(root / "images" / name)
            all_facts[name] = facts
            caption = {"id": f"cap_{split}_{i:05d}", "image": name, "conversations": [
                {"from": "human", "value": "<image>\n" + CAPTION_INSTRUCTION},
                {"from": "gpt", "value": synth_caption(facts)}]}
            if split == "pretrain":  # the general-purpose base: single-turn, clean, more closed questions
                asked = set()
                qa = [(rng.choice([CAPTION_INSTRUCTION, D.DESCRIBE]), synth_caption(facts))] + [
                    _synth_qa(facts, rng.random() < 0.6, bag, rng, asked)[2:] for _ in range(3)]
                out["pretrain"] += [{"id": f"pre_{i:05d}_{k}", "image": name, "conversations": [
                    {"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]}
                    for k, (q, a) in enumerate(qa)]
                corpus += [_render(r["conversations"]) for r in out["pretrain"][-4:]]
            elif split == "train":
                out["captions"].append(caption)
                for k in range(SYNTH_CONVS_PER_IMAGE):
                    turns = _synth_conversation(facts, rng, bag, flaw_rate=FLAW_RATE)
                    out["train"].append({"id": f"{split}_{i:05d}_{k}", "image": name, "conversations": turns})
                    corpus.append(_render(turns))
            else:
                asked = set()  # test: 2 closed + 2 open questions per image, VQA-RAD's fields
                for closed in (True, True, False, False):
                    kind, closed, q, a = _synth_qa(facts, closed, bag, rng, asked)
                    out["test"].append({"qid": len(out["test"]), "image_name": name, "question": q,
                                        "answer": a, "answer_type": "CLOSED" if closed else "OPEN",
                                        "question_type": _VQA_RAD_TYPE[kind], "phrase_type": "test_freeform",
                                        "image_organ": _VQA_RAD_ORGAN[facts["organ"]]})
                    corpus.append(f"USER: <image>\n{q} ASSISTANT: {a}</s>")
    tok = _synth_tokenizer(corpus)
    tok.save(str(root / "tokenizer.json"))
    files = {**{f"{k}.json": v for k, v in out.items()}, "facts.json": all_facts,
             "config.json": {"version": SYNTH_VERSION, "seed": seed, "image_size": SYNTH_IMAGE_SIZE,
                             "vocab_size": tok.get_vocab_size(), "image_token_id": SYNTH_IMAGE_TOKEN_ID,
                             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}}
    for fname, obj in files.items():
        (root / fname).write_text(json.dumps(obj, indent=1))

def synth_data(cache_dir=None, seed=0):
    """Path of the toy-radiology dataset for a seed, generated on first use (a few seconds) into
    cache_dir / f"{SYNTH_VERSION}-seed{seed}" (default cache: $STLLAVA_CACHE or ~/.cache/stllava-med).
    Built in a temp dir and renamed into place, so a crash never leaves a half-written dataset behind."""
    cache = Path(cache_dir or os.environ.get("STLLAVA_CACHE") or Path.home() / ".cache" / "stllava-med")
    final = cache / f"{SYNTH_VERSION}-seed{seed}"
    if not final.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=cache))
        try:
            _synth_generate(tmp, seed)
            tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is not
            # atomic; fails if a concurrent process finished first, and then we use its copy
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
