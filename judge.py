"""The expert judge of STLLaVA-Med's stage 2, over plain HTTP: cached, resumable, retried, honest about cost.

- Stage 2 (paper App. B.2, Fig. 5): GPT-4o sees the image, a self-asked question and two sampled answers and
  rates each 1-10; the higher-rated answer becomes DPO's chosen, the lower its rejected. The authors release
  no judge code (STLLaVA-Med has no OpenAI call), so the prompt is the paper's and the rest is ours.
- Also BioMed-VITAL's pairwise win-rate judge (eval/win_rate.py, [[A]]/[[B]]/[[C]]) and LLaVA-Med's relative
  score (llava/eval/eval_multimodal_chat_gpt_score.py + summarize_gpt_review.py), over the same client.
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
    python judge.py select --model out/sft/base   # BioMed-VITAL's learned data selector (its own section below)
"""
import argparse, base64, email.utils, hashlib, io, json, logging, math, os, random, re, sys, threading, time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import requests
import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluate as E

log = logging.getLogger("judge")

# --- prompts ---------------------------------------------------------------------------------------------------

# STLLaVA-Med paper Fig. 5 (arXiv 2406.19973, App. B.2), verbatim including the leading space after [System]\n.
# The image is attached after the text, as the figure shows. It asks for no explanation; one often follows.
PAIR_PROMPT = (
    "[Question]\n{question}\n\n[Answer 1]\n{answer_1}\n\n[End Answer 1]\n\n[Answer 2]\n{answer_2}\n\n"
    "[End Answer 2]\n\n[System]\n We would like to request your feedback on the quality of two answers in response "
    "to the user question displayed above. The user asks the question on observing an image. For your reference, "
    "you will see an image. \nPlease rate the helpfulness, relevance, accuracy, level of details of the answers. "
    "Each answer receives an overall score on a scale of 1 to 10, where a higher score indicates better overall "
    "performance.\nPlease first output a single line containing only two values indicating the scores for Answer 1 "
    "and 2, respectively. The two scores are separated by a space.")

# BioMed-VITAL eval/win_rate.py system prompt, verbatim (typos and spacing included), and its user text.
WINRATE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. \nYour evaluation should consider correctness and helpfulness. You will be "
    "given a reference answer, assistant A's answer, and assistant B's answer. Your job is to evaluate which "
    "assistant's answer is better. Begin your evaluation by comparing both assistants\u2019 answers with the "
    "reference answer. Identify and correct any mistakes. Avoid any position biases and ensure that the order in "
    "which the responses were presented does not influence your decision. \nDo not allow the length of the "
    "responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as "
    "possible. \nAfter providing your explanation, output your final verdict by strictly following this format: "
    "\"[[A]]\" if assistant A is better, \"[[B]]\"if assistant B is better,and\"[[C]]\" for a tie. You must begin "
    "with [[A]] or [[B]] or [[C]].\n Assigning \"[[C]]\" should be a last resort, used only if you absolutely cannot "
    "discern any difference in the quality of the two responses.")
WINRATE_PROMPT = ("[Context]\n[Question]\n{question}\n\n[Ground Truth]\n{reference}\n\n[Assistant A]\n{answer_a}\n\n"
                  "[End of Assistant 1]\n\n[Assistant B]\n{answer_b}\n\n[End of Assistant 2]\n\n")

# LLaVA-Med eval_multimodal_chat_gpt_score.py: Assistant 1 = the reference (GPT-4) answer, Assistant 2 = the model;
# the judge saw a caption instead of the image. The reported number is mean(score_2 / score_1) * 100.
RELATIVE_SYSTEM = "'You are a helpful and precise assistant for checking the quality of the answer."  # sic, the '
RELATIVE_PROMPT = (
    "[Context]\n{context}\n\n[Question]\n{question}\n\n[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
    "[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n[System]\nWe would like to request your feedback on the "
    "performance of two AI assistants in response to the user question displayed above. The user asks the question "
    "on observing an image. For your reference, the visual content in the image is represented with caption "
    "describing the same image.\n  Please rate the helpfulness, relevance, accuracy, level of details of their "
    "responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better "
    "overall performance.\n  Please first output a single line containing only two values indicating the scores for "
    "Assistant 1 and 2, respectively. The two scores are separated by a space. In the subsequent line, please provide "
    "a comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that the order in which "
    "the responses were presented does not affect your judgment.\n\n")
PROMPTS = {"pair": PAIR_PROMPT, "win": WINRATE_SYSTEM + WINRATE_PROMPT, "relative": RELATIVE_SYSTEM + RELATIVE_PROMPT}

# --- parsing ---------------------------------------------------------------------------------------------------

_LABEL = re.compile(r"\b(?:answer|assistant|response)\s*[12ab]\b", re.I)  # its digit is a name, not a score
_OUT_OF = re.compile(r"\s*(?:/|out\s+of)\s*10\b", re.I)                  # "8/10", "8 out of 10"
_FILLER = re.compile(r"\b(?:overall|final|scores?|ratings?|and|for|vs\.?|respectively)\b|[*_#`:,;=()\[\]|>-]"
                     r"|(?<!\d)\.|\.(?!\d)", re.I)
_NUMBERS = re.compile(r"\s*(?:\d+(?:\.\d+)?\s+)*\d+(?:\.\d+)?\s*")


def parse_scores(reply):
    """(score_1, score_2, explanation) from a judge reply, or None. The scores line holds two numbers in [0, 10]
    once labels ("Answer 1:"), "/10", "Scores:", markdown and punctuation are dropped; they may also sit on two
    consecutive lines ("Answer 1: 8" / "Answer 2: 6"). At most two lines of preamble are skipped, so a number in
    an explanation is never read as a score. LLaVA's parse_score only splits line 1 on a space."""
    nums, lines, skipped = [], reply.strip().splitlines(), 0
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
    """'A', 'B' or 'C' from the first [[A]]/[[B]]/[[C]] tag in a reply, or None. (BioMed-VITAL's own code parsed
    two scores instead and so scored nearly every reply as a tie; see AUTHORS_CODE.md section 3.)"""
    m = re.search(r"\[\[\s*([ABC])\s*\]\]", reply)
    return m.group(1) if m else None

# --- client ----------------------------------------------------------------------------------------------------

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
        return max(0.0, (email.utils.parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


class ChatClient:
    """OpenAI-compatible chat completions with retries. chat() makes at most max_tries HTTP requests; it waits
    Retry-After when the server sends one, else backoff * 2**(try-1) (capped) times a jitter in [0.5, 1] so that
    many threads do not retry in lockstep. 4xx other than 429 (bad key, bad request) fail at once."""

    def __init__(self, base_url="https://api.openai.com/v1", model="gpt-4o", api_key_env="OPENAI_API_KEY",
                 timeout=60.0, max_tries=6, temperature=0.0, max_tokens=1024, backoff=1.0, max_backoff=60.0,
                 sleep=time.sleep, seed=0):
        self.url, self.model = base_url.rstrip("/") + "/chat/completions", model
        self.timeout, self.max_tries = timeout, max_tries
        self.sampling = {"temperature": temperature, "max_tokens": max_tokens}  # part of the cache key
        self.backoff, self.max_backoff, self.sleep, self.rng = backoff, max_backoff, sleep, random.Random(seed)
        key = os.environ.get(api_key_env)  # from the environment only: never a flag, so never in shell history
        if key:
            _SECRETS.add(key)
        else:
            log.warning("no API key in $%s; sending none", api_key_env)
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._local, self._lock = threading.local(), threading.Lock()
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
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        payload = {"model": self.model, "messages": messages, **self.sampling}
        for attempt in range(1, self.max_tries + 1):
            reply, why, retry_after = self._try(payload)
            if reply is not None:
                return reply
            if attempt < self.max_tries:  # the server knows best when it will take us again
                backoff = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * self.rng.uniform(0.5, 1.0)
                wait = backoff if retry_after is None else retry_after
                log.info("try %d/%d failed (%s); retrying in %.2fs", attempt, self.max_tries, why, wait)
                self.sleep(wait)
        raise JudgeError(f"gave up after {self.max_tries} tries: {why}")

    def _try(self, payload):
        """One request: (reply, None, None), or (None, why, Retry-After seconds or None) when worth retrying."""
        if not hasattr(self._local, "session"):  # a requests.Session per thread: sessions are not thread-safe
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
            usage = {k: int((body.get("usage") or {}).get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            reply = None
        if not isinstance(reply, str):  # also a null content (a refusal)
            return None, "malformed body", None
        with self._lock:
            self.usage.update(usage)
        return reply, None, None

# --- judges ----------------------------------------------------------------------------------------------------

def _hash(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class GPTJudge:
    """The paper's GPT-4o judge (any model behind a ChatClient). An unparseable reply is asked again once, then
    raises JudgeError, which the batch runner records as that item's failure. So one verdict costs at most
    2 * max_tries requests (twice that with --swap)."""

    def __init__(self, client):
        self.client = client

    def key(self, kind, image, *texts):
        """Cache key: model, prompt template, sampling settings, image bytes and the texts filled in."""
        try:
            digest = hashlib.sha256(image_bytes(image)).hexdigest()
        except (OSError, TypeError):  # a missing image: the call fails in the batch and is recorded there, not here
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
        text = WINRATE_PROMPT.format(question=question, reference=reference, answer_a=answer_a, answer_b=answer_b)
        return self._ask(parse_verdict, text, image, WINRATE_SYSTEM)

    def relative(self, image, question, reference, answer, context=""):
        """(reference score, answer score, explanation): LLaVA-Med's relative score, which reports
        mean(answer / reference) * 100. For LLaVA-Med's text-only judge pass image=None and as context its block
        "Figure Caption:\n{label}: {caption}\n\nFigure Context:\n\t- {mention}"."""
        text = RELATIVE_PROMPT.format(context=context, question=question, reference=reference, answer=answer)
        return self._ask(parse_scores, text, image, RELATIVE_SYSTEM)


class OracleJudge:
    """GPTJudge's interface, scored by score_fn(facts, question, answer) -> [1, 10] against the synthetic image's
    known facts ({image file name: facts}, the synthetic facts.json). Offline and free. The cache key has no
    version of score_fn: use a fresh cache file when the synthetic data's scoring changes."""

    def __init__(self, score_fn, facts):
        self.score_fn, self.facts = score_fn, facts

    def key(self, kind, image, *texts):  # the facts, not just the name: every synthetic seed reuses the names
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

# --- batch runner ----------------------------------------------------------------------------------------------

class Cache:
    """Append-only JSONL of {"key", "verdict"}: one line per verdict, flushed and fsync'd as it lands, so a kill
    loses at most the line being written (skipped on reload). Failures are not cached: a rerun retries them."""

    def __init__(self, path):
        self.path, self.lock, self.data = Path(path), threading.Lock(), {}
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
    """Compute work(unit) -> verdict (a JSON dict) for each (key, unit), `workers` threads at a time, reusing cached
    verdicts and deduplicating keys. A failing unit yields {"error": ...}; an exception from on_result (or a
    KeyboardInterrupt) stops the batch: calls in flight finish and are cached, no new ones start.
    Returns ({key: verdict}, Counter(units, cached, new, failed))."""
    results, todo = {}, {}
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

    pool, t0, last = ThreadPoolExecutor(workers), time.monotonic(), time.monotonic()
    try:
        for done, fut in enumerate(as_completed([pool.submit(job, k, u) for k, u in todo.items()]), 1):
            key, verdict = fut.result()
            results[key] = verdict
            stats["failed" if "error" in verdict else "new"] += 1
            if "error" in verdict:
                log.warning("failed: %s", verdict["error"])
            if time.monotonic() - last >= progress_every or done == len(todo):
                last, rate = time.monotonic(), done / max(time.monotonic() - t0, 1e-9)
                log.info("%d/%d verdicts, %.2f/s, ETA %.0fs", done, len(todo), rate, (len(todo) - done) / rate)
            if on_result:
                on_result(key, verdict)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results, stats


def _in_orders(judge, kind, rows, swap, image_dir, cache, workers, on_result=None):
    """judge.<kind>(image, *texts, x, y) for rows (image, texts, x, y), also as (y, x) when swap: one cached unit
    per order. Returns (per row, its verdicts in order [, swapped]; stats)."""
    units, keys, call = [], [], {"pair": judge.rate_pair, "win": judge.win}[kind]
    for image, texts, x, y in rows:
        image, orders = Path(image_dir) / image, [(x, y), (y, x)] if swap else [(x, y)]
        keys.append([judge.key(kind, image, *texts, *o) for o in orders])
        units += [(k, (image, *texts, *o)) for k, o in zip(keys[-1], orders)]

    def work(unit):
        r = call(*unit)
        return {"verdict": r} if kind == "win" else {"scores": [r[0], r[1]], "explanation": r[2]}

    results, stats = run_batch(units, work, cache, workers, on_result)
    return [[results[k] for k in ks] for ks in keys], stats


def rate_items(items, judge, cache=None, swap=False, image_dir=".", workers=4, on_result=None):
    """Rate every item {"image", "question", "answers": [a1, a2]} (image relative to image_dir). Returns
    (items + "scores" [s1, s2] + "explanation", or + "error"; stats). With swap, each item is also rated with the
    answers in the other order, the scores averaged and "orders_disagree" set when the winner flips."""
    rows = [(it["image"], (it["question"],), *it["answers"][:2]) for it in items]
    verdicts, stats = _in_orders(judge, "pair", rows, swap, image_dir, cache, workers, on_result)
    out = []
    for it, vs in zip(items, verdicts):
        if errors := [v["error"] for v in vs if "error" in v]:
            out.append({**it, "error": errors[0]})
            continue
        (s1, s2), rec = vs[0]["scores"], {**it, "scores": vs[0]["scores"], "explanation": vs[0]["explanation"]}
        if swap:
            t2, t1 = vs[1]["scores"]  # the swapped call scored answer 2 first
            rec.update(scores=[(s1 + t1) / 2, (s2 + t2) / 2], scores_swapped=[t1, t2],
                       orders_disagree=bool(np.sign(s1 - s2) != np.sign(t1 - t2)))
            stats["disagree"] += rec["orders_disagree"]
        out.append(rec)
    stats["items"], stats["failed_items"] = len(items), sum("error" in r for r in out)
    return out, stats


def win_items(pairs, judge, cache=None, swap=True, image_dir=".", workers=4):
    """Outcome of model A against B for each {"image", "question", "reference", "a", "b"}: 1 win, 0.5 tie,
    0 loss; with swap, the mean over both presentation orders (position bias cancels). None if it failed."""
    rows = [(p["image"], (p["question"], p["reference"]), p["a"], p["b"]) for p in pairs]
    verdicts, stats = _in_orders(judge, "win", rows, swap, image_dir, cache, workers)
    points = [{"A": 1.0, "B": 0.0, "C": 0.5}, {"A": 0.0, "B": 1.0, "C": 0.5}]  # A's points, per order shown
    outcomes = [None if any("error" in v for v in vs) else
                float(np.mean([pt[v["verdict"]] for pt, v in zip(points, vs)])) for vs in verdicts]
    stats["items"], stats["failed_items"] = len(pairs), outcomes.count(None)
    return outcomes, stats


def summary(stats, judge, price_in, price_out):
    """One line: items, cached, new verdicts, failures, requests, tokens and the estimated cost of this run."""
    u = getattr(getattr(judge, "client", None), "usage", Counter())
    cost = u["prompt_tokens"] / 1e6 * price_in + u["completion_tokens"] / 1e6 * price_out
    s = (f"items {stats['items']}: cached {stats['cached']}, new {stats['new']}, failed {stats['failed']} verdicts; "
         f"{u['requests']} requests, {u['prompt_tokens']} prompt + {u['completion_tokens']} completion tokens, "
         f"est. cost ${cost:.4f}")
    if "disagree" in stats:
        s += f"; swapped orders disagree on {stats['disagree']}/{stats['items'] - stats['failed_items']} items"
    return s

# =============================================================================================================
# The learned judge (BioMed-VITAL's data selector)
#
# BioMed-VITAL §3.2 (paper 004) distils clinician and GPT-4V preferences into a rating f(x) of one instruction
# sample x = (image, instruction + response), then keeps the top K% of every k-means cluster. Authors' code:
# mao1207/BioMed-VITAL @ f6ccf75, filter/train_clip_filter.py (training) and filter/filter.py (selection).
#
#   python judge.py select --model DIR --data instruct.json --image_dir D --pairs pairs.jsonl --top 0.5
#   python judge.py select --model out/sft/base    # synthetic default: corrupted toy data + oracle-rated pairs
#
# - Features, frozen, from our model.py: the vision tower's patch features mean-pooled, concatenated with the
#   decoder's final-norm hidden states averaged over the real tokens of "Question: q\nAnswer: a" text (no image
#   tokens: two towers, like BiomedCLIP's image and text encoders). The authors fine-tune BiomedCLIP end to end.
# - Head: the authors' MLP (three Linear-ReLU of width 512, then Linear to 1) on standardised features, minus
#   their final Sigmoid: f is a logit and σ sits in the loss (a Sigmoid output keeps |f_i - f_j| < 1).
# - Loss, Eq. 1/3, "a pairwise classification": -w (z_i log σ(f_i - f_j) + z_j log σ(f_j - f_i)). Eq. 1 prints
#   σ(f(x_i)); literally that only raises the preferred sample's rating and never compares the two, so we read σ
#   as the softmax over the pair, P(x_i preferred) = σ(f_i - f_j): the authors' (unused) `rank_loss`.
# - Tie rule, Eq. 2: (z_i, z_j) = (1, 0) if R_i >= R_j, else (0, 1): a tie counts as a win for x_i, the first
#   of the pair. The authors' code never applies it: the loss it calls is `hinge_loss`, mean(w max(0, 1 - y (f_i
#   - f_j))) with y = +1 if s_i > s_j else -1 (a tie would count for x_j), and its sampler draws model pairs from
#   two different score levels and clinician pairs as (1, 0), so no pair is tied. We follow Eq. 2 and log the
#   number of tied training pairs; our synthetic pairs, like theirs, have none.
# - w weighs the human (clinician) pairs, model pairs weigh 1, as in the authors' code. The paper's reason:
#   w = 400 at a 1:400 human:model mix "happens to balance the contribution of human and model-annotated
#   preference in the total training loss", true only with w on the scarce human pairs (issue 9 says "for the
#   model-rated pairs": that would weigh the 400x larger source 400x more and balance nothing).
# - Mixing: every batch holds human and model pairs in their overall ratio (each source shuffled and cut into as
#   many slices as there are batches), so an epoch sees each pair once and the few human pairs never bunch up.
# - Selection: the paper clusters all samples into K groups and "uniformly select[s] top-ranked data in each
#   group"; filter.py takes a global top int(p N) instead. We run k-means on the same standardised features and
#   keep the ceil(K% x size) best-scored samples of every cluster: rounding up, so no cluster is emptied and the
#   total kept lies between K% N and K% N + k.


def pairwise_loss(f_i, f_j, s_i, s_j, w):
    """Eq. 3 with Eq. 2's labels: mean over pairs of -w (z_i log σ(f_i - f_j) + z_j log σ(f_j - f_i)),
    z_i = [s_i >= s_j] (a tie counts for x_i), z_j = 1 - z_i. f: ratings (P,), s: preferences (P,), w: scalar or (P,)."""
    z_i, d = (s_i >= s_j).to(f_i.dtype), f_i - f_j
    return (-w * (z_i * F.logsigmoid(d) + (1 - z_i) * F.logsigmoid(-d))).mean()


def kmeans(x, k, iters=100, seed=0, n_init=10):
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007), seeded: x (N, D) -> (labels (N,),
    centres (k, D)). One seeding can still split a big cluster and merge two small ones, so, like scikit-learn's
    n_init, the best of n_init seedings (lowest within-cluster sum of squares) wins. An emptied cluster keeps its centre."""
    x, g, best = x.float(), torch.Generator().manual_seed(seed), None
    if not 0 < k <= len(x):
        raise ValueError(f"k-means needs 1 <= k <= N points, got k={k}, N={len(x)}")
    for _ in range(n_init):
        centres = x[torch.randint(len(x), (1,), generator=g)]
        for _ in range(k - 1):  # the next centre is drawn with probability ~ squared distance to the nearest one
            d2 = torch.cdist(x, centres).min(1).values.pow(2)
            centres = torch.cat([centres, x[torch.multinomial(d2 if d2.sum() > 0 else d2 + 1, 1, generator=g)]])
        for _ in range(iters):
            labels = torch.cdist(x, centres).argmin(1)  # (N,)
            counts = torch.bincount(labels, minlength=k)[:, None]
            new = torch.where(counts > 0, torch.zeros_like(centres).index_add_(0, labels, x) / counts.clamp(min=1), centres)
            if torch.equal(new, centres):
                break
            centres = new
        labels = torch.cdist(x, centres).argmin(1)
        inertia = (x - centres[labels]).pow(2).sum().item()
        if best is None or inertia < best[0]:
            best = (inertia, labels, centres)
    return best[1], best[2]


def select_top(scores, clusters, frac):
    """Sorted indices of the ceil(frac x size) highest-scored samples of every cluster (ties: lower index first)."""
    keep = []
    for c in torch.unique(clusters):
        idx = (clusters == c).nonzero().flatten()
        n = math.ceil(round(frac * len(idx), 9))  # round first: 0.07 * 100 = 7.000000000000001 keeps 7, not 8
        keep.append(idx[torch.argsort(scores[idx], descending=True, stable=True)[:n]])
    return torch.cat(keep).sort().values


def pair_accuracy(f_i, f_j, s_i, s_j):
    """The authors' test "success rate": fraction of (untied) pairs whose rating order matches the preference."""
    untied = s_i != s_j
    return ((f_i - f_j) * (s_i - s_j))[untied].gt(0).float().mean().item() if untied.any() else float("nan")


def auc(scores, positive):
    """P(score of a positive > score of a negative), ties half: Mann-Whitney U / (n_pos n_neg)."""
    pos, neg = scores[positive][:, None], scores[~positive]
    return ((pos > neg).float() + 0.5 * (pos == neg).float()).mean().item()


class Selector(nn.Module):
    """f(x): the authors' MLP head on standardised frozen features (mean/std set from the training pairs)."""

    def __init__(self, dim, hidden=512):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x):  # (N, dim) -> (N,)
        return self.mlp((x - self.mean) / self.std).squeeze(-1)


def item_text(rec):
    """A sample's text, "Question: q\\nAnswer: a" per turn (BioMed-VITAL: "Question:"+q+"Answer:"+a), no image tag."""
    return "\n".join(("Question: " if t["from"] == "human" else "Answer: ") + t["value"].replace("<image>", "").strip()
                     for t in rec["conversations"])


@torch.no_grad()
def selector_features(model, tokenizer, items, image_dir, batch=64, max_len=512):
    """(N, D_vision + D_text) frozen features of items {"image", "conversations"}: vision-tower patch features
    mean-pooled ++ decoder hidden states averaged over the real tokens of item_text. Each image is encoded once."""
    from data import preprocess_image
    model.eval()
    size, p = model.config.vision.image_size, next(model.parameters())
    names, img = sorted({it["image"] for it in items}), {}
    for b in range(0, len(names), batch):
        px = torch.stack([preprocess_image(Path(image_dir) / n, size) for n in names[b:b + batch]])
        img.update(zip(names[b:b + batch], model.vision_tower(px.to(p.device, p.dtype)).mean(1).float().cpu()))
    ids = [tokenizer.encode(item_text(it)).ids[:max_len] for it in items]
    order, text = sorted(range(len(ids)), key=lambda i: len(ids[i])), torch.zeros(len(ids), model.config.text.hidden_size)
    for b in range(0, len(order), batch):  # batches of similar length waste little on padding
        rows = order[b:b + batch]
        T = max(len(ids[i]) for i in rows)
        mask = torch.tensor([[1] * len(ids[i]) + [0] * (T - len(ids[i])) for i in rows])  # (B, T), right padding
        ids_b = torch.tensor([ids[i] + [0] * (T - len(ids[i])) for i in rows])
        h = model.hidden_states(ids_b.to(p.device), None, mask.to(p.device)).float().cpu()  # (B, T, D)
        text[rows] = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # masked mean over real tokens
    return torch.cat([torch.stack([img[it["image"]] for it in items]), text], 1)


def train_selector(x_i, x_j, s_i, s_j, human, w=400.0, epochs=6, lr=1e-4, batch=64, hidden=512, seed=0):
    """Adam on Eq. 3 over frozen pair features x_* (P, D); human (P,) bool marks the pairs that weigh w."""
    torch.manual_seed(seed)
    g, head = torch.Generator().manual_seed(seed), Selector(x_i.shape[1], hidden)
    both = torch.cat([x_i, x_j])
    head.mean.copy_(both.mean(0)), head.std.copy_(both.std(0).clamp(min=1e-6))
    opt, weight = torch.optim.Adam(head.parameters(), lr=lr), torch.where(human, w, 1.0)
    steps = max(1, math.ceil(len(s_i) / batch))
    for _ in range(epochs):
        parts = [src[torch.randperm(len(src), generator=g)].tensor_split(steps)
                 for src in (human.nonzero().flatten(), (~human).nonzero().flatten())]
        for b in map(torch.cat, zip(*parts)):  # batch t = slice t of the human pairs + slice t of the model pairs
            loss = pairwise_loss(head(x_i[b]), head(x_j[b]), s_i[b], s_j[b], weight[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


def read_pairs(path):
    """Pairs JSONL: {"items": [x_i, x_j], "scores": [R_i, R_j], "source": "human" | "model"}, x = {"image",
    "conversations"}; or `judge.py rate` rows {"image", "question", "answers": [a1, a2], "scores"} (model pairs
    unless "source" says otherwise). Rows with an "error" are skipped."""
    pairs = []
    for r in (json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()):
        if "error" in r:
            continue
        items = r.get("items") or [{"image": r["image"], "conversations": [
            {"from": "human", "value": r["question"]}, {"from": "gpt", "value": a}]} for a in r["answers"][:2]]
        pairs.append({"items": items, "scores": [float(s) for s in r["scores"]], "source": r.get("source", "model")})
    return pairs


def index_samples(pairs, records):
    """Distinct samples of the pairs and the records (features are computed once each): (items, ij (P, 2) rows of
    each pair's two samples, rows (N,) of the records)."""
    items, index = [], {}

    def row(x):
        key = json.dumps([x["image"], x["conversations"]])
        if key not in index:
            index[key] = len(items)
            items.append(x)
        return index[key]
    return items, torch.tensor([[row(x) for x in p["items"]] for p in pairs]), torch.tensor([row(r) for r in records])


def _synth():
    import data  # the synthetic generator (judge.py is a job: it may import the blocks)
    return data


def synthetic_selection_data(out_dir, corrupt=0.3, n_model=4000, n_human=10, noise=1.0, pool=0.7, seed=0,
                             source="train.json"):
    """Stand-in for BioMed-VITAL's candidates and ratings, written to out_dir; returns (data, pairs, image_dir).
    data: the toy-radiology records of `source` (train.json conversations or captions.json), a `corrupt` fraction
    ("corrupted": true) with every answer rewritten for one other coherent set of facts (modality, organ and lesion
    count all differ; lesions kept where a question asks where or how big), so the text alone stays plausible.
    pairs: n_model "model" pairs of two records from the first `pool` fraction, rated by the oracle judge (mean
    score_answer over the turns + N(0, noise), rounded, clipped to 0-10 like GPT-4V), at two different levels as
    the authors draw them; n_human "human" pairs: a clean record of the pool and its corrupted copy, (1, 0)."""
    S, rng, out = _synth(), np.random.default_rng(seed), Path(out_dir)
    root = S.synth_data(seed=seed)
    facts, recs = json.loads((root / "facts.json").read_text()), json.loads((root / source).read_text())
    qa = lambda rec: [(q["value"].replace("<image>", "").strip(), a) for q, a in zip(rec["conversations"][::2],
                                                                                    rec["conversations"][1::2])]

    def corrupted(rec):
        f, turns = facts[rec["image"]], [dict(t) for t in rec["conversations"]]
        where = any((S.parse_question(q) or {}).get("type") in ("side", "size") for q, _ in qa(rec))
        while (o := S.synth_facts(rng))["modality"] == f["modality"] or o["organ"] == f["organ"] or \
                o["count"] == f["count"] or (where and o["count"] == 0):  # "none" to "where?" would give it away
            pass
        for (q, _), a in zip(qa(rec), turns[1::2]):  # a free question ("describe") gets the other image's caption
            a["value"] = S.answer_question(o, q) or S.synth_caption(o)
        return {**rec, "conversations": turns, "corrupted": True}

    def rating(rec):
        s = np.mean([S.score_answer(facts[rec["image"]], q, a["value"]) for q, a in qa(rec)])
        return float(np.clip(np.round(s + noise * rng.normal()), 0, 10))

    bad = set(rng.choice(len(recs), round(corrupt * len(recs)), replace=False).tolist())
    data = [corrupted(r) if i in bad else {**r, "corrupted": False} for i, r in enumerate(recs)]
    rated, pairs = [(r, rating(r)) for r in data[:int(pool * len(data))]], []
    while len(pairs) < n_model:
        (a, sa), (b, sb) = (rated[i] for i in rng.choice(len(rated), 2, replace=False))
        if sa != sb:
            pairs.append({"source": "model", "items": [a, b], "scores": [sa, sb]})
    for i in rng.choice([i for i in range(len(rated)) if i not in bad], n_human, replace=False):
        pair = [(data[i], 1.0), (corrupted(recs[i]), 0.0)][::rng.choice([1, -1])]  # random order
        pairs.append({"source": "human", "items": [p for p, _ in pair], "scores": [s for _, s in pair]})
    out.mkdir(parents=True, exist_ok=True)
    (out / "instruct.json").write_text(json.dumps(data, indent=1))
    (out / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return out / "instruct.json", out / "pairs.jsonl", root / "images"


def select_main(args):
    """`judge.py select`: train the selector, report held-out pair accuracy, then score, cluster and keep top K%."""
    from data import load_tokenizer
    from model import from_pretrained
    data_path, pairs_path, image_dir, out = args.data, args.pairs, args.image_dir, Path(args.out)
    if not data_path:  # the synthetic default
        data_path, pairs_path, image_dir = synthetic_selection_data(out.parent, seed=args.seed)
    elif not pairs_path:
        raise SystemExit("judge.py select: --data needs --pairs (rated pairs to train the selector on)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = from_pretrained(args.model, dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
    tok = args.tokenizer or args.model
    records, pairs = json.loads(Path(data_path).read_text()), read_pairs(pairs_path)
    items, ij, rows = index_samples(pairs, records)
    s, human = torch.tensor([p["scores"] for p in pairs]), torch.tensor([p["source"] == "human" for p in pairs])
    held = torch.rand(len(pairs), generator=torch.Generator().manual_seed(args.seed)) < args.holdout
    feats, tr = selector_features(model, load_tokenizer(tok), items, image_dir), ~held
    head = train_selector(feats[ij[tr, 0]], feats[ij[tr, 1]], s[tr, 0], s[tr, 1], human[tr], args.w, args.epochs,
                          args.lr, args.batch, seed=args.seed)
    with torch.no_grad():
        f = head(feats)
    acc = {k: round(pair_accuracy(f[ij[m, 0]], f[ij[m, 1]], s[m, 0], s[m, 1]), 4)
           for k, m in (("human", held & human), ("model", held & ~human), ("all", held))}
    print(f"selector: {int(tr.sum())} training pairs ({int((tr & human).sum())} human, weight w={args.w:g}; "
          f"{int((s[tr, 0] == s[tr, 1]).sum())} tied); held-out pair accuracy {acc}")
    scores, x = f[rows], feats[rows]
    labels = kmeans((x - head.mean) / head.std, args.clusters, seed=args.seed)[0]
    keep = select_top(scores, labels, args.top)
    edges = np.histogram_bin_edges(scores.numpy(), bins=10)
    summary = {"data": str(data_path), "n": len(records), "kept": len(keep), "top": args.top, "heldout_pair_accuracy": acc,
               "score_histogram": {"edges": edges.round(3).tolist(), "all": np.histogram(scores, edges)[0].tolist(),
                                   "kept": np.histogram(scores[keep], edges)[0].tolist()},
               "per_cluster": [{"cluster": c, "size": int((labels == c).sum()), "kept": int((labels[keep] == c).sum()),
                                "mean_score": round(scores[labels == c].mean().item(), 3)} for c in range(args.clusters)]}
    if all("corrupted" in r for r in records):  # synthetic: how well the scores separate the known corruption
        bad, seen = torch.tensor([r["corrupted"] for r in records]), {x["image"] for p in pairs for x in p["items"]}
        new = torch.tensor([r["image"] not in seen for r in records])
        summary["corrupted"] = {"fraction_all": round(bad.float().mean().item(), 4),
                                "fraction_kept": round(bad[keep].float().mean().item(), 4),
                                "auc_clean_over_corrupted": round(auc(scores, ~bad), 4),
                                "auc_unseen_images": round(auc(scores[new], ~bad[new]), 4) if new.any() else None}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([records[i] for i in keep.tolist()], indent=1))
    Path(f"{out}.summary.json").write_text(json.dumps(summary, indent=1))
    torch.save(head.state_dict(), f"{out}.selector.pt")
    print(json.dumps({k: v for k, v in summary.items() if k != "per_cluster"}))
    print("kept per cluster: " + ", ".join(f"{c['kept']}/{c['size']}" for c in summary["per_cluster"]) + f"; wrote {out}")


def add_select_parser(sub):
    s = sub.add_parser("select", help="BioMed-VITAL's selector: train on rated pairs, keep the top K%% per cluster")
    s.add_argument("--model", default="out/sft/base", help="model.py checkpoint whose frozen towers give the features")
    s.add_argument("--tokenizer", default="", help="default: the model folder's (synthetic default: the toy one)")
    s.add_argument("--data", default="", help="instruction JSON to select from ('' = the synthetic corrupted data)")
    s.add_argument("--image_dir", default=".", help="image paths of --data and --pairs are relative to this")
    s.add_argument("--pairs", default="", help="rated pairs, JSONL (see read_pairs); needed with --data")
    s.add_argument("--out", default="out/select/selected.json", help="the kept records; also OUT.summary.json")
    s.add_argument("--top", type=float, default=0.5, help="K: fraction kept per cluster (paper: 0.1, 0.5, 0.8)")
    s.add_argument("--clusters", type=int, default=8, help="k-means clusters")
    s.add_argument("--w", type=float, default=400.0, help="weight of a human pair (paper: best 400 at 1:400)")
    s.add_argument("--epochs", type=int, default=6, help="paper: 6")
    s.add_argument("--lr", type=float, default=1e-4, help="Adam; paper 1e-4 (its code 1e-5)")
    s.add_argument("--batch", type=int, default=64, help="pairs per batch (authors' code: 64)")
    s.add_argument("--holdout", type=float, default=0.2, help="fraction of pairs held out for pair accuracy")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="", help="for the frozen features (default: cuda if available); the head trains on CPU")

# --- CLI -------------------------------------------------------------------------------------------------------

def _oracle(facts_path=None):
    """OracleJudge over the synthetic data's score_answer and facts.json (imported here only: judge.py is a job)."""
    from data import score_answer, synth_data
    path = Path(facts_path) if facts_path else synth_data() / "facts.json"
    return OracleJudge(score_answer, json.loads(path.read_text()))


def _rows_by_id(path):
    """{str id: record} from a JSONL file or a JSON list (qid, question_id or id, as evaluate.py and VQA-RAD use)."""
    text = Path(path).read_text()
    is_list = text.lstrip().startswith("[")
    rows = json.loads(text) if is_list else [json.loads(x) for x in text.splitlines() if x.strip()]
    return {str(_pick(r, "qid", "question_id", "id")): r for r in rows}


def _pick(rec, *names):
    return next((rec[n] for n in names if n in rec), None)


def winrate_pairs(a, b, questions, include_closed=False):
    """Pairs for win_items from two answer files ({id: {"text"|"pred"}}, evaluate.py's format) and the test set's
    questions ({id: {"image"|"image_name", "question", "answer"|"gt", "answer_type"}}). Closed questions are
    skipped by default, as BioMed-VITAL does (a yes/no answer leaves the judge little to weigh)."""
    return [{"image": _pick(m, "image", "image_name"), "question": m["question"], "reference": _pick(m, "gt", "answer"),
             "a": _pick(a[q], "text", "pred", "prediction"), "b": _pick(b[q], "text", "pred", "prediction")}
            for q, m in questions.items()
            if q in a and q in b and (include_closed or str(m.get("answer_type", "")).upper() != "CLOSED")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    rate, winrate = sub.add_parser("rate", help="rate two answers per item"), sub.add_parser("winrate", help="A vs B")
    add_select_parser(sub)
    rate.add_argument("input", help='JSONL of {"image", "question", "answers": [a1, a2]}')
    rate.add_argument("--out", required=True, help="JSONL: the items with scores or an error")
    rate.add_argument("--swap", action="store_true", help="also rate in the other order and average")
    winrate.add_argument("a", help='model A\'s answers, JSONL of {"question_id", "text"} (evaluate.py\'s)')
    winrate.add_argument("b", help="model B's answers, the same format")
    winrate.add_argument("--questions", required=True, help="the test set: JSON(L) of {qid, image|image_name, "
                         "question, answer, answer_type} (e.g. the synthetic test.json)")
    winrate.add_argument("--no-swap", dest="swap", action="store_false", help="one order only (position bias stays)")
    winrate.add_argument("--include_closed", action="store_true", help="BioMed-VITAL skips closed questions")
    winrate.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples")
    winrate.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    for s in (rate, winrate):
        s.add_argument("--judge", choices=["gpt", "oracle"], default="gpt", help="oracle: synthetic facts, offline")
        s.add_argument("--facts", default=None, help="oracle facts.json (default: the synthetic data's)")
        s.add_argument("--image_dir", default=".", help="image paths are relative to this")
        s.add_argument("--cache", default="judge_cache.jsonl", help="verdict cache; keys hash all inputs, so one "
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
    if args.cmd == "select":
        return select_main(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    judge = _oracle(args.facts) if args.judge == "oracle" else GPTJudge(ChatClient(
        args.base_url, args.model, args.api_key_env, args.timeout, args.max_tries, args.temperature, args.max_tokens))
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
                ci = E.bootstrap(np.asarray(ok, dtype=float), args.n_boot, args.seed)  # x100, or None for n_boot 0
                interval = f"95% bootstrap CI {ci[0] / 100:.3f}-{ci[1] / 100:.3f}; " if ci else ""
                print(f"win rate of A over B: {np.mean(ok):.3f} ({interval}ties count half) on "
                      f"{len(ok)} questions: {sum(o > 0.5 for o in ok)} wins, {sum(o == 0.5 for o in ok)} ties, "
                      f"{sum(o < 0.5 for o in ok)} losses")
        print(summary(stats, judge, args.price_in, args.price_out))
    finally:
        if cache:
            cache.close()


if __name__ == "__main__":
    main()
