"""
An OpenAI-compatible chat-completions client over plain HTTP (`requests` only), made for thousands of paid
calls: the transport under judge.py's expert judge, and small enough to copy into another project.

- Retries: backoff with jitter on 408/409/429/5xx and on every transport failure (timeouts, dropped or reset
  connections, a body cut short, TLS, bad gzip), honouring Retry-After; `timeout` is a deadline for the whole
  request, so a reply trickled in pieces cannot outlast it.
- Failures that retrying cannot mend: a 400 (or other 4xx) raises ChatError for that call; a refused (401/403)
  or malformed key raises Fatal and stops every thread's further calls.
- The key comes from an environment variable only (never a flag, so never in shell history), stripped of
  surrounding whitespace, and scrubbed from every error, log line and repr, in the forms servers and
  `requests` quote it.
- Spend: every paid reply's tokens and cost go to an append-only Ledger at once, so a killed run's spend is
  recorded too. JsonlLog is the fsync'd append-only JSONL file both the ledger and judge.py's cache use.

The API is OpenAI's `POST /chat/completions` (messages with text and an inline base64 image_url part).
"""
import base64
import email.utils
import io
import json
import logging
import os
import random
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import requests
import urllib3

log = logging.getLogger("judge")


class ChatError(Exception):
    """A reply that could not be had: the caller records the item as failed and goes on."""


class Fatal(Exception):
    """A refused or malformed key: every further call would fail the same way, so the whole run stops."""


_SECRETS = set()  # every key a client has read; scrubbed from error text before it is stored or logged


def scrub(text):
    """`text` with every key a client has read replaced by ***."""
    for s in _SECRETS:  # as is, and as repr() and JSON quote it (requests' InvalidHeader escapes a "\n")
        for form in (s, repr(s)[1:-1], json.dumps(s)[1:-1]):
            text = text.replace(form, "***")
    return text


def image_bytes(image):
    """Raw bytes of an image given as a path, bytes or a PIL image (encoded as PNG)."""
    if hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def _retry_after(value):
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
        except (TypeError, ValueError):
            return None


# Every way a request can break in transit: timeouts, refused or dropped connections, a body cut short
# (ChunkedEncodingError), TLS, bad gzip, and the protocol errors urllib3 raises unwrapped.
TRANSPORT_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)


class ChatClient:
    """OpenAI-compatible chat completions. chat() makes at most max_tries HTTP requests, waiting Retry-After
    if sent, else backoff * 2**(try-1) (capped) times a jitter in [0.5, 1] so that threads do not retry in
    lockstep. 400 (and other 4xx) fail the item; 401/403 raise Fatal and stop every thread's calls."""

    def __init__(self, base_url="https://api.openai.com/v1", model="gpt-4o", api_key_env="OPENAI_API_KEY",
                 timeout=60.0, max_tries=6, temperature=0.0, max_tokens=1024, backoff=1.0, max_backoff=60.0,
                 sleep=None, seed=0, ledger=None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout = timeout
        self.max_tries = max_tries
        self.ledger = ledger
        self.sampling = {"temperature": temperature, "max_tokens": max_tokens}  # part of the cache key
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.rng = random.Random(seed)
        # From the environment only: never a flag, so never in shell history. Stripped: a key read from a
        # secret file often ends in a newline, which requests rejects with an error quoting the key.
        self.key_env = api_key_env
        raw = os.environ.get(api_key_env) or ""
        key = raw.strip()
        self._headers = {}
        if key:
            _SECRETS.update((raw, key))  # both: an error may quote the key as it was read
            self._headers = {"Authorization": f"Bearer {key}"}
        else:
            log.warning("no API key in $%s; sending none", api_key_env)
        self._local = threading.local()
        self._lock = threading.Lock()
        self.usage = Counter()  # this process's requests and tokens
        self._halt = threading.Event()  # set on a refused key: sleepers wake, none sends
        self.fatal = None
        self.sleep = sleep or self._halt.wait

    def __repr__(self):  # no headers: the key must not reach a log through repr()
        return f"ChatClient(url={self.url!r}, model={self.model!r}, sampling={self.sampling})"

    def spent(self):
        """For the progress line: this run's requests, and the ledger's cost over all runs."""
        ledger = f", ${self.ledger.cost():.4f} spent in all runs" if self.ledger else ""
        return f", {self.usage['requests']} requests{ledger}"

    def chat(self, text, image=None, system=None):
        """The reply text to one user turn (text, then the image inline as a base64 data URL)."""
        content = [{"type": "text", "text": text}]
        if image is not None:
            data = image_bytes(image)
            mime = "image/jpeg" if data[:2] == b"\xff\xd8" else "image/png"  # by magic bytes; PNG otherwise
            url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
            content.append({"type": "image_url", "image_url": {"url": url}})
        system_turn = [{"role": "system", "content": system}] if system else []
        payload = {"model": self.model, "messages": system_turn + [{"role": "user", "content": content}],
                   **self.sampling}
        for attempt in range(1, self.max_tries + 1):
            if self.fatal:
                raise Fatal(self.fatal)
            reply, why, retry_after = self._try(payload)
            if reply is not None:
                return reply
            if attempt < self.max_tries:
                backoff = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                if retry_after is None:
                    wait = backoff * self.rng.uniform(0.5, 1.0)  # jitter: threads do not retry in lockstep
                else:
                    wait = retry_after  # the server knows best when it will take us again
                log.info("try %d/%d failed (%s); retrying in %.2fs", attempt, self.max_tries, why, wait)
                self.sleep(wait)
        raise ChatError(f"gave up after {self.max_tries} tries: {why}")

    def _stop(self, why):
        self.fatal = why
        self._halt.set()
        raise Fatal(why)

    def _try(self, payload):
        """One request: (reply, None, None), or (None, why, Retry-After seconds or None) if worth retrying."""
        if not hasattr(self._local, "session"):  # a requests.Session per thread: sessions are not thread-safe
            self._local.session = requests.Session()
        with self._lock:
            self.usage["requests"] += 1  # every request counts: a timed-out one may still be billed
        deadline = time.monotonic() + self.timeout  # requests' own timeout bounds each read, not the whole
        try:
            with self._local.session.post(self.url, json=payload, headers=self._headers, timeout=self.timeout,
                                          stream=True) as r:
                data = b""
                while chunk := r.raw.read1(1 << 16, decode_content=True):  # whatever has arrived
                    data += chunk
                    if time.monotonic() > deadline:
                        return None, f"no full reply within {self.timeout:g}s", None
        except requests.exceptions.InvalidHeader:  # never str(e): it quotes the header, key and all
            self._stop(f"the key in ${self.key_env} is malformed (a character a header cannot hold)")
        except TRANSPORT_ERRORS as e:
            return None, type(e).__name__, None  # not str(e): it can quote the request
        if r.status_code in (408, 409, 429) or r.status_code >= 500:
            return None, f"HTTP {r.status_code}", _retry_after(r.headers.get("Retry-After"))
        said = scrub(" ".join(data[:200].decode(errors="replace").split()))  # servers echo bad keys
        if r.status_code in (401, 403):
            self._stop(f"HTTP {r.status_code} from {self.url}: ${self.key_env} holds a refused key ({said})")
        if r.status_code != 200:  # a bad request: retrying will not help
            raise ChatError(f"HTTP {r.status_code}: {said}")
        try:
            body = json.loads(data)
            counts = body.get("usage") or {}  # a server may send none, or nulls
            usage = {k: int(counts.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}
            choices = body["choices"]
            with self._lock:  # a reply with choices is paid, whatever they hold
                self.usage.update(usage)
            if self.ledger:
                self.ledger.add(self.model, usage)
            reply = choices[0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            reply = None
        if not isinstance(reply, str):  # a malformed body, or a refusal (content null)
            return None, "malformed body", None
        return reply, None, None


class JsonlLog:
    """An append-only JSONL file: each record fsync'd as it lands, from one write() of a file opened for
    it, so a kill loses at most the line being written (skipped on reload, then ended with a newline)."""

    def __init__(self, path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.records = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = self.path.read_text() if self.path.exists() else ""
        for line in text.splitlines():
            try:
                self.records.append(dict(json.loads(line)))
            except (ValueError, TypeError):
                log.warning("skipping a damaged line in %s", self.path)
        if text and not text.endswith("\n"):
            self.append(None)

    def append(self, rec, keep=True):
        """Write `rec` as one line (None: end a line a kill cut short); `keep` also holds it in .records."""
        with self.lock, open(self.path, "a") as f:
            f.write("\n" if rec is None else json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
            if rec is not None and keep:
                self.records.append(rec)


class Ledger(JsonlLog):
    """The spend across runs and kills: a line {"model", "prompt_tokens", "completion_tokens", "cost"} per
    paid reply, at the prices given, written the moment the reply is read."""

    def __init__(self, path, price_in=2.5, price_out=10.0):
        super().__init__(path)
        self.price_in = price_in
        self.price_out = price_out

    def add(self, model, usage):
        """Record one paid reply's {"prompt_tokens", "completion_tokens"} and its cost."""
        cost = (usage["prompt_tokens"] * self.price_in + usage["completion_tokens"] * self.price_out) / 1e6
        self.append({"model": model, **usage, "cost": cost})

    def cost(self):
        """USD spent over every run recorded in the file."""
        return sum(r.get("cost", 0) for r in self.records)
