"""
LLaVA-Med's metric rules for medical VQA, one per function, as the papers' tables score them.

LLaVA-Med v1's `llava/eval/run_eval_batch.py` + `eval_metrics/{glossary,evaluate_metrics,utils}.py`
(microsoft/LLaVA-Med @ b9a98a7; the v1.5 main branch no longer has them). The papers' tables (LLaVA-Med
Table 3, STLLaVA-Med Table 1, BioMed-VITAL) report Open = mean token recall over OPEN questions, F1 = mean
token F1 over OPEN questions, Closed = "yes/no accuracy" over CLOSED questions, x100. Every quirk is kept on
purpose (each is marked "quirk"), so the numbers are comparable with the tables.

Tables copied verbatim from `llava/eval/eval_metrics/glossary.py`. No torch, no numpy: copy it alone.
"""
import re
from collections import Counter


# glossary.py `contractions`; the capitalised keys can never match (input is lower-cased): quirk
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # glossary.py `manual_map`
ARTICLES = ("a", "an", "the")
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
         "?", "!"]
# the "(?!<=\d)" is a typo for a lookbehind: as written it is a lookahead that always passes, so this
# removes every "." not followed by a digit ("3.5" survives, "cm." loses its dot): quirk
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def normalize_word(s):
    """glossary.py `normalize_word`: punctuation, periods, number words, articles, contractions."""
    out = s
    for p in PUNCT:
        # a mark next to a space anywhere in the ORIGINAL string (not the edited one), or any
        # digit-comma-digit anywhere, makes every copy of that mark vanish; otherwise each copy becomes a
        # space: quirk
        if (p + " " in s or " " + p in s) or COMMA_STRIP.search(s) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # the official code passes re.UNICODE (=32) as count: quirk
    out = PERIOD_STRIP.sub("", out, count=int(re.UNICODE))
    words = [NUMBER_WORDS.get(w, w) for w in out.lower().split()]  # "two" -> "2", "none" -> "0"
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]  # drop a/an/the, "dont" -> "don't"
    return " ".join(words).replace(",", "")


def word_counts(s):
    """utils.py `split_sentence(s, 1)`: whitespace unigrams, lower-cased, no further cleaning."""
    return Counter(s.lower().strip().split())


def calculate_f1score(pred, gt):
    """evaluate_metrics.py `calculate_f1score` -> (f1, precision, recall); normalises its inputs (again)."""
    c, r = word_counts(normalize_word(pred)), word_counts(normalize_word(gt))
    if not c or not r:  # an empty prediction or reference scores 0
        return 0.0, 0.0, 0.0
    # counted on the PREDICTION side: "left left" vs "left lung" -> 2: quirk
    tp = sum(n for w, n in c.items() if w in r)
    fp = sum(n for w, n in c.items() if w not in r)
    fn = sum(n for w, n in r.items() if w not in c)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def calculate_exactmatch(pred, gt):
    """evaluate_metrics.py `calculate_exactmatch` ("exact match score"): distinct reference words found
    in the prediction / number of prediction words. Not an exact match despite the name: quirk."""
    c, r = word_counts(normalize_word(pred)), word_counts(normalize_word(gt))
    total = sum(c.values())
    return sum(1 for w in r if w in c) / total if total else 0.0


def score_item(pred, gt):
    """All per-question scores; `pred`/`gt` are raw strings, lower-cased then normalised as run_eval_batch.py
    does."""
    p, g = normalize_word(str(pred).lower()), normalize_word(str(gt).lower())
    # normalised a second time inside, as in the official code
    f1, precision, recall = calculate_f1score(p, g)
    words = p.split()
    yes_no = g in ("yes", "no")
    return {
        # run_eval_batch.py (the papers' Closed): hit if the normalised gt is a SUBSTRING of the normalised
        # prediction, so "no" counts inside "normal"/"not"/"nodule" and "yes" inside "eyes": quirk
        "closed": float(g in p),
        # run_eval.py (b9a98a7): as above, and "yes" or "no" must also occur (as substrings) in the prediction
        "closed_run_eval": float(("yes" in p or "no" in p) and g in p),
        # strict (ours): a yes/no gt must equal the prediction's FIRST word; any other gt must occur as
        # whole words
        "closed_strict": float(words[:1] == [g] if yes_no else f" {g} " in f" {p} "),
        # run_eval_batch.py's "open accuracy": the same substring test on OPEN questions
        "open_hit": float(g in p),
        "recall": recall, "precision": precision, "f1": f1,  # calculate_f1score, the papers' Open and F1
        "em_score": calculate_exactmatch(p, g),  # LLaVA-Med's "exact match score" (see its docstring)
        "exact": float(p == g),  # exact match (ours): the normalised strings are equal
    }
