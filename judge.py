"""The expert judge of STLLaVA-Med's stage 2 over plain HTTP: cached, resumable, retried, honest about cost.

- Stage 2 (paper App. B.2, Fig. 5): GPT-4o sees the image, a self-asked question and two sampled answers and
  rates each 1-10; the higher-rated answer becomes DPO's chosen, the lower its rejected. The authors release
  no judge code, so the prompt is the paper's and the rest is ours. Also BioMed-VITAL's win-rate judge (App. E
  Fig. 10, eval/win_rate.py) and LLaVA-Med's relative score (llava/eval/eval_multimodal_chat_gpt_score.py).
- Any OpenAI-compatible server, through chat.py's client: the key ($OPENAI_API_KEY or --api_key_env)
  stripped and scrubbed from every error and log, a refused key stopping the run, a bad request failing its
  item, backoff on 429/5xx and every transport failure, --timeout bounding a whole request, and a ledger
  (judge_spend.jsonl beside the cache) summing each paid reply's tokens and cost over all runs.
- Parsing that is right or refuses: labelled scores map by their labels, in any order; bare numbers only in
  the paper's "8 6" first-line shape; negative, out-of-range or ambiguous replies are asked once more, then
  recorded as the item's failure.
- A JSONL cache fsync'd per verdict, keyed by a hash of all it depends on: a killed run resumes and never
  pays twice; failures keep their reason (--retry_failed asks again). OracleJudge scores offline against
  the synthetic data's facts.

    python judge.py rate pairs.jsonl --out rated.jsonl --swap       # {"image","question","answers":[a1,a2]}
    python judge.py rate pairs.jsonl --out rated.jsonl --judge oracle
    python judge.py winrate A.jsonl B.jsonl --questions test.json   # two models' answer files (evaluate.py)
"""
import argparse
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from itertools import islice
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

import evaluate as E
from chat import ChatClient, ChatError, Fatal, JsonlLog, Ledger, image_bytes, scrub
from runs import fail, read_records, run_main

log = logging.getLogger("judge")

# --- prompts ------------------------------------------------------------------------------------------------

# STLLaVA-Med paper Fig. 5 (arXiv 2406.19973, App. B.2), verbatim including the leading space after
# [System]\n. The image follows the text, as the figure shows. It asks for no explanation; one often follows.
PAIR_PROMPT = (
    "[Question]\n{question}\n\n[Answer 1]\n{answer_1}\n\n[End Answer 1]\n\n[Answer 2]\n{answer_2}\n\n"
    "[End Answer 2]\n\n[System]\n We would like to request your feedback on the quality of two answers in "
    "response to the user question displayed above. The user asks the question on observing an image. For "
    "your reference, you will see an image. \nPlease rate the helpfulness, relevance, accuracy, level of "
    "details of the answers. Each answer receives an overall score on a scale of 1 to 10, where a higher "
    "score indicates better overall performance.\nPlease first output a single line containing only two "
    "values indicating the scores for Answer 1 and 2, respectively. The two scores are separated by a space.")

# BioMed-VITAL eval/win_rate.py system prompt, verbatim (typos and spacing included), and its user text.
WINRATE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user question displayed below. \nYour evaluation should consider correctness and "
    "helpfulness. You will be given a reference answer, assistant A's answer, and assistant B's answer. "
    "Your job is to evaluate which assistant's answer is better. Begin your evaluation by comparing both "
    "assistants\u2019 answers with the reference answer. Identify and correct any mistakes. Avoid any "
    "position biases and ensure that the order in which the responses were presented does not influence "
    "your decision. \nDo not allow the length of the responses to influence your evaluation. Do not favor "
    "certain names of the assistants. Be as objective as possible. \nAfter providing your explanation, "
    "output your final verdict by strictly following this format: \"[[A]]\" if assistant A is better, "
    "\"[[B]]\"if assistant B is better,and\"[[C]]\" for a tie. You must begin with [[A]] or [[B]] or "
    "[[C]].\n Assigning \"[[C]]\" should be a last resort, used only if you absolutely cannot discern any "
    "difference in the quality of the two responses.")
WINRATE_PROMPT = (
    "[Context]\n[Question]\n{question}\n\n[Ground Truth]\n{reference}\n\n[Assistant A]\n{answer_a}\n\n"
    "[End of Assistant 1]\n\n[Assistant B]\n{answer_b}\n\n[End of Assistant 2]\n\n")

# LLaVA-Med eval_multimodal_chat_gpt_score.py: Assistant 1 = the reference (GPT-4) answer, Assistant 2 =
# the model; the judge saw a caption, not the image; reported: mean(score_2 / score_1) * 100. The ' is sic.
RELATIVE_SYSTEM = "'You are a helpful and precise assistant for checking the quality of the answer."
RELATIVE_PROMPT = (
    "[Context]\n{context}\n\n[Question]\n{question}\n\n[Assistant 1]\n{reference}\n\n"
    "[End of Assistant 1]\n\n[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n[System]\nWe would like to "
    "request your feedback on the performance of two AI assistants in response to the user question "
    "displayed above. The user asks the question on observing an image. For your reference, the visual "
    "content in the image is represented with caption describing the same image.\n  Please rate the "
    "helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives an "
    "overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n  "
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and "
    "2, respectively. The two scores are separated by a space. In the subsequent line, please provide a "
    "comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that the order "
    "in which the responses were presented does not affect your judgment.\n\n")
PROMPTS = {"pair": PAIR_PROMPT, "win": WINRATE_SYSTEM + WINRATE_PROMPT,
           "relative": RELATIVE_SYSTEM + RELATIVE_PROMPT}

# --- parsing ------------------------------------------------------------------------------------------------

# A score: signed, so that "-4" is refused rather than read as 4, optionally followed by "/10" or "out of 10".
_NUM = r"(-?\d+(?:\.\d+)?)(?:\s*(?:/|out\s+of)\s*10\b)?"
_NAME = r"(?:answer|assistant|response|score)\s*([12ab])\b"  # "Answer 1", "Assistant B", "Score 2"
_LABELLED = [  # (pattern, group of the label, group of the score)
    # a name, then any run of spaces, ":", "=", markdown "*" or "_" and dashes that are not a minus sign
    (re.compile(_NAME + r"(?:[\s:=*_]|-(?!\d))*" + _NUM, re.I), 1, 2),                       # Answer 1: 8
    # a score, then "for"/"to" (after an optional "points"), then a name
    (re.compile(_NUM + r"\s+(?:points?\s+)?(?:for|to)\s+(?:the\s+)?" + _NAME, re.I), 2, 1),  # 8 for Answer 1
    # a list item's number as the label: at the start, or after a space, "," or ";"
    (re.compile(r"(?:^|(?<=[\s,;]))([12])[.)]\s+" + _NUM), 1, 2)]                            # 1) 8, 1. 8
_OUT_OF = re.compile(r"\s*(?:/|out\s+of)\s*10\b", re.I)                                    # 8/10, 8 out of 10
# What may surround bare scores ("Scores: 8, 6", "**8 6**", "8 and 6."): filler words, markdown and
# punctuation, a "-" that is not a minus sign and a "." that is not a decimal point. Replaced by a space.
_FILLER = re.compile(r"\b(?:overall|final|scores?|ratings?|and|for|vs\.?|respectively|here|are|my|the)\b"
                     r"|[*_#`:,;=()\[\]|>]|-(?!\d)|(?<!\d)\.|\.(?!\d)", re.I)
# A line of nothing but numbers (signed, maybe decimal) separated by whitespace: "8 6", "7.5 6.0".
_NUMBERS = re.compile(r"\s*(?:-?\d+(?:\.\d+)?\s+)*-?\d+(?:\.\d+)?\s*")


def _labelled(line):
    """[(label 0 or 1, score)] from a line that begins with labelled scores, [] from any other, None when
    the reading is ambiguous (two readings overlap, or a stray number sits beside the scores)."""
    found = []  # (start, end, label, score) of every match of every pattern, sorted by where it sits
    for rx, lab, num in _LABELLED:
        for m in rx.finditer(line):
            second = m.group(lab).lower() not in "1a"  # False: answer 1 (or A), True: answer 2 (or B)
            found.append((m.start(), m.end(), second, float(m.group(num))))
    found.sort()
    if not found or _FILLER.sub(" ", line[:found[0][0]]).strip():  # no scores, or words before them
        return []
    ends = [e for _, e, *_ in found]
    next_starts = [s for s, *_ in found[1:]] + [len(line)]
    for e, s in zip(ends, next_starts):
        if e > s or re.search(r"\d", line[e:s]):  # two readings overlap, or a number sits between
            return None
    return [(int(lab), v) for _, _, lab, v in found]


def parse_scores(reply):
    """(score_1, score_2, explanation) from a judge reply, or None unless the reading is unambiguous:
    labelled scores ("Answer 2: 6", "8 for Answer 1", "Score 1: 8", "1) 8") by their labels in any order, bare
    numbers only as the paper's "8 6" ("8/10 6/10", "Scores: 8, 6"); on one or two lines, in [0, 10], after at
    most two lines of preamble. A label twice, labels and bare numbers mixed or a later disagreeing labelled
    score are refused. (LLaVA's parse_score only splits line 1 on a space.)"""
    lines = reply.replace("\u2212", "-").strip().splitlines()  # a Unicode minus is a minus too
    got = {}  # labelled scores: {0 or 1: score}
    nums = []  # bare scores, in order
    skipped = 0  # lines of preamble
    for i, line in enumerate(lines):
        pairs = _labelled(line)
        if pairs is None or (pairs and nums):  # ambiguous, or labelled scores after bare ones
            return None
        for lab, v in pairs:
            if got.setdefault(lab, v) != v:  # a label twice, with another score
                return None
        rest = "" if pairs else _FILLER.sub(" ", _OUT_OF.sub("", line))  # what bare scores would leave
        if len(got) == 2:
            break
        if not rest.strip():
            continue
        if _NUMBERS.fullmatch(rest) and not got:
            nums += [float(x) for x in rest.split()]
            if len(nums) >= 2:
                break
        elif nums or got or skipped == 2:
            return None
        else:
            skipped += 1
    scores = [got.get(0), got.get(1)] if got else nums
    if len(scores) != 2 or None in scores or not all(0 <= x <= 10 for x in scores):
        return None
    explanation = lines[i + 1:]
    for line in explanation:
        for lab, v in _labelled(line) or []:
            if v != scores[lab]:
                return None  # the explanation gives another score
    return scores[0], scores[1], "\n".join(explanation).strip()


def parse_verdict(reply):
    """'A', 'B' or 'C' from the first [[A]]/[[B]]/[[C]] tag in a reply, or None. (BioMed-VITAL's own
    eval/win_rate.py, ChatEvaluation.eval, parsed two scores instead, so nearly every reply was a tie.)"""
    m = re.search(r"\[\[\s*([ABC])\s*\]\]", reply)
    return m.group(1) if m else None

# --- judges -------------------------------------------------------------------------------------------------

def _hash(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class GPTJudge:
    """The paper's GPT-4o judge (any model behind a ChatClient). An unparseable reply is asked again once,
    then raises ChatError (the item's failure): a verdict costs at most 2 * max_tries requests (swap: x2)."""

    def __init__(self, client):
        self.client = client

    def key(self, kind, image, *texts):
        """Cache key: model, prompt template, sampling settings, image bytes and the texts filled in."""
        try:
            digest = hashlib.sha256(image_bytes(image)).hexdigest()
        except (OSError, TypeError):  # a missing image: the call fails in the batch, recorded there, not here
            digest = f"unreadable {image}"
        return _hash(self.client.model, PROMPTS[kind], self.client.sampling, digest, texts)

    def _ask(self, parse, text, image, system=None):
        for _ in range(2):
            reply = self.client.chat(text, image, system)
            parsed = parse(reply)
            if parsed is not None:
                return parsed
        raise ChatError(f"unparseable reply: {reply[:200]!r}")

    def rate_pair(self, image, question, answer_1, answer_2):
        """(score_1, score_2, explanation) for two answers, the paper's Fig. 5 prompt."""
        text = PAIR_PROMPT.format(question=question, answer_1=answer_1, answer_2=answer_2)
        return self._ask(parse_scores, text, image)

    def win(self, image, question, reference, answer_a, answer_b):
        """'A', 'B' or 'C' (tie): BioMed-VITAL's win-rate judge, given the ground truth as reference."""
        text = WINRATE_PROMPT.format(question=question, reference=reference, answer_a=answer_a,
                                     answer_b=answer_b)
        return self._ask(parse_verdict, text, image, WINRATE_SYSTEM)

    def relative(self, image, question, reference, answer, context=""):
        """(reference score, answer score, explanation) for LLaVA-Med's relative score. Its text-only judge:
        image=None, context "Figure Caption:\n{label}: {caption}\n\nFigure Context:\n\t- {mention}"."""
        text = RELATIVE_PROMPT.format(context=context, question=question, reference=reference, answer=answer)
        return self._ask(parse_scores, text, image, RELATIVE_SYSTEM)


class OracleJudge:
    """GPTJudge's interface, scored offline by score_fn(facts, question, answer) -> [1, 10] against the
    synthetic facts ({image name: facts}). The key has no version of score_fn: new scoring, new cache file."""

    def __init__(self, score_fn, facts):
        self.score_fn = score_fn
        self.facts = facts

    def key(self, kind, image, *texts):  # the facts, not just the name: every synthetic seed reuses names
        return _hash("oracle", kind, self.facts.get(Path(image).name), texts)

    def _score(self, image, question, answer):
        return float(self.score_fn(self.facts[Path(image).name], question, answer))

    def rate_pair(self, image, question, answer_1, answer_2):
        s1 = self._score(image, question, answer_1)
        s2 = self._score(image, question, answer_2)
        return s1, s2, "oracle: scored against the image's known facts"

    def win(self, image, question, reference, answer_a, answer_b):
        sa = self._score(image, question, answer_a)
        sb = self._score(image, question, answer_b)
        if sa > sb:
            return "A"
        if sb > sa:
            return "B"
        return "C"

    def relative(self, image, question, reference, answer, context=""):
        return self._score(image, question, reference), self._score(image, question, answer), "oracle"

# --- batch runner -------------------------------------------------------------------------------------------

class Cache(JsonlLog):
    """The verdict cache: a line {"key", "verdict"} per verdict (a later line for a key wins; a failure is
    {"error": reason}), written by the worker the moment it is had, so a paid verdict survives a kill."""

    def __init__(self, path):
        super().__init__(path)
        self.data = {r["key"]: r["verdict"] for r in self.records if "key" in r and "verdict" in r}

    def put(self, key, verdict):
        self.append({"key": key, "verdict": verdict}, keep=False)  # verdicts live in self.data
        self.data[key] = verdict


def price_note(base_url, price_in, price_out):
    """A warning when the cost estimate's prices may not be this server's, else None."""
    host = urlparse(base_url).hostname
    if host != "api.openai.com":
        return (f"note: {host} is not OpenAI's server; costs are estimated at ${price_in:g} / ${price_out:g}"
                " per million prompt / completion tokens (set --price_in / --price_out, 0 for a local model)")


def run_batch(units, work, cache=None, workers=4, on_result=None, progress_every=10.0, retry_failed=False,
              report=None, spend=None):
    """work(unit) -> verdict (a JSON dict) for each (key, unit), `workers` threads at a time, reusing cached
    verdicts (failures too, unless retry_failed), deduplicating keys. A failing unit yields {"error": ...};
    Fatal, an exception from on_result or a KeyboardInterrupt stops the batch: calls in flight finish and are
    cached, no new ones start. Every progress_every s, report (log.info) gets done / total, failures, rate,
    ETA, spend(). Returns ({key: verdict}, Counter(units, cached, new, failed, kept_failures))."""
    results = {}  # key -> verdict, cached or new
    todo = {}  # key -> unit still to judge
    for key, unit in units:  # dicts: a key repeated (a duplicate item) is judged once
        hit = cache.data.get(key) if cache else None
        if hit is not None and not (retry_failed and "error" in hit):
            results[key] = hit
        else:
            todo[key] = unit
    stats = Counter(units=len(results) + len(todo), cached=len(results),
                    kept_failures=sum("error" in v for v in results.values()))

    def job(key, unit):
        try:
            verdict = work(unit)
        except Fatal:
            raise
        except Exception as e:  # one bad item (bad request, unparseable, gave up) never crashes the batch
            verdict = {"error": scrub(f"{type(e).__name__}: {e}")}
        if cache:
            cache.put(key, verdict)  # in the worker, at once: a paid verdict survives whatever happens next
        return key, verdict

    pool = ThreadPoolExecutor(workers)
    t0 = last = time.monotonic()
    queue, pending, done = iter(todo.items()), set(), 0
    try:
        while True:
            # submit only as threads free up: a stop then starts nothing new (a queued future would run)
            for key, unit in islice(queue, workers - len(pending)):
                pending.add(pool.submit(job, key, unit))
            if not pending:
                break
            # wakes at least every progress_every seconds, so a stalled run still reports
            finished, pending = wait(pending, max(0.0, last + progress_every - time.monotonic()),
                                     return_when=FIRST_COMPLETED)
            for f in finished:
                key, verdict = f.result()
                results[key] = verdict
                done += 1
                if "error" in verdict:
                    stats["failed"] += 1
                    log.warning("failed: %s", verdict["error"])
                else:
                    stats["new"] += 1
                if on_result:
                    on_result(key, verdict)
            if time.monotonic() - last >= progress_every or done == len(todo):
                last = time.monotonic()
                rate = done / max(last - t0, 1e-9)
                eta = f"{(len(todo) - done) / rate:.0f}s" if rate else "?"
                so_far = spend() if spend else ""
                say = report or log.info
                say(f"{len(results)}/{stats['units']} done ({stats['cached']} cached), "
                    f"{stats['failed']} failed, {rate:.2f}/s, ETA {eta}{so_far}")
    finally:
        pool.shutdown(wait=True)  # calls in flight finish and are cached
    return results, stats


def _in_orders(judge, kind, rows, swap, image_dir, cache, workers, on_result=None, **batch):
    """judge.<kind>(image, *texts, x, y) for rows (image, texts, x, y), also as (y, x) when swap: a cached
    unit per order; batch: run_batch's keywords. Returns (per row its verdicts [, swapped], stats)."""
    units = []  # (key, the call's arguments), one per row and order
    keys = []  # per row, its keys in order
    call = {"pair": judge.rate_pair, "win": judge.win}[kind]
    for image, texts, x, y in rows:
        image = Path(image_dir) / image
        orders = [(x, y), (y, x)] if swap else [(x, y)]
        row_keys = [judge.key(kind, image, *texts, *o) for o in orders]
        keys.append(row_keys)
        units += [(k, (image, *texts, *o)) for k, o in zip(row_keys, orders)]

    def work(unit):
        r = call(*unit)
        if kind == "win":
            return {"verdict": r}
        return {"scores": [r[0], r[1]], "explanation": r[2]}

    client = getattr(judge, "client", None)  # OracleJudge has none
    spend = getattr(client, "spent", None)
    results, stats = run_batch(units, work, cache, workers, on_result, spend=spend, **batch)
    return [[results[k] for k in ks] for ks in keys], stats


def rate_items(items, judge, cache=None, swap=False, image_dir=".", workers=4, on_result=None, **batch):
    """Rate every item {"image", "question", "answers": [a1, a2]} (image relative to image_dir). Returns
    (items + "scores" [s1, s2] + "explanation", or + "error"; stats). With swap, each item is also rated with
    the answers in the other order, the scores averaged and "orders_disagree" set when the winner flips."""
    rows = [(it["image"], (it["question"],), *it["answers"][:2]) for it in items]
    verdicts, stats = _in_orders(judge, "pair", rows, swap, image_dir, cache, workers, on_result, **batch)
    out = []
    for it, vs in zip(items, verdicts):
        errors = [v["error"] for v in vs if "error" in v]
        if errors:
            out.append({**it, "error": errors[0]})
            continue
        s1, s2 = vs[0]["scores"]
        rec = {**it, "scores": vs[0]["scores"], "explanation": vs[0]["explanation"]}
        if swap:
            t2, t1 = vs[1]["scores"]  # the swapped call scored answer 2 first
            rec.update(scores=[(s1 + t1) / 2, (s2 + t2) / 2], scores_swapped=[t1, t2],
                       orders_disagree=bool(np.sign(s1 - s2) != np.sign(t1 - t2)))
            stats["disagree"] += rec["orders_disagree"]
        out.append(rec)
    stats.update(items=len(items), failed_items=sum("error" in r for r in out))
    return out, stats


def win_items(pairs, judge, cache=None, swap=True, image_dir=".", workers=4, **batch):
    """Outcome of model A against B for each {"image", "question", "reference", "a", "b"}: 1 win, 0.5 tie,
    0 loss; with swap, the mean over both presentation orders (position bias cancels). None if it failed."""
    rows = [(p["image"], (p["question"], p["reference"]), p["a"], p["b"]) for p in pairs]
    verdicts, stats = _in_orders(judge, "win", rows, swap, image_dir, cache, workers, **batch)
    points = [{"A": 1.0, "B": 0.0, "C": 0.5}, {"A": 0.0, "B": 1.0, "C": 0.5}]  # A's points, per order shown
    outcomes = []
    for vs in verdicts:
        if any("error" in v for v in vs):
            outcomes.append(None)
        else:
            outcomes.append(float(np.mean([pt[v["verdict"]] for pt, v in zip(points, vs)])))
    stats.update(items=len(pairs), failed_items=outcomes.count(None))
    return outcomes, stats


def summary(stats, judge, price_in, price_out):
    """One line: items, cached, new verdicts, failures, requests, tokens, this run's cost, the ledger's."""
    client = getattr(judge, "client", None)  # OracleJudge has none
    u = getattr(client, "usage", Counter())
    ledger = getattr(client, "ledger", None)
    cost = u["prompt_tokens"] / 1e6 * price_in + u["completion_tokens"] / 1e6 * price_out
    s = (f"items {stats['items']}: cached {stats['cached']}, new {stats['new']}, "
         f"failed {stats['failed']} verdicts; {u['requests']} requests, "
         f"{u['prompt_tokens']} prompt + {u['completion_tokens']} completion tokens, est. cost ${cost:.4f}")
    if ledger:
        s += f"; ${ledger.cost():.4f} spent in all runs ({ledger.path})"
    if stats["kept_failures"]:
        s += f"; {stats['kept_failures']} failures kept from earlier runs (--retry_failed asks again)"
    if "disagree" in stats:
        s += (f"; swapped orders disagree on {stats['disagree']}/"
              f"{stats['items'] - stats['failed_items']} items")
    return s

# --- CLI ----------------------------------------------------------------------------------------------------

def _oracle(facts_path=None):
    """OracleJudge over the synthetic data's score_answer and facts.json (imported here only: synth.py brings
    torch in through data.py, and judge.py runs without it)."""
    from synth import score_answer, synth_data
    path = Path(facts_path) if facts_path else synth_data() / "facts.json"
    return OracleJudge(score_answer, json.loads(path.read_text()))


def _pick(rec, *names):
    return next((rec[n] for n in names if n in rec), None)


def winrate_pairs(a, b, questions, include_closed=False):
    """Pairs for win_items from two answer files ({id: {"text"|"pred"}}, evaluate.py's format) and the test
    set's questions ({id: {"image"|"image_name", "question", "answer"|"gt", "answer_type"}}). Closed questions
    are skipped by default, as BioMed-VITAL does (a yes/no answer leaves the judge little to weigh). A
    question one side lacks is left out and reported; none shared stops the run."""
    pairs = []
    lacks = {"A": [q for q in questions if q not in a], "B": [q for q in questions if q not in b]}
    if lacks["A"] or lacks["B"]:
        print("winrate: left out " + "; ".join(f"{len(ids)} questions {side} has no answer to (e.g. "
                                               f"{', '.join(ids[:5])})" for side, ids in lacks.items()
                                               if ids))
    for q, m in questions.items():
        if q not in a or q not in b:
            continue
        if not include_closed and str(m.get("answer_type", "")).upper() == "CLOSED":
            continue
        pairs.append({"image": _pick(m, "image", "image_name"), "question": m["question"],
                      "reference": _pick(m, "gt", "answer"),
                      "a": _pick(a[q], "text", "pred", "prediction"),
                      "b": _pick(b[q], "text", "pred", "prediction")})
    return pairs


def _by_id(path):
    """The records of an answer file or the test set, keyed by their id (evaluate.py's qid/question_id)."""
    return {str(_pick(r, "qid", "question_id", "id")): r for r in read_records(path)}


def main(argv=None):
    """The command line: `rate` two answers per item, or the `winrate` of model A over model B."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    shown = argparse.ArgumentDefaultsHelpFormatter  # --help: each flag's default
    rate = sub.add_parser("rate", help="rate two answers per item", formatter_class=shown)
    winrate = sub.add_parser("winrate", help="A vs B", formatter_class=shown)
    rate.add_argument("input", help='JSONL of {"image", "question", "answers": [a1, a2]}')
    rate.add_argument("--out", required=True, help="JSONL: the items with scores or an error")
    rate.add_argument("--swap", action="store_true", help="also rate in the other order and average")
    winrate.add_argument("a", help='model A\'s answers, JSONL of {"question_id", "text"} (evaluate.py\'s)')
    winrate.add_argument("b", help="model B's answers, the same format")
    winrate.add_argument("--questions", required=True, help="the test set: JSON(L) of {qid, image|image_name,"
                         " question, answer, answer_type} (e.g. the synthetic test.json)")
    winrate.add_argument("--no-swap", dest="swap", action="store_false", help="one order only (biased)")
    winrate.add_argument("--include_closed", action="store_true", help="BioMed-VITAL skips closed questions")
    winrate.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples")
    winrate.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    for s in (rate, winrate):
        s.add_argument("--judge", choices=["gpt", "oracle"], default="gpt", help="oracle: synthetic, offline")
        s.add_argument("--facts", default="", help="the oracle's facts.json ('' = the synthetic data's)")
        s.add_argument("--image_dir", default=".", help="image paths are relative to this")
        s.add_argument("--cache", default="judge_cache.jsonl", help="verdict cache (the spend ledger beside"
                       " it); keys hash all inputs, so one file can serve every run ('' = none)")
        s.add_argument("--base_url", default="https://api.openai.com/v1", help="any OpenAI-compatible server")
        s.add_argument("--model", default="gpt-4o", help="the judge model the server is asked for")
        s.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the key")
        s.add_argument("--workers", type=int, default=4, help="concurrent requests")
        s.add_argument("--timeout", type=float, default=60.0, help="seconds for a whole request")
        s.add_argument("--max_tries", type=int, default=6, help="HTTP tries per call")
        s.add_argument("--retry_failed", action="store_true", help="ask again where it failed before")
        s.add_argument("--temperature", type=float, default=0.0, help="the judge's sampling temperature")
        s.add_argument("--max_tokens", type=int, default=1024, help="tokens a reply may take")
        # gpt-4o list price (2024-08-06 snapshot), USD per million tokens: check the current price list.
        s.add_argument("--price_in", type=float, default=2.5, help="USD per million prompt tokens")
        s.add_argument("--price_out", type=float, default=10.0, help="USD per million completion tokens")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.cmd == "rate":  # everything that can be checked is checked before the first paid call
        two = lambda r: None if isinstance(r["answers"], list) and len(r["answers"]) > 1 else (  # noqa: E731
            '"answers" is not a list of two')
        items = read_records(args.input, ("image", "question", "answers"), two)
        if not items:
            fail(f"{args.input}: no items")
        folder = Path(args.out).absolute().parent
        if not os.access(folder, os.W_OK):
            fail(f"cannot write {args.out}: {folder} is not a writable folder")
    else:
        a = _by_id(args.a)
        b = _by_id(args.b)
        qs = _by_id(args.questions)
        pairs = winrate_pairs(a, b, qs, args.include_closed)
        if not pairs:
            fail(f"no {'' if args.include_closed else 'open '}question of {args.questions} is answered in "
                 f"both {args.a} and {args.b}")
    cache = Cache(args.cache) if args.cache else None
    if args.judge == "oracle":
        judge = _oracle(args.facts)
    else:
        ledger = None
        if cache:
            ledger = Ledger(cache.path.with_name("judge_spend.jsonl"), args.price_in, args.price_out)
        client = ChatClient(args.base_url, args.model, args.api_key_env, args.timeout, args.max_tries,
                            args.temperature, args.max_tokens, ledger=ledger)
        judge = GPTJudge(client)
        note = price_note(args.base_url, args.price_in, args.price_out)
        if note:
            log.warning(note)
    try:
        if args.cmd == "rate":
            out, stats = rate_items(items, judge, cache, args.swap, args.image_dir, args.workers,
                                    retry_failed=args.retry_failed)
            Path(args.out + ".tmp").write_text("".join(json.dumps(r) + "\n" for r in out))
            os.replace(args.out + ".tmp", args.out)
        else:
            outcomes, stats = win_items(pairs, judge, cache, args.swap, args.image_dir, args.workers,
                                        retry_failed=args.retry_failed)
            ok = [o for o in outcomes if o is not None]
            if ok:
                ci = E.bootstrap(np.asarray(ok, dtype=float), args.n_boot, args.seed)  # percent, or None
                interval = f"95% bootstrap CI {ci[0] / 100:.3f}-{ci[1] / 100:.3f}; " if ci else ""
                print(f"win rate of A over B: {np.mean(ok):.3f} ({interval}ties count half) on {len(ok)} "
                      f"questions: {sum(o > 0.5 for o in ok)} wins, {sum(o == 0.5 for o in ok)} ties, "
                      f"{sum(o < 0.5 for o in ok)} losses")
    except Fatal as e:  # one line, the whole run: every further call would be refused the same way
        raise SystemExit(f"judge: stopped: {e}")
    print(summary(stats, judge, args.price_in, args.price_out))
    if stats["failed_items"] == stats["items"]:  # an unreachable server, a wrong model name, ...: exit 1
        n = stats["items"]
        why = f"; e.g. {next(r['error'] for r in out)[:200]}; all in {args.out}" if args.cmd == "rate" else ""
        raise SystemExit(f"judge: every item failed ({n} of {n}, after retries){why}")


if __name__ == "__main__":
    run_main(main)
