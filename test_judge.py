"""Tests for judge.py against a fake OpenAI-compatible server on 127.0.0.1 (http.server in a thread).

The fake decides each reply from a script keyed by the question in the request and how often that question
was asked, so outcomes do not depend on thread timing. Waits are checked on a virtual clock (the injected
sleep advances it, the fake stamps each request with it), never on wall time."""
import base64, json, logging, re, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import judge

KEY = "sk-test-DO-NOT-LEAK-0123456789"
OK_REPLY = "8 6\nAnswer 1 is more accurate."
PNG = b"\x89PNG\r\n\x1a\n" + b"fake image bytes"  # the magic bytes are all the client looks at


class Clock:
    """Virtual time: sleep(s) records s and advances now; no wall time passes."""

    def __init__(self):
        self.now, self.sleeps, self.lock = 0.0, [], threading.Lock()

    def sleep(self, s):
        with self.lock:
            self.sleeps.append(s)
            self.now += s


class Fake:
    """Scripted chat-completions server. script: {question: [behaviour, ...]}; a question asked more often than
    its script is long gets "ok". Behaviours: ok, "429:<secs>", 500, malformed, noscores, slow, 401."""

    def __init__(self, script=None, clock=None, reply=None):
        self.script, self.clock, self.reply = script or {}, clock or Clock(), reply or (lambda text: OK_REPLY)
        self.log, self.lock = [], threading.Lock()  # (question, behaviour, virtual time, authorization, image ok)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][-1]["content"]
                text = content[0]["text"]
                url = content[1]["image_url"]["url"] if len(content) > 1 else ""
                image_ok = url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",")[1]) == PNG
                q = re.search(r"\[Question\]\n(.*?)\n", text).group(1)
                with fake.lock:
                    n = sum(e[0] == q for e in fake.log)
                    steps = fake.script.get(q, [])
                    what = steps[n] if n < len(steps) else "ok"
                    fake.log.append((q, what, fake.clock.now, self.headers.get("Authorization"), image_ok))
                try:
                    if what.startswith("429"):
                        self.send(429, b'{"error": "rate limited"}', {"Retry-After": what.split(":")[1]})
                    elif what == "500":
                        self.send(500, b"oops")
                    elif what == "malformed":
                        self.send(200, b'{"choices": [')
                    elif what == "401":
                        echo = f'{{"error": "Incorrect API key provided: {self.headers["Authorization"]}"}}'
                        self.send(401, echo.encode())
                    else:
                        if what == "slow":
                            time.sleep(0.5)  # the client's timeout is 0.2 s
                        reply = "I cannot judge this." if what == "noscores" else fake.reply(body)
                        self.send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}],
                                                   "usage": {"prompt_tokens": 100, "completion_tokens": 10}}).encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on the slow reply

            def send(self, code, data, headers={}):
                self.send_response(code)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()

    def calls(self, q=None):
        return [e for e in self.log if q is None or e[0] == q]


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    (tmp_path / "img.png").write_bytes(PNG)
    return tmp_path


@pytest.fixture
def fake(request):
    f = Fake()
    yield f
    f.server.shutdown()
    f.server.server_close()


def make_judge(fake, max_tries=3, **kw):
    client = judge.ChatClient(fake.url, "gpt-4o", "JUDGE_TEST_KEY", timeout=0.2, max_tries=max_tries,
                              sleep=fake.clock.sleep, **kw)
    return judge.GPTJudge(client)


def items(n, prefix="q"):
    return [{"image": "img.png", "question": f"{prefix}{i}", "answers": [f"first {i}", f"second {i}"]}
            for i in range(n)]

# --- parsing ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, scores", [
    ("8 6\nAnswer 1 describes the wall correctly.", (8, 6)),            # the paper's format
    ("  8    6  \n\nexplanation", (8, 6)),                                # extra spaces
    ("8/10 6/10\nexpl", (8, 6)),
    ("Scores: 8 6\nexpl", (8, 6)),
    ("Answer 1: 8, Answer 2: 6\nexpl", (8, 6)),
    ("7.5 6.0", (7.5, 6)),                                                # decimals
    ("**8 6**\n\n**Explanation:** ...", (8, 6)),                          # markdown bold
    ("Answer 1: 9/10\nAnswer 2: 3/10\n\nAnswer 1 is right about 2 lesions.", (9, 3)),  # two lines
    ("**Score for Answer 1:** 7\n**Score for Answer 2:** 4", (7, 4)),
    ("\n\n8\t10\n", (8, 10)),                                             # leading blank lines, tab, a 10
    ("8 out of 10 and 6 out of 10.", (8, 6)),
    ("Here are my scores.\n8 6\nbecause ...", (8, 6)),                   # a line of preamble
    ("- Assistant 1: 5\n- Assistant 2: 5", (5, 5)),                       # a tie, bullets
    ("8,6", (8, 6)),
    ("I cannot judge this.", None),                                       # no scores
    ("Answer 1 is better than Answer 2.", None),                          # label digits are not scores
    ("8 6 7\nexpl", None),                                                # three numbers: ambiguous
    ("11 3", None),                                                       # off the scale
    ("The image shows\n2 lesions in\nthe liver\n3 4", None),              # numbers in prose are not scores
])
def test_parse_scores(reply, scores):
    got = judge.parse_scores(reply)
    assert (got[:2] if got else None) == scores


def test_parse_scores_explanation_and_verdict():
    assert judge.parse_scores(OK_REPLY)[2] == "Answer 1 is more accurate."
    assert judge.parse_verdict("Both are close... [[B]] then later [[A]]") == "B"   # the first tag counts
    assert judge.parse_verdict("[[ C ]]") == "C"
    assert judge.parse_verdict("A is better") is None

# --- client and batch runner ------------------------------------------------------------------------------------

SCRIPT = {  # question -> the fake's answers to its 1st, 2nd, ... request (then "ok")
    "q0": ["429:2.5", "ok"], "q1": ["500", "ok"], "q2": ["malformed", "ok"], "q3": ["noscores", "ok"],
    "q4": ["slow", "ok"], "q5": [], "q6": ["500", "500", "500"], "q7": ["noscores", "noscores"],
    "q8": ["429:0.7", "500", "ok"], "q9": ["500", "500", "ok"],
}
EXPECTED_CALLS = {"q0": 2, "q1": 2, "q2": 2, "q3": 2, "q4": 2, "q5": 1, "q6": 3, "q7": 2, "q8": 3, "q9": 3}


@pytest.mark.parametrize("workers", [1, 4])
def test_scripted_failures(env, fake, workers):
    fake.script = SCRIPT
    j = make_judge(fake, max_tries=3, backoff=1.0)
    out, stats = judge.rate_items(items(10), j, judge.Cache(env / "c.jsonl"), image_dir=env, workers=workers)
    by_q = {r["question"]: r for r in out}
    assert {q for q, r in by_q.items() if "error" in r} == {"q6", "q7"}     # every item scored or failed
    assert all(by_q[q]["scores"] == [8, 6] for q in by_q if q not in ("q6", "q7"))
    assert "gave up after 3 tries" in by_q["q6"]["error"] and "unparseable" in by_q["q7"]["error"]
    for q, n in EXPECTED_CALLS.items():                      # tries per item: exact, and within the bound
        assert len(fake.calls(q)) == n <= 2 * 3              # 2 asks (one re-ask if unparseable) x max_tries
    assert all(e[4] and e[3] == f"Bearer {KEY}" for e in fake.log)  # image inline, key sent
    assert stats["new"] == 8 and stats["failed"] == 2 and stats["cached"] == 0
    # usage comes from the 11 well-formed 200 replies: one per scored item, +1 each for q3 and q7's unparseable
    # ones (paid too); none from 429/500, the malformed body or the reply the client timed out on
    assert j.client.usage == {"requests": 22, "prompt_tokens": 1100, "completion_tokens": 110}
    assert "est. cost $0.0039" in judge.summary(stats | {"items": 10}, j, 2.5, 10.0)
    if workers == 1:  # one thread: the virtual clock between a question's requests is that item's wait
        t = lambda q: [e[2] for e in fake.calls(q)]
        assert t("q0")[1] - t("q0")[0] == pytest.approx(2.5)                           # Retry-After honoured
        assert t("q8")[1] - t("q8")[0] == pytest.approx(0.7)
        w1, w2 = t("q9")[1] - t("q9")[0], t("q9")[2] - t("q9")[1]                      # exponential + jitter
        assert 0.5 <= w1 <= 1.0 and 1.0 <= w2 <= 2.0
        assert t("q3")[1] == t("q3")[0]                                                # a re-ask needs no wait
    else:
        assert 2.5 in fake.clock.sleeps and 0.7 in fake.clock.sleeps
    assert len(fake.clock.sleeps) == 10  # one per retried request (q0 q1 q2 q4, 2 each for q6 q8 q9); none to re-ask


@pytest.mark.parametrize("workers", [1, 3])
def test_interrupt_and_resume(env, fake, workers):
    n, k, path, seen = 8, 3, env / "cache.jsonl", []

    class Killed(Exception):
        pass

    def kill_after_k(key, verdict):  # the batch dies (in the main thread) after its k-th verdict
        seen.append(key)
        if len(seen) == k:
            raise Killed

    with pytest.raises(Killed):
        judge.rate_items(items(n), make_judge(fake), judge.Cache(path), image_dir=env, workers=workers,
                         on_result=kill_after_k)
    first = len(fake.log)
    assert k <= first <= k + workers       # calls already in flight finish; no new ones start
    cached = len(path.read_text().splitlines())
    assert cached == first                 # every paid verdict reached the cache
    out, stats = judge.rate_items(items(n), make_judge(fake), judge.Cache(path), image_dir=env, workers=workers)
    assert len(fake.log) - first == n - cached                                  # exactly the remaining calls
    assert sorted(e[0] for e in fake.log) == sorted(f"q{i}" for i in range(n))  # no item paid twice
    assert stats["cached"] == cached and stats["new"] == n - cached
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == n                                     # the cache holds each item once
    assert all(r["scores"] == [8, 6] for r in out)
    judge.rate_items(items(n), make_judge(fake), judge.Cache(path), image_dir=env)
    assert len(fake.log) == n                                                   # a third run is free


def test_cache_survives_a_cut_line(env, fake):
    path = env / "cache.jsonl"
    judge.rate_items(items(2), make_judge(fake), judge.Cache(path), image_dir=env)
    path.write_text(path.read_text() + '{"key": "abc", "verd')  # a kill in the middle of a write
    judge.rate_items(items(3), make_judge(fake), judge.Cache(path), image_dir=env)
    assert len(fake.log) == 3
    c = judge.Cache(path)
    assert len(c.data) == 3


def test_key_never_leaks(env, fake, caplog, capsys, monkeypatch):
    fake.script = {"q0": ["401"], "q1": ["429:1", "ok"], "q2": ["slow", "500", "ok"]}
    (env / "in.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items(4)))
    caplog.set_level(logging.DEBUG)
    argv = ["rate", str(env / "in.jsonl"), "--out", str(env / "out.jsonl"), "--image_dir", str(env),
            "--cache", str(env / "cache.jsonl"), "--base_url", fake.url, "--api_key_env", "JUDGE_TEST_KEY",
            "--timeout", "0.2", "--max_tries", "3", "--workers", "2"]
    real = judge.ChatClient
    assert KEY not in repr(real(fake.url, api_key_env="JUDGE_TEST_KEY"))
    monkeypatch.setattr(judge, "ChatClient", lambda *a, **kw: real(*a, sleep=fake.clock.sleep, **kw))  # no real waits
    judge.main(argv)
    out = [json.loads(line) for line in (env / "out.jsonl").read_text().splitlines()]
    assert "HTTP 401" in out[0]["error"] and "***" in out[0]["error"]          # the echoed key was scrubbed
    assert [("error" in r) for r in out] == [True, False, False, False]
    assert fake.calls("q0")[0][3] == f"Bearer {KEY}"                          # and it was really sent
    written = "".join(p.read_text(errors="replace") for p in env.rglob("*") if p.is_file())
    captured = capsys.readouterr()
    assert KEY not in written and KEY not in caplog.text and KEY not in captured.out + captured.err
    assert "items 4: cached 0, new 3, failed 1" in captured.out and "ETA" in caplog.text  # summary, progress


def test_swap_averages_and_counts_disagreement(env, fake):
    def reply(body):  # prefers answers containing "good"; biased towards position 1 when neither does
        text = body["messages"][-1]["content"][0]["text"]
        a1 = re.search(r"\[Answer 1\]\n(.*?)\n", text).group(1)
        a2 = re.search(r"\[Answer 2\]\n(.*?)\n", text).group(1)
        return "9 4" if "good" in a1 else "4 9" if "good" in a2 else "7 5"
    fake.reply = reply
    its = [{"image": "img.png", "question": "qa", "answers": ["bad", "good"]},
           {"image": "img.png", "question": "qb", "answers": ["meh", "so-so"]}]
    out, stats = judge.rate_items(its, make_judge(fake), None, swap=True, image_dir=env)
    assert out[0]["scores"] == [4, 9] and out[0]["scores_swapped"] == [4, 9] and not out[0]["orders_disagree"]
    assert out[1]["scores"] == [6, 6] and out[1]["orders_disagree"]          # position bias, exposed
    assert stats["disagree"] == 1 and len(fake.log) == 4
    assert "disagree on 1/2 items" in judge.summary(stats, make_judge(fake), 2.5, 10)


def test_winrate_cli(env, fake, capsys):
    def reply(body):
        assert body["messages"][0]["content"] == judge.WINRATE_SYSTEM
        text = body["messages"][-1]["content"][0]["text"]
        a = re.search(r"\[Assistant A\]\n(.*?)\n", text).group(1)
        return "A is right. [[A]]" if a.startswith("right") else "B is right. [[B]]"
    fake.reply = reply
    # model A right on q0-q5, B right on q6-q7; q8 is closed and skipped. Answers in evaluate.py's format.
    test = [{"qid": i, "image_name": "img.png", "question": f"q{i}", "answer": "x", "answer_type": "OPEN"}
            for i in range(8)] + [{"qid": 8, "image_name": "img.png", "question": "q8", "answer": "yes",
                                   "answer_type": "CLOSED"}]
    (env / "test.json").write_text(json.dumps(test))
    for name, good in (("a.jsonl", range(6)), ("b.jsonl", range(6, 9))):
        (env / name).write_text("".join(json.dumps({"question_id": str(i), "text": "right" if i in good else "wrong"})
                                        + "\n" for i in range(9)))
    judge.main(["winrate", str(env / "a.jsonl"), str(env / "b.jsonl"), "--questions", str(env / "test.json"),
                "--image_dir", str(env), "--base_url", fake.url, "--api_key_env", "JUDGE_TEST_KEY",
                "--cache", str(env / "c.jsonl")])
    out = capsys.readouterr().out
    assert "win rate of A over B: 0.750" in out and "6 wins, 0 ties, 2 losses" in out
    assert len(fake.log) == 16   # 8 open questions x 2 orders


def test_bootstrap_is_seeded_and_brackets_the_mean():
    x = [1.0] * 30 + [0.0] * 10
    m, lo, hi = judge.bootstrap(x, seed=0)
    assert m == 0.75 and lo < 0.75 < hi and (m, lo, hi) == judge.bootstrap(x, seed=0)
    assert judge.bootstrap([1.0] * 5) == (1.0, 1.0, 1.0)


def test_relative_score(env, fake):
    fake.reply = lambda body: "8 6\nAssistant 1 is more complete."
    s_ref, s_ans, expl = make_judge(fake).relative(env / "img.png", "q0", "the reference", "the answer", "a caption")
    assert (s_ref, s_ans) == (8, 6) and expl.startswith("Assistant 1")
    assert fake.log[0][4]


def test_oracle_judge_offline(env):
    facts = {"img.png": {"organ": "liver"}}
    score = lambda f, q, a: 10.0 if f["organ"] in a else 2.0
    o = judge.OracleJudge(score, facts)
    assert o.rate_pair(env / "img.png", "organ?", "the liver", "the brain")[:2] == (10.0, 2.0)
    assert o.win("img.png", "organ?", "liver", "brain", "liver") == "B"
    out, stats = judge.rate_items(items(2), o, judge.Cache(env / "oc.jsonl"), image_dir="/elsewhere")
    assert [r["scores"] for r in out] == [[2.0, 2.0]] * 2 and stats["new"] == 2


def test_duplicate_items_are_judged_once(env, fake):
    out, stats = judge.rate_items(items(2) + items(2), make_judge(fake), judge.Cache(env / "c.jsonl"), image_dir=env)
    assert len(fake.log) == 2 and stats["units"] == 2 and len(out) == 4 and all("scores" in r for r in out)
    assert len((env / "c.jsonl").read_text().splitlines()) == 2


def test_cli_oracle_path(env, monkeypatch, capsys):
    """--judge oracle imports score_answer/synth_data from data.py lazily (a stand-in module here)."""
    import types
    data = types.SimpleNamespace(score_answer=lambda f, q, a: 9.0 if f["organ"] in a else 3.0,
                                 synth_data=lambda: env)
    monkeypatch.setitem(__import__("sys").modules, "data", data)
    (env / "facts.json").write_text(json.dumps({"img.png": {"organ": "liver"}}))
    its = [{"image": "img.png", "question": "organ?", "answers": ["brain", "liver"]}]
    (env / "in.jsonl").write_text(json.dumps(its[0]) + "\n")
    judge.main(["rate", str(env / "in.jsonl"), "--out", str(env / "out.jsonl"), "--judge", "oracle", "--cache", ""])
    assert json.loads((env / "out.jsonl").read_text())["scores"] == [3.0, 9.0]
    assert "new 1, failed 0" in capsys.readouterr().out
