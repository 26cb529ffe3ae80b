"""The expert judge of STLLaVA-Med's stage 2, over plain HTTP: cached, resumable, retried, honest about cost.

- Stage 2 (paper App. B.2, Fig. 5): GPT-4o sees the image, a self-asked question and two sampled answers and
  rates each 1-10; the higher-rated answer becomes DPO's chosen, the lower its rejected. The authors release
  no judge code (STLLaVA-Med has no OpenAI call), so the prompt is the paper's and the rest is ours.
- Also BioMed-VITAL's pairwise win-rate judge (App. E Fig. 10, eval/win_rate.py, [[A]]/[[B]]/[[C]]) and
  LLaVA-Med's relative score (llava/eval/eval_multimodal_chat_gpt_score.py + summarize_gpt_review.py), over
  the same client. BioMed-VITAL's learned data selector (§3.2) is selector.py (`python selector.py`).
- Any OpenAI-compatible /chat/completions server works (OpenAI, vLLM, Ollama, a test fake); `requests` only.
  The key is read from $OPENAI_API_KEY (or --api_key_env NAME) and scrubbed from every error and log line.
- Thousands of paid calls: bounded thread concurrency, exponential backoff with jitter on 429/5xx/timeouts/
  connection errors honouring Retry-After, and a JSONL cache written (and fsync'd) per verdict, keyed by a
  hash of everything the verdict depends on, so a killed run resumes and never pays for a verdict twice.
- OracleJudge has the same interface and scores answers against the synthetic image's known facts, so the
  whole stage 2 runs offline on the synthetic default.

    python judge.py rate pairs.jsonl --out rated.jsonl --swap       # {"image","question","answers":[a1,a2]}
    python judge.py rate pairs.jsonl --out rated.jsonl --judge oracle
    python judge.py winrate A.jsonl B.jsonl --questions test.json   # two models' answer files (evaluate.py)
"""
import argparse
import base64
import email.utils
import hashlib
import io
import json
import logging
import os
import random
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import requests

import evaluate as E

log = logging.getLogger("judge")

# --- prompts ------------------------------------------------------------------------------------------------

# STLLaVA-Med paper Fig. 5 (arXiv 2406.19973, App. B.2), verbatim including the leading space after
# [System]\n. The image is attached after the text, as the figure shows. It asks for no explanation; one
# often follows.
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

# LLaVA-Med eval_multimodal_chat_gpt_score.py: Assistant 1 = the reference (GPT-4) answer, Assistant 2 = the
# model; the judge saw a caption instead of the image. The reported number is mean(score_2 / score_1) * 100.
# sic: the leading ' is in the authors' system prompt
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

_LABEL = re.compile(r"\b(?:answer|assistant|response)\s*[12ab]\b", re.I)  # its digit is a name, not a score
_OUT_OF = re.compile(r"\s*(?:/|out\s+of)\s*10\b", re.I)                  # "8/10", "8 out of 10"
_FILLER = re.compile(r"\b(?:overall|final|scores?|ratings?|and|for|vs\.?|respectively)\b"
                     r"|[*_#`:,;=()\[\]|>-]|(?<!\d)\.|\.(?!\d)", re.I)
_NUMBERS = re.compile(r"\s*(?:\d+(?:\.\d+)?\s+)*\d+(?:\.\d+)?\s*")


def parse_scores(reply):
    """(score_1, score_2, explanation) from a judge reply, or None. The scores line holds two numbers in
    [0, 10] once labels ("Answer 1:"), "/10", "Scores:", markdown and punctuation are dropped; they may also
    sit on two consecutive lines ("Answer 1: 8" / "Answer 2: 6"). At most two lines of preamble are skipped,
    so a number in an explanation is never read as a score. LLaVA's parse_score only splits line 1 on a
    space."""
    nums = []
    lines = reply.strip().splitlines()
    skipped = 0
    for i, line in enumerate(lines):
        rest = _FILLER.sub(" ", _OUT_OF.sub("", _LABEL.sub(" ", line)))
        if not rest.strip():
            continue
        if _NUMBERS.fullmatch(rest):
            nums += [float(x) for x in rest.split()]
            if len(nums) >= 2:
                break
        elif nums or skipped == 2:
            return None
        else:
            skipped += 1
    if len(nums) != 2 or not all(0 <= x <= 10 for x in nums):
        return None
    return nums[0], nums[1], "\n".join(lines[i + 1:]).strip()


def parse_verdict(reply):
    """'A', 'B' or 'C' from the first [[A]]/[[B]]/[[C]] tag in a reply, or None. (BioMed-VITAL's own
    eval/win_rate.py, ChatEvaluation.eval, parsed two scores instead, so nearly every reply was a tie.)"""
    m = re.search(r"\[\[\s*([ABC])\s*\]\]", reply)
    return m.group(1) if m else None

# --- client -------------------------------------------------------------------------------------------------

class JudgeError(Exception):
    """A verdict that could not be had: the item is recorded as failed, the batch goes on."""


_SECRETS = set()  # every key a client has read; scrubbed from error text before it is stored or logged


def scrub(text):
    for s in _SECRETS:
        text = text.replace(s, "***")
    return text


def image_bytes(image):
    """Raw bytes of an image given as a path, bytes or a PIL image (encoded as PNG)."""
    if isinstance(image, bytes):
        return image
    if hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    return Path(image).read_bytes()


def _retry_after(value):
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


class ChatClient:
    """OpenAI-compatible chat completions with retries. chat() makes at most max_tries HTTP requests; it
    waits Retry-After when the server sends one, else backoff * 2**(try-1) (capped) times a jitter in
    [0.5, 1] so that many threads do not retry in lockstep. 4xx other than 429 (bad key, bad request) fail
    at once."""

    def __init__(self, base_url="https://api.openai.com/v1", model="gpt-4o", api_key_env="OPENAI_API_KEY",
                 timeout=60.0, max_tries=6, temperature=0.0, max_tokens=1024, backoff=1.0, max_backoff=60.0,
                 sleep=time.sleep, seed=0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout = timeout
        self.max_tries = max_tries
        self.sampling = {"temperature": temperature, "max_tokens": max_tokens}  # part of the cache key
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.sleep = sleep
        self.rng = random.Random(seed)
        # from the environment only: never a flag, so never in shell history
        key = os.environ.get(api_key_env)
        if key:
            _SECRETS.add(key)
        else:
            log.warning("no API key in $%s; sending none", api_key_env)
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._local = threading.local()
        self._lock = threading.Lock()
        self.usage = Counter()  # requests, prompt_tokens, completion_tokens of this process's calls

    def __repr__(self):  # no headers: the key must not reach a log through repr()
        return f"ChatClient(url={self.url!r}, model={self.model!r}, sampling={self.sampling})"

    def chat(self, text, image=None, system=None):
        """The reply text to one user turn (text, then the image inline as a base64 data URL)."""
        content = [{"type": "text", "text": text}]
        if image is not None:
            data = image_bytes(image)
            mime = "image/jpeg" if data[:2] == b"\xff\xd8" else "image/png"  # by magic bytes; PNG otherwise
            url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
            content.append({"type": "image_url", "image_url": {"url": url}})
        system_turn = [{"role": "system", "content": system}] if system else []
        messages = system_turn + [{"role": "user", "content": content}]
        payload = {"model": self.model, "messages": messages, **self.sampling}
        for attempt in range(1, self.max_tries + 1):
            reply, why, retry_after = self._try(payload)
            if reply is not None:
                return reply
            if attempt < self.max_tries:  # the server knows best when it will take us again
                backoff = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                backoff *= self.rng.uniform(0.5, 1.0)  # jitter
                wait = backoff if retry_after is None else retry_after
                log.info("try %d/%d failed (%s); retrying in %.2fs", attempt, self.max_tries, why, wait)
                self.sleep(wait)
        raise JudgeError(f"gave up after {self.max_tries} tries: {why}")

    def _try(self, payload):
        """One request: (reply, None, None), or (None, why, Retry-After seconds or None) if worth retrying."""
        # a requests.Session per thread: sessions are not thread-safe
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        with self._lock:
            self.usage["requests"] += 1  # every request counts: a timed-out one may still be billed
        try:
            r = self._local.session.post(self.url, json=payload, headers=self._headers, timeout=self.timeout)
        except (requests.Timeout, requests.ConnectionError) as e:
            return None, type(e).__name__, None  # not str(e): it can quote the request
        if r.status_code == 429 or r.status_code >= 500:
            return None, f"HTTP {r.status_code}", _retry_after(r.headers.get("Retry-After"))
        if r.status_code != 200:  # bad key, bad request: retrying will not help
            raise JudgeError(scrub(f"HTTP {r.status_code}: {r.text[:300]}"))  # servers echo bad keys
        try:
            body = r.json()
            reply = body["choices"][0]["message"]["content"]
            usage = {k: int((body.get("usage") or {}).get(k) or 0)
                     for k in ("prompt_tokens", "completion_tokens")}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            reply = None
        if not isinstance(reply, str):  # also a null content (a refusal)
            return None, "malformed body", None
        with self._lock:
            self.usage.update(usage)
        return reply, None, None

# --- judges -------------------------------------------------------------------------------------------------

def _hash(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class GPTJudge:
    """The paper's GPT-4o judge (any model behind a ChatClient). An unparseable reply is asked again once,
    then raises JudgeError, which the batch runner records as that item's failure. So one verdict costs at
    most 2 * max_tries requests (twice that with --swap)."""

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
            if (parsed := parse(reply)) is not None:
                return parsed
        raise JudgeError(f"unparseable reply: {reply[:200]!r}")

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
        """(reference score, answer score, explanation): LLaVA-Med's relative score, which reports
        mean(answer / reference) * 100. For LLaVA-Med's text-only judge pass image=None and as context its
        block "Figure Caption:\n{label}: {caption}\n\nFigure Context:\n\t- {mention}"."""
        text = RELATIVE_PROMPT.format(context=context, question=question, reference=reference, answer=answer)
        return self._ask(parse_scores, text, image, RELATIVE_SYSTEM)


class OracleJudge:
    """GPTJudge's interface, scored by score_fn(facts, question, answer) -> [1, 10] against the synthetic
    image's known facts ({image file name: facts}, the synthetic facts.json). Offline and free. The cache key
    has no version of score_fn: use a fresh cache file when the synthetic data's scoring changes."""

    def __init__(self, score_fn, facts):
        self.score_fn = score_fn
        self.facts = facts

    def key(self, kind, image, *texts):  # the facts, not just the name: every synthetic seed reuses names
        return _hash("oracle", kind, self.facts.get(Path(image).name), texts)

    def _score(self, image, question, answer):
        return float(self.score_fn(self.facts[Path(image).name], question, answer))

    def rate_pair(self, image, question, answer_1, answer_2):
        s1, s2 = self._score(image, question, answer_1), self._score(image, question, answer_2)
        return s1, s2, "oracle: scored against the image's known facts"

    def win(self, image, question, reference, answer_a, answer_b):
        sa, sb = self._score(image, question, answer_a), self._score(image, question, answer_b)
        return "A" if sa > sb else "B" if sb > sa else "C"

    def relative(self, image, question, reference, answer, context=""):
        return self._score(image, question, reference), self._score(image, question, answer), "oracle"

# --- batch runner -------------------------------------------------------------------------------------------

class Cache:
    """Append-only JSONL of {"key", "verdict"}: one line per verdict, flushed and fsync'd as it lands, so a
    kill loses at most the line being written (skipped on reload). Failures are not cached: a rerun retries
    them."""

    def __init__(self, path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.data = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = self.path.read_text() if self.path.exists() else ""
        for line in text.splitlines():
            try:
                rec = json.loads(line)
                self.data[rec["key"]] = rec["verdict"]
            except (ValueError, KeyError, TypeError):
                log.warning("skipping a damaged cache line in %s", self.path)
        self.f = open(self.path, "a")
        if text and not text.endswith("\n"):
            self.f.write("\n")  # end the line a kill cut short, or the next verdict would be glued onto it

    def get(self, key):
        return self.data.get(key)

    def put(self, key, verdict):
        with self.lock:
            self.f.write(json.dumps({"key": key, "verdict": verdict}) + "\n")
            self.f.flush()
            os.fsync(self.f.fileno())
            self.data[key] = verdict

    def close(self):
        self.f.close()


def run_batch(units, work, cache=None, workers=4, on_result=None, progress_every=10.0):
    """Compute work(unit) -> verdict (a JSON dict) for each (key, unit), `workers` threads at a time, reusing
    cached verdicts and deduplicating keys. A failing unit yields {"error": ...}; an exception from on_result
    (or a KeyboardInterrupt) stops the batch: calls in flight finish and are cached, no new ones start.
    Returns ({key: verdict}, Counter(units, cached, new, failed))."""
    results = {}
    todo = {}
    for key, unit in units:  # dicts: a key repeated (a duplicate item) is judged once
        hit = cache.get(key) if cache else None
        if hit is not None:
            results[key] = hit
        else:
            todo[key] = unit
    stats = Counter(units=len(results) + len(todo), cached=len(results))

    def job(key, unit):
        try:
            verdict = work(unit)
        except Exception as e:  # one bad item (bad key, unparseable, gave up) never crashes the batch
            return key, {"error": scrub(f"{type(e).__name__}: {e}")}
        if cache:
            cache.put(key, verdict)  # in the worker, at once: a paid verdict survives whatever happens next
        return key, verdict

    pool = ThreadPoolExecutor(workers)
    t0 = time.monotonic()
    last = time.monotonic()
    try:
        for done, fut in enumerate(as_completed([pool.submit(job, k, u) for k, u in todo.items()]), 1):
            key, verdict = fut.result()
            results[key] = verdict
            stats["failed" if "error" in verdict else "new"] += 1
            if "error" in verdict:
                log.warning("failed: %s", verdict["error"])
            if time.monotonic() - last >= progress_every or done == len(todo):
                last = time.monotonic()
                rate = done / max(time.monotonic() - t0, 1e-9)
                log.info("%d/%d verdicts, %.2f/s, ETA %.0fs", done, len(todo), rate,
                         (len(todo) - done) / rate)
            if on_result:
                on_result(key, verdict)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results, stats


def _in_orders(judge, kind, rows, swap, image_dir, cache, workers, on_result=None):
    """judge.<kind>(image, *texts, x, y) for rows (image, texts, x, y), also as (y, x) when swap: one cached
    unit per order. Returns (per row, its verdicts in order [, swapped]; stats)."""
    units = []
    keys = []
    call = {"pair": judge.rate_pair, "win": judge.win}[kind]
    for image, texts, x, y in rows:
        image = Path(image_dir) / image
        orders = [(x, y), (y, x)] if swap else [(x, y)]
        keys.append([judge.key(kind, image, *texts, *o) for o in orders])
        units += [(k, (image, *texts, *o)) for k, o in zip(keys[-1], orders)]

    def work(unit):
        r = call(*unit)
        return {"verdict": r} if kind == "win" else {"scores": [r[0], r[1]], "explanation": r[2]}

    results, stats = run_batch(units, work, cache, workers, on_result)
    return [[results[k] for k in ks] for ks in keys], stats


def rate_items(items, judge, cache=None, swap=False, image_dir=".", workers=4, on_result=None):
    """Rate every item {"image", "question", "answers": [a1, a2]} (image relative to image_dir). Returns
    (items + "scores" [s1, s2] + "explanation", or + "error"; stats). With swap, each item is also rated with
    the answers in the other order, the scores averaged and "orders_disagree" set when the winner flips."""
    rows = [(it["image"], (it["question"],), *it["answers"][:2]) for it in items]
    verdicts, stats = _in_orders(judge, "pair", rows, swap, image_dir, cache, workers, on_result)
    out = []
    for it, vs in zip(items, verdicts):
        if errors := [v["error"] for v in vs if "error" in v]:
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
    stats["items"] = len(items)
    stats["failed_items"] = sum("error" in r for r in out)
    return out, stats


def win_items(pairs, judge, cache=None, swap=True, image_dir=".", workers=4):
    """Outcome of model A against B for each {"image", "question", "reference", "a", "b"}: 1 win, 0.5 tie,
    0 loss; with swap, the mean over both presentation orders (position bias cancels). None if it failed."""
    rows = [(p["image"], (p["question"], p["reference"]), p["a"], p["b"]) for p in pairs]
    verdicts, stats = _in_orders(judge, "win", rows, swap, image_dir, cache, workers)
    points = [{"A": 1.0, "B": 0.0, "C": 0.5}, {"A": 0.0, "B": 1.0, "C": 0.5}]  # A's points, per order shown
    outcomes = [None if any("error" in v for v in vs) else
                float(np.mean([pt[v["verdict"]] for pt, v in zip(points, vs)])) for vs in verdicts]
    stats["items"] = len(pairs)
    stats["failed_items"] = outcomes.count(None)
    return outcomes, stats


def summary(stats, judge, price_in, price_out):
    """One line: items, cached, new verdicts, failures, requests, tokens and this run's estimated cost."""
    u = getattr(getattr(judge, "client", None), "usage", Counter())
    cost = u["prompt_tokens"] / 1e6 * price_in + u["completion_tokens"] / 1e6 * price_out
    s = (f"items {stats['items']}: cached {stats['cached']}, new {stats['new']}, "
         f"failed {stats['failed']} verdicts; {u['requests']} requests, "
         f"{u['prompt_tokens']} prompt + {u['completion_tokens']} completion tokens, est. cost ${cost:.4f}")
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


def _rows_by_id(path):
    """{str id: record} from a JSONL file or a JSON list (qid, question_id or id, as evaluate.py and VQA-RAD
    use)."""
    text = Path(path).read_text()
    is_list = text.lstrip().startswith("[")
    rows = json.loads(text) if is_list else [json.loads(x) for x in text.splitlines() if x.strip()]
    return {str(_pick(r, "qid", "question_id", "id")): r for r in rows}


def _pick(rec, *names):
    return next((rec[n] for n in names if n in rec), None)


def winrate_pairs(a, b, questions, include_closed=False):
    """Pairs for win_items from two answer files ({id: {"text"|"pred"}}, evaluate.py's format) and the test
    set's questions ({id: {"image"|"image_name", "question", "answer"|"gt", "answer_type"}}). Closed questions
    are skipped by default, as BioMed-VITAL does (a yes/no answer leaves the judge little to weigh)."""
    return [{"image": _pick(m, "image", "image_name"), "question": m["question"],
             "reference": _pick(m, "gt", "answer"),
             "a": _pick(a[q], "text", "pred", "prediction"), "b": _pick(b[q], "text", "pred", "prediction")}
            for q, m in questions.items()
            if q in a and q in b and (include_closed or str(m.get("answer_type", "")).upper() != "CLOSED")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    rate = sub.add_parser("rate", help="rate two answers per item")
    winrate = sub.add_parser("winrate", help="A vs B")
    rate.add_argument("input", help='JSONL of {"image", "question", "answers": [a1, a2]}')
    rate.add_argument("--out", required=True, help="JSONL: the items with scores or an error")
    rate.add_argument("--swap", action="store_true", help="also rate in the other order and average")
    winrate.add_argument("a", help='model A\'s answers, JSONL of {"question_id", "text"} (evaluate.py\'s)')
    winrate.add_argument("b", help="model B's answers, the same format")
    winrate.add_argument("--questions", required=True,
                         help="the test set: JSON(L) of {qid, image|image_name, "
                              "question, answer, answer_type} (e.g. the synthetic test.json)")
    winrate.add_argument("--no-swap", dest="swap", action="store_false",
                         help="one order only (position bias stays)")
    winrate.add_argument("--include_closed", action="store_true", help="BioMed-VITAL skips closed questions")
    winrate.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples")
    winrate.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    for s in (rate, winrate):
        s.add_argument("--judge", choices=["gpt", "oracle"], default="gpt",
                       help="oracle: synthetic facts, offline")
        s.add_argument("--facts", default=None, help="oracle facts.json (default: the synthetic data's)")
        s.add_argument("--image_dir", default=".", help="image paths are relative to this")
        s.add_argument("--cache", default="judge_cache.jsonl",
                       help="verdict cache; keys hash all inputs, so one "
                            "file can serve every run ('' = none)")
        s.add_argument("--base_url", default="https://api.openai.com/v1", help="any OpenAI-compatible server")
        s.add_argument("--model", default="gpt-4o")
        s.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the key")
        s.add_argument("--workers", type=int, default=4, help="concurrent requests")
        s.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
        s.add_argument("--max_tries", type=int, default=6, help="HTTP tries per call")
        s.add_argument("--temperature", type=float, default=0.0)
        s.add_argument("--max_tokens", type=int, default=1024)
        # gpt-4o list price (2024-08-06 snapshot), USD per million tokens: check the current price list.
        s.add_argument("--price_in", type=float, default=2.5, help="USD per million prompt tokens")
        s.add_argument("--price_out", type=float, default=10.0, help="USD per million completion tokens")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.judge == "oracle":
        judge = _oracle(args.facts)
    else:
        judge = GPTJudge(ChatClient(args.base_url, args.model, args.api_key_env, args.timeout, args.max_tries,
                                    args.temperature, args.max_tokens))
    cache = Cache(args.cache) if args.cache else None
    try:
        if args.cmd == "rate":
            items = [json.loads(x) for x in Path(args.input).read_text().splitlines() if x.strip()]
            out, stats = rate_items(items, judge, cache, args.swap, args.image_dir, args.workers)
            Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in out))
        else:
            pairs = winrate_pairs(_rows_by_id(args.a), _rows_by_id(args.b), _rows_by_id(args.questions),
                                  args.include_closed)
            outcomes, stats = win_items(pairs, judge, cache, args.swap, args.image_dir, args.workers)
            ok = [o for o in outcomes if o is not None]
            if ok:
                # in percent, or None for n_boot 0
                ci = E.bootstrap(np.asarray(ok, dtype=float), args.n_boot, args.seed)
                interval = f"95% bootstrap CI {ci[0] / 100:.3f}-{ci[1] / 100:.3f}; " if ci else ""
                print(f"win rate of A over B: {np.mean(ok):.3f} ({interval}ties count half) on "
                      f"{len(ok)} questions: {sum(o > 0.5 for o in ok)} wins, "
                      f"{sum(o == 0.5 for o in ok)} ties, {sum(o < 0.5 for o in ok)} losses")
        print(summary(stats, judge, args.price_in, args.price_out))
    finally:
        if cache:
            cache.close()


if __name__ == "__main__":
    main()
