"""
Self-contained HTML reports: one file each, inline SVG charts and base64 thumbnails, no external URL, no
JavaScript library (a few lines of inline JS filter the galleries and flag a broken image on the console).

    python evaluate.py vqa_rad --pred answers.jsonl --report report.html    # + report.questions.jsonl
    python evaluate.py vqa_rad --compare a.jsonl b.jsonl --report changed.html
    python report.py out/dpo                                                # a run's out_dir/report.html
    python selector.py --report out/select/report.html

- The evaluation report: the headline numbers with their 95% intervals, bars per answer type, question type
  and modality / organ, and a gallery of every wrong answer (capped at GALLERY_MAX) with the rules it
  failed, e.g. a "normal" that LLaVA-Med's substring rule counts as "no" but the strict rule does not.
- The comparison report: the paired differences and the questions whose score changed (fixed, broken).
- A run's report (out_dir): training curves from log.jsonl, the self-asked questions with both answers,
  the judge's scores and the chosen side (verdicts.jsonl, written by dpo.py's judge step), and a selector
  summary when there is one.
- A block: pure functions of plain dicts and lists that the jobs already hold; the metric functions it needs
  (evaluate's `summarize`) come in as arguments, so this file imports no job and no torch.
"""
import base64
import html
import io
import json
import re
import sys
from pathlib import Path

import numpy as np

THUMB = 96  # thumbnail side in pixels: about 3 KB of JPEG each
GALLERY_MAX = 500  # cards per gallery; the rest are in the JSONL beside the report
COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1")

# The rules a question can fail, per answer type (evaluate.score_item's columns): a question is wrong when
# it fails any of them, so a "normal" for "no" (right by the papers' substring rule, wrong by the strict
# one) shows in the gallery with the rule that let it through.
RULES = {"CLOSED": (("closed", "papers' rule (answer is a substring)"),
                    ("closed_run_eval", "run_eval.py rule (+ yes/no occurs)"),
                    ("closed_strict", "strict (first word / whole words)")),
         "OPEN": (("recall", "papers' Open (every answer word recalled)"),
                  ("open_hit", "answer is a substring"))}

CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}.note{color:#666}svg{display:block;margin:8px 0}
.cards{display:flex;flex-wrap:wrap;gap:8px}.card{display:flex;gap:8px;border:1px solid #ddd;
border-radius:4px;padding:6px;width:370px;font-size:12px}.card img,.noimg{width:96px;height:96px;
object-fit:contain;background:#000;flex:none;image-rendering:pixelated}.noimg{color:#aaa;font-size:11px}
.pass{color:#2a7d2a}.fail{color:#c0392b;font-weight:600}.chosen{background:#e6f4e6}.tie{color:#888}
.k{color:#666}.card p{margin:2px 0;overflow-wrap:anywhere}"""

# Filter a gallery's cards by answer and question type; a broken image is a console error, so the browser
# test catches it.
JS = """function filt(g){var a=document.getElementById(g+"-a").value,t=document.getElementById(g+"-t").value,
n=0;document.querySelectorAll("#"+g+" .card").forEach(function(c){var ok=(!a||c.dataset.atype===a)&&
(!t||c.dataset.qtype===t);c.style.display=ok?"":"none";n+=ok?1:0;});
document.getElementById(g+"-n").textContent=n+" shown";}
window.addEventListener("load",function(){for(var i=0;i<document.images.length;i++){var im=document.images[i];
if(!im.naturalWidth){console.error("broken image: "+im.alt);}}});"""


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def esc(x):
    """Every text that reaches the page is escaped: predictions and questions are untrusted. Control
    characters (a random model writes them) are not allowed in HTML: each shows as U+FFFD."""
    return html.escape(CONTROL.sub("\ufffd", str(x)), quote=True)


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"

# -----------------------------------------------------------------------------
# The page


def page(title, sections):
    """A whole HTML document: the title, then the sections (HTML strings) in order."""
    body = "\n".join(s for s in sections if s)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body>\n<h1>{esc(title)}</h1>\n{body}\n<script>{JS}</script>"
            "</body></html>\n")


def write(path, title, sections):
    """Write the page to `path` and print its size; returns the size in bytes."""
    text = page(title, sections)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")
    size = len(text.encode())
    print(f"report: wrote {path} ({size / 1e6:.2f} MB)" if size >= 1e6 else f"report: wrote {path} "
          f"({size / 1e3:.1f} kB)", file=sys.stderr)
    return size


def section(title, *parts):
    return f"<section><h2>{esc(title)}</h2>\n" + "\n".join(p for p in parts if p) + "</section>"


def note(text):
    return f"<p class=\"note\">{esc(text)}</p>"


def table(header, rows):
    """rows: lists of cells; a cell is a value, or (text, {attribute: value}) for a cell a test can find."""
    def cell(c, tag="td"):
        text, attrs = c if isinstance(c, tuple) else (c, {})
        a = "".join(f" {k}=\"{esc(v)}\"" for k, v in attrs.items())
        return f"<{tag}{a}>{esc(text)}</{tag}>"
    head = "".join(cell(h, "th") for h in header)
    return f"<table><tr>{head}</tr>" + "".join("<tr>" + "".join(map(cell, r)) + "</tr>" for r in rows) \
        + "</table>"


_thumbs = {}


def thumbnail(path, size=THUMB):
    """A data: URI of the image downscaled to fit size x size (JPEG), cached by path; None if unreadable."""
    key = (str(path), size)
    if key not in _thumbs:
        from PIL import Image
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                im.thumbnail((size, size))
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=70)
            _thumbs[key] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        except OSError:  # a missing or broken image: the card says so instead
            _thumbs[key] = None
    return _thumbs[key]


def image_tag(path):
    uri = thumbnail(path) if path else None
    if uri is None:
        return "<div class=\"noimg\">no image</div>"
    return f"<img src=\"{uri}\" alt=\"{esc(Path(path).name)}\">"

# -----------------------------------------------------------------------------
# Charts: inline SVG


def bars(title, labels, series, vmax=100.0, ci=None, width=860, digits=1):
    """Horizontal grouped bars: one group per label, one bar per series {name: [value or None]};
    ci {name: [[lo, hi] or None]} draws each interval as a line over its bar."""
    names = list(series)
    ci = {n: (ci or {}).get(n) or [None] * len(labels) for n in names}
    bar_h, gap, left, right = 14, 10, 300, 50
    group_h = bar_h * len(names) + gap
    top = 24 + 20 * ((len(names) + 1) // 2 if len(names) > 1 else 0)  # room for the legend
    seen = [v for vs in series.values() for v in vs if v is not None]
    seen += [b for cs in ci.values() for c in cs if c for b in c]
    lo, hi = min([0.0] + seen), max([vmax] + seen)
    span = (hi - lo) or 1.0
    plot_w = width - left - right
    height = top + group_h * len(labels) + 4

    def x(v):
        return left + (v - lo) / span * plot_w
    out = [f"<svg width=\"{width}\" height=\"{height}\" role=\"img\">",
           f"<text x=\"0\" y=\"16\" font-weight=\"bold\">{esc(title)}</text>",
           f"<line x1=\"{x(0):.1f}\" y1=\"{top}\" x2=\"{x(0):.1f}\" y2=\"{height}\" stroke=\"#999\"/>"]
    out += legend(names, 24, 20, 380, 2) if len(names) > 1 else []
    for i, label in enumerate(labels):
        y0 = top + i * group_h
        out.append(f"<text x=\"{left - 6}\" y=\"{y0 + group_h / 2:.1f}\" text-anchor=\"end\" "
                   f"font-size=\"12\">{esc(label)}</text>")
        for j, name in enumerate(names):
            v, c = series[name][i], ci[name][i]
            y = y0 + j * bar_h
            if v is None:
                continue
            a, b = sorted((x(0), x(v)))
            out.append(f"<rect x=\"{a:.1f}\" y=\"{y}\" width=\"{max(b - a, 0.5):.1f}\" "
                       f"height=\"{bar_h - 2}\" "
                       f"fill=\"{COLOURS[j % len(COLOURS)]}\"><title>{esc(name)}: {v:.2f}</title></rect>")
            if c:
                out.append(f"<line x1=\"{x(c[0]):.1f}\" x2=\"{x(c[1]):.1f}\" y1=\"{y + bar_h / 2 - 1}\" "
                           f"y2=\"{y + bar_h / 2 - 1}\" stroke=\"#000\" stroke-width=\"1.5\"/>")
            out.append(f"<text x=\"{max(b, x(c[1]) if c else b) + 4:.1f}\" y=\"{y + bar_h - 3}\" "
                       f"font-size=\"11\">{v:.{digits}f}</text>")
    return "\n".join(out + ["</svg>"])


def legend(names, y, x0=0, col=180, per_row=3):
    out = []
    for j, name in enumerate(names):
        x, yy = x0 + (j % per_row) * col, y + (j // per_row) * 20
        out.append(f"<rect x=\"{x}\" y=\"{yy}\" width=\"12\" height=\"12\" "
                   f"fill=\"{COLOURS[j % len(COLOURS)]}\"/>"
                   f"<text x=\"{x + 16}\" y=\"{yy + 11}\" font-size=\"12\">{esc(name)}</text>")
    return out


def columns(title, labels, parts, width=720, height=220):
    """Vertical stacked columns: one per label, stacked parts {name: [count]} (a histogram, kept/dropped)."""
    names = list(parts)
    totals = [sum(parts[n][i] for n in names) for i in range(len(labels))]
    top = max(totals + [1])
    left, bottom, plot_h = 40, 60, height - 90
    step = (width - left - 10) / max(len(labels), 1)
    full = height - 30 + 20 * ((len(names) + 2) // 3)  # the legend's rows below
    out = [f"<svg width=\"{width}\" height=\"{full}\" role=\"img\">",
           f"<text x=\"0\" y=\"16\" font-weight=\"bold\">{esc(title)}</text>",
           f"<text x=\"{left - 4}\" y=\"34\" text-anchor=\"end\" font-size=\"11\">{top}</text>"]
    base = height - bottom
    for i, label in enumerate(labels):
        y = base
        for j, n in enumerate(names):
            h = parts[n][i] / top * plot_h
            y -= h
            out.append(f"<rect x=\"{left + i * step + 1:.1f}\" y=\"{y:.1f}\" width=\"{step - 2:.1f}\" "
                       f"height=\"{h:.1f}\" fill=\"{COLOURS[j % len(COLOURS)]}\">"
                       f"<title>{esc(label)}: {esc(n)} {parts[n][i]}</title></rect>")
        out.append(f"<text x=\"{left + (i + 0.5) * step:.1f}\" y=\"{base + 14}\" text-anchor=\"middle\" "
                   f"font-size=\"10\">{esc(label)}</text>")
    out.append(f"<line x1=\"{left}\" y1=\"{base}\" x2=\"{width - 10}\" y2=\"{base}\" stroke=\"#999\"/>")
    out += legend(names, height - 34, left)
    return "\n".join(out + ["</svg>"])


def lines(title, series, width=460, height=200, log_y=False):
    """A line chart of series {name: [(x, y)]}, axes from the data (y on a log scale with log_y)."""
    pts = {n: [(x, y) for x, y in s if y is not None and (y > 0 or not log_y)] for n, s in series.items()}
    pts = {n: s for n, s in pts.items() if s}
    if not pts:
        return ""
    tf = np.log10 if log_y else (lambda v: v)
    xs = [x for s in pts.values() for x, _ in s]
    ys = [float(tf(y)) for s in pts.values() for _, y in s]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, top, plot_w, plot_h = 64, 28, width - 80, height - 80

    def px(x, y):
        return left + (x - x0) / (x1 - x0) * plot_w, top + (1 - (float(tf(y)) - y0) / (y1 - y0)) * plot_h
    lab = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.3g}")
    out = [f"<svg width=\"{width}\" height=\"{height}\" role=\"img\">",
           f"<text x=\"0\" y=\"16\" font-weight=\"bold\">{esc(title)}</text>",
           f"<rect x=\"{left}\" y=\"{top}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" "
           "stroke=\"#ccc\"/>",
           f"<text x=\"{left - 4}\" y=\"{top + 10}\" text-anchor=\"end\" font-size=\"11\">{lab(y1)}</text>",
           f"<text x=\"{left - 4}\" y=\"{top + plot_h}\" text-anchor=\"end\" font-size=\"11\">"
           f"{lab(y0)}</text>",
           f"<text x=\"{left}\" y=\"{top + plot_h + 14}\" font-size=\"11\">step {x0:g}</text>",
           f"<text x=\"{left + plot_w}\" y=\"{top + plot_h + 14}\" text-anchor=\"end\" font-size=\"11\">"
           f"{x1:g}</text>"]
    for j, (name, s) in enumerate(pts.items()):
        d = " ".join(f"{a:.1f},{b:.1f}" for a, b in (px(x, y) for x, y in s))
        out.append(f"<polyline points=\"{d}\" fill=\"none\" stroke=\"{COLOURS[j % len(COLOURS)]}\" "
                   f"stroke-width=\"1.5\"><title>{esc(name)}</title></polyline>")
    out += legend(list(pts), height - 30, left)
    return "\n".join(out + ["</svg>"])

# -----------------------------------------------------------------------------
# Evaluation: the numbers, the bars, the wrong answers


def question_rows(examples, texts, s):
    """One dict per question (the per-question JSONL): id, image, question, answer type, question type,
    ground truth, prediction, every score of evaluate.score_item ("hits"), and the RULES it failed."""
    cols = [k for k in s if k not in ("CLOSED", "OPEN")]
    rows = []
    for i, (e, t) in enumerate(zip(examples, texts)):
        hits = {k: float(s[k][i]) for k in cols}
        failed = [k for k, _ in RULES[e["answer_type"]] if hits.get(k, 0.0) < 1]
        extra = {k: e[k] for k in ("question_type", "modality", "organ") if e.get(k) is not None}
        rows.append({"id": e["qid"], "image": str(e["image"]), "question": e["question"],
                     "answer_type": e["answer_type"], **extra, "ground_truth": e["answer"], "prediction": t,
                     "hits": hits, "failed": failed})
    return rows


def headline_table(res, labels):
    """Every metric of evaluate's result dict with its interval; cells carry data-key / data-value."""
    rows = []
    for key, label in labels.items():
        ci = (res.get("ci") or {}).get(key)
        rows.append([label, (fmt(res.get(key)), {"data-key": key, "data-value": res.get(key)}),
                     f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""])
    return table(["metric", "value", "95% CI"], rows)


GROUP_METRICS = ("closed_accuracy", "closed_accuracy_strict", "open_recall", "open_f1")


def group_bars(title, key, examples, s, summarize, labels):
    """Bars of GROUP_METRICS per value of e[key] (question type, modality, organ), from evaluate's own
    `summarize`, so each bar is the number evaluate.py would print for that subset."""
    values = sorted({str(e[key]) for e in examples if e.get(key) is not None})
    if len(values) < 2:
        return ""
    sums = {v: summarize(s, np.array([str(e.get(key)) == v for e in examples])) for v in values}
    rows = [[f"{v}", sums[v]["n"]] + [(fmt(sums[v][m]), {"data-group": f"{key}={v}", "data-key": m,
                                                          "data-value": sums[v][m]}) for m in GROUP_METRICS]
            for v in values]
    chart = bars(title, [f"{v} ({sums[v]['n']})" for v in values],
                 {labels[m]: [sums[v][m] for v in values] for m in GROUP_METRICS})
    return chart + table([key, "n"] + [labels[m] for m in GROUP_METRICS], rows)


def rule_chips(row):
    out = []
    for k, name in RULES[row["answer_type"]]:
        ok = k not in row["failed"]
        mark = "&#10003;" if ok else "&#10007;"  # a tick or a cross
        out.append(f"<span class=\"{'pass' if ok else 'fail'}\" data-rule=\"{k}\">{mark} {esc(name)}</span>")
    return "<br>".join(out)


def card(row, body, qid_attr="data-qid"):
    return (f"<div class=\"card\" {qid_attr}=\"{esc(row['id'])}\" data-atype=\"{esc(row['answer_type'])}\" "
            f"data-qtype=\"{esc(row.get('question_type', ''))}\">{image_tag(row['image'])}<div>"
            f"<p><span class=\"k\">#{esc(row['id'])} {esc(row['answer_type'].lower())}"
            f"{' · ' + esc(row['question_type']) if row.get('question_type') else ''}</span> "
            f"{esc(row['question'])}</p>{body}</div></div>")


def gallery(gid, title, rows, cards, limit=GALLERY_MAX):
    """Cards with a filter by answer type and question type; capped at `limit` with a note."""
    qtypes = sorted({r.get("question_type") for r in rows if r.get("question_type")})
    opts = "".join(f"<option>{esc(t)}</option>" for t in qtypes)
    bar = (f"<p>answer type <select id=\"{gid}-a\" onchange=\"filt('{gid}')\"><option value=\"\">all</option>"
           f"<option>CLOSED</option><option>OPEN</option></select> question type <select id=\"{gid}-t\" "
           f"onchange=\"filt('{gid}')\"><option value=\"\">all</option>{opts}</select> "
           f"<span id=\"{gid}-n\">{min(len(rows), limit)} shown</span></p>")
    capped = ""
    if len(rows) > limit:
        capped = note(f"Showing the first {limit} of {len(rows)}; all are in the JSONL beside this file.")
    return section(f"{title} ({len(rows)})", capped, bar,
                   f"<div class=\"cards\" id=\"{gid}\">" + "\n".join(cards[:limit]) + "</div>")


def evaluation(res, examples, texts, s, summarize, labels, limit=GALLERY_MAX):
    """The evaluation report's sections: res = evaluate.report's dict, s = evaluate.score(examples, texts),
    summarize = evaluate.summarize, labels = evaluate.LABELS. Returns (sections, question rows)."""
    rows = question_rows(examples, texts, s)
    match = [f"{res.get('n_' + w, 0)} {w}" for w in ("missing", "duplicate", "unknown") if res.get("n_" + w)]
    head = section("Headline numbers",
                   note(f"{res['n']} questions: {res['n_closed']} closed, {res['n_open']} open"
                        + (f"; answer ids: {', '.join(match)} (a missing answer scores as empty)"
                           if match else "")),
                   headline_table(res, labels))
    per_type = [k for k in labels if res.get(k) is not None]
    chart = bars("closed metrics over CLOSED questions, open ones over OPEN questions, with the 95% CIs",
                 [labels[k] for k in per_type], {"value": [res[k] for k in per_type]},
                 ci={"value": [(res.get("ci") or {}).get(k) for k in per_type]})
    types = section("By answer type", chart)
    groups = [group_bars(f"by {what}", key, examples, s, summarize, labels)
              for key, what in (("question_type", "question type"), ("modality", "modality"),
                                ("organ", "organ"))]
    groups = [g for g in groups if g]
    wrong = [r for r in rows if r["failed"]]
    cards = [card(r, f"<p><span class=\"k\">truth</span> {esc(r['ground_truth'])}</p>"
                     f"<p><span class=\"k\">model</span> {esc(r['prediction'])}</p><p>{rule_chips(r)}</p>")
             for r in wrong]
    return [head, types, section("By question type, modality and organ", *groups) if groups else "",
            gallery("wrong", "Wrong answers (failing any rule of their answer type)", wrong, cards, limit)], \
        rows


def write_evaluation(path, res, examples, texts, s, summarize, labels, limit=GALLERY_MAX):
    """evaluate.py --report: the HTML at `path` and the per-question JSONL beside it
    (<stem>.questions.jsonl)."""
    sections, rows = evaluation(res, examples, texts, s, summarize, labels, limit)
    jsonl = Path(path).with_suffix(".questions.jsonl")
    write(path, f"{res['dataset']}: evaluation", sections
          + [note(f"Per-question results: {jsonl.name}")])
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def headline_hit(row):
    """The papers' number a question adds to: closed accuracy (0/1) or open recall (0..1)."""
    return row["hits"]["closed" if row["answer_type"] == "CLOSED" else "recall"]


def comparison(res, examples, texts, scores, labels, names=("A", "B"), limit=GALLERY_MAX):
    """--compare's sections: res = the paired differences {metric: {a, b, diff, ci}} (evaluate.compare),
    texts / scores = (A's, B's) texts and evaluate.score arrays. Changed = the question's papers' score
    (closed accuracy or open recall) differs: fixed if B's is higher, broken if lower."""
    ra, rb = (question_rows(examples, t, s) for t, s in zip(texts, scores))
    keys = [k for k in labels if isinstance(res.get(k), dict)]
    diffs = table(["metric", names[0], names[1], f"{names[1]} - {names[0]}", "95% CI (paired)"],
                  [[labels[k], fmt(res[k]["a"]), fmt(res[k]["b"]),
                    (f"{res[k]['diff']:+.2f}", {"data-key": k, "data-value": res[k]["diff"]}),
                    f"[{res[k]['ci'][0]:+.2f}, {res[k]['ci'][1]:+.2f}]" if res[k].get("ci") else ""]
                   for k in keys])
    chart = bars(f"{names[1]} - {names[0]}, points, with the paired 95% CI", [labels[k] for k in keys],
                 {"difference": [res[k]["diff"] for k in keys]}, vmax=0.0,
                 ci={"difference": [res[k].get("ci") for k in keys]})
    fixed, broken = [], []
    for a, b in zip(ra, rb):
        if headline_hit(b) != headline_hit(a):
            (fixed if headline_hit(b) > headline_hit(a) else broken).append((a, b))

    def cards(pairs):
        return [card(a, "".join(f"<p><span class=\"k\">{esc(n)} ({headline_hit(r):.2f})</span> "
                                f"{esc(r['prediction'])}</p>" for n, r in zip(names, (a, b)))
                     + f"<p><span class=\"k\">truth</span> {esc(a['ground_truth'])}</p>") for a, b in pairs]
    return [section("Paired differences", note(f"{len(examples)} questions, the same in both files; "
                                                f"{len(fixed)} fixed, {len(broken)} broken"), diffs, chart),
            gallery("fixed", f"Fixed: better in {names[1]}", [a for a, _ in fixed], cards(fixed), limit),
            gallery("broken", f"Broken: worse in {names[1]}", [a for a, _ in broken], cards(broken), limit)]


def write_comparison(path, res, examples, texts, scores, labels, names=("A", "B")):
    """evaluate.py --compare A B --report: the changed questions and the paired differences."""
    names = [Path(n).name for n in names]
    return write(path, f"{res.get('dataset', '')}: {names[1]} vs {names[0]}",
                 comparison(res, examples, texts, scores, labels, names))

# -----------------------------------------------------------------------------
# A run's out_dir: training curves, the judged self-asked questions, a selector summary

CURVES = (("loss (log scale)", ("answer_loss", "question_loss", "loss"), True),
          ("DPO rewards: margin, chosen, rejected", ("margin", "chosen_reward", "rejected_reward"), False),
          ("DPO reward accuracy", ("reward_acc",), False), ("learning rate", ("lr",), False),
          ("gradient norm", ("grad_norm",), True))


def read_log(log_path):
    """log.jsonl's records, one per step (a resumed run appends: the last record of a step wins)."""
    by_step = {}
    for line in Path(log_path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            by_step[r["step"]] = r
    return [by_step[k] for k in sorted(by_step)]


def training_curves(log_path, title="Training curves"):
    """A section of line charts from a log.jsonl (train.Logger): answer and question loss (stage 1), DPO
    loss, reward margin and accuracy (stage 2), learning rate, gradient norm; "" without the file."""
    if not Path(log_path).is_file():
        return ""
    log = read_log(log_path)
    charts = [lines(name, {k: [(r["step"], r.get(k)) for r in log] for k in keys if any(k in r for r in log)},
                    log_y=log_y) for name, keys, log_y in CURVES]
    last = log[-1] if log else {}
    summary = table(["last step"] + [k for k in last if k != "step"],
                    [[last.get("step", "-")] + [f"{v:.4g}" if isinstance(v, float) else v
                                                for k, v in last.items() if k != "step"]])
    return section(f"{title} ({log_path})", note(f"{len(log)} logged steps"), summary,
                   "<div class=\"cards\">" + "".join(c for c in charts if c) + "</div>")


def write_verdicts(out_dir, rated, image_dir):
    """dpo.py's judge step: each judged row (image, question, the two answers, the scores or the error) to
    out_dir/verdicts.jsonl, then the run's report (out_dir/report.html)."""
    rows = [{k: r[k] for k in ("image", "question", "answers", "scores", "error") if k in r}
            | {"path": str(Path(image_dir) / r["image"])} for r in rated]
    Path(out_dir, "verdicts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return write_run(out_dir)


def judged(out_dir, limit=GALLERY_MAX):
    """The self-asked questions per image with both answers, the scores and the chosen side, and the counts
    of kept, malformed, repeated, tied and failed questions (generations.jsonl and verdicts.jsonl)."""
    verdicts = [json.loads(x) for x in Path(out_dir, "verdicts.jsonl").read_text().splitlines() if x.strip()]
    ends = []
    gen = Path(out_dir, "generations.jsonl")
    if gen.is_file():
        ends = [r for r in map(json.loads, gen.read_text().splitlines()) if "question" not in r]
    malformed, repeats = sum(r.get("dropped", 0) for r in ends), sum(r.get("repeats", 0) for r in ends)
    failed = [v for v in verdicts if "error" in v]
    tied = [v for v in verdicts if "scores" in v and v["scores"][0] == v["scores"][1]]
    pairs = len(verdicts) - len(failed) - len(tied)
    counts = [("images", sum(r.get("images", 0) for r in ends)),
              ("questions asked", len(verdicts) + malformed + repeats), ("kept (judged)", len(verdicts)),
              ("malformed (dropped)", malformed), ("repeated (dropped)", repeats),
              ("preference pairs", pairs), ("tied (dropped)", len(tied)), ("failed verdicts", len(failed))]
    head = table(["", "count"], [[k, (v, {"data-count": k})] for k, v in counts])
    fate = {"preference pairs": pairs, "tied": len(tied), "failed": len(failed), "malformed": malformed,
            "repeated": repeats}
    chart = bars("what became of the questions asked", list(fate), {"questions": list(fate.values())},
                 vmax=0.0, width=600, digits=0)
    by_image = {}
    for v in verdicts:
        by_image.setdefault(v["image"], []).append(v)
    cards = []
    for image, vs in by_image.items():
        qs = []
        for v in vs:
            s = v.get("scores")
            win = None if not s or s[0] == s[1] else (0 if s[0] > s[1] else 1)
            answers = "".join(f"<p class=\"{'chosen' if win == i else ''}\"><span class=\"k\">answer {i + 1}"
                              f"{' (%g)' % s[i] if s else ''}{' chosen' if win == i else ''}</span> "
                              f"{esc(a)}</p>" for i, a in enumerate(v["answers"][:2]))
            state = (f"<p class=\"fail\">failed: {esc(v['error'])}</p>" if "error" in v
                     else "<p class=\"tie\">tie: dropped</p>" if win is None else "")
            qs.append(f"<div><p class=\"q\"><b>{esc(v['question'])}</b></p>{answers}{state}</div>")
        cards.append(f"<div class=\"card\" data-image=\"{esc(image)}\" data-atype=\"\" data-qtype=\"\" "
                     f"style=\"width:760px\">{image_tag(vs[0].get('path'))}<div>{''.join(qs)}</div></div>")
    shown = note(f"Showing the first {limit} of {len(cards)} images.") if len(cards) > limit else ""
    return section("Self-asked questions and the judge's verdicts", head, chart, shown,
                   "<div class=\"cards\">" + "\n".join(cards[:limit]) + "</div>")


def selector(summary):
    """BioMed-VITAL's selection (selector.py's summary dict): the score histogram, kept and dropped per
    cluster, the held-out pair accuracy and, on the synthetic data, how the corrupted records fared."""
    h = summary["score_histogram"]
    edges = h["edges"]
    labels = [f"{a:.2g}" for a in edges[:-1]]
    hist = columns(f"selector scores (bins from {edges[0]:.3g} to {edges[-1]:.3g})", labels,
                   {"kept": h["kept"], "dropped": [a - k for a, k in zip(h["all"], h["kept"])]})
    pc = summary["per_cluster"]
    clusters = columns("kept and dropped per k-means cluster", [f"c{c['cluster']}" for c in pc],
                       {"kept": [c["kept"] for c in pc], "dropped": [c["size"] - c["kept"] for c in pc]})
    rows = [[f"c{c['cluster']}", c["size"], (c["kept"], {"data-cluster": c["cluster"]}), c["mean_score"]]
            for c in pc]
    acc = summary.get("heldout_pair_accuracy", {})
    extra = [[k, v] for k, v in (summary.get("corrupted") or {}).items()]
    return section("BioMed-VITAL selector",
                   note(f"{summary['kept']} of {summary['n']} records kept (top {summary['top']:g} of each "
                        f"cluster) from {summary.get('data', '')}"),
                   table(["held-out pairs", "accuracy"], [[k, v] for k, v in acc.items()]),
                   hist, clusters, table(["cluster", "size", "kept", "mean score"], rows),
                   table(["synthetic corruption", "value"], extra) if extra else "")


def write_run(out_dir, head=(), tail=(), title=None):
    """out_dir/report.html: the `head` sections, then what the out_dir holds: training curves (log.jsonl),
    the judged questions (verdicts.jsonl), selector summaries (*.summary.json); then the `tail` sections."""
    out = Path(out_dir)
    parts = list(head) + [training_curves(out / "log.jsonl")]
    if (out / "verdicts.jsonl").is_file():
        parts.append(judged(out))
    parts += [selector(json.loads(p.read_text())) for p in sorted(out.glob("*.summary.json"))] + list(tail)
    if not any(parts):
        parts = [note("Nothing to show yet: no log.jsonl, verdicts.jsonl or *.summary.json here.")]
    return write(out / "report.html", title or f"run report: {out}", parts)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        raise SystemExit("usage: python report.py OUT_DIR   (writes OUT_DIR/report.html)")
    write_run(sys.argv[1])
