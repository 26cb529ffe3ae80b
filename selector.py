"""
BioMed-VITAL's learned data selector: a judge distilled from clinician and model preferences, then per-cluster
top-K selection of instruction data.

BioMed-VITAL §3.2 distils clinician and GPT-4V preferences into a rating f(x) of one instruction
sample x = (image, instruction + response), then keeps the top K% of every k-means cluster. Authors' code:
mao1207/BioMed-VITAL @ f6ccf75, filter/train_clip_filter.py (training) and filter/filter.py (selection).

    python selector.py --model DIR --data instruct.json --image_dir D --pairs pairs.jsonl --top 0.5
    python selector.py --model synth_base    # synthetic default: corrupted toy data + oracle-rated pairs

- Features, frozen, from our model.py: the vision tower's patch features mean-pooled, concatenated with the
  decoder's final-norm hidden states averaged over the real tokens of "Question: q / Answer: a" text (no image
  tokens: two towers, like BiomedCLIP's image and text encoders). The authors fine-tune BiomedCLIP end to end.
- Head: the authors' MLP (three Linear-ReLU of width 512, then Linear to 1) on standardised features, minus
  their final Sigmoid: f is a logit and σ sits in the loss (a Sigmoid output keeps |f_i - f_j| < 1).
- Loss, Eq. 1/3, "a pairwise classification": -w (z_i log σ(f_i - f_j) + z_j log σ(f_j - f_i)). Eq. 1
  prints σ(f(x_i)); literally that only raises the preferred sample's rating and never compares the two, so we
  read σ as the softmax over the pair, P(x_i preferred) = σ(f_i - f_j): the authors' (unused) `rank_loss`.
- Tie rule, Eq. 2: (z_i, z_j) = (1, 0) if R_i >= R_j, else (0, 1): a tie counts as a win for x_i, the first
  of the pair. The authors' code never applies it: the loss it calls is `hinge_loss`, mean(w max(0, 1 - y
  (f_i - f_j))) with y = +1 if s_i > s_j else -1 (a tie would count for x_j), and its sampler draws model
  pairs from two different score levels and clinician pairs as (1, 0), so no pair is tied. We follow Eq. 2
  and log the number of tied training pairs; our synthetic pairs, like theirs, have none.
- w weighs the human (clinician) pairs, model pairs weigh 1, as in the authors' code. The paper's reason:
  w = 400 at a 1:400 human:model mix "happens to balance the contribution of human and model-annotated
  preference in the total training loss", true only with w on the scarce human pairs (w on the model-rated
  pairs would weigh the 400x larger source 400x more and balance nothing).
- Mixing: every batch holds human and model pairs in their overall ratio (each source shuffled and cut into
  as many slices as there are batches), so an epoch sees each pair once and the few human pairs never bunch
  up.
- Selection: the paper clusters all samples into K groups and "uniformly select[s] top-ranked data in each
  group"; filter.py takes a global top int(p N) instead. We run k-means on the same standardised features and
  keep the ceil(K% x size) best-scored samples of every cluster: rounding up, so no cluster is emptied and the
  total kept lies between K% N and K% N + k.
"""
import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import report as R
import runs
import synth as S
from checkpoint import from_pretrained
from data import load_tokenizer, preprocess_image
from runs import fail


def pairwise_loss(f_i, f_j, s_i, s_j, w):
    """Eq. 3 with Eq. 2's labels: mean over pairs of -w (z_i log σ(f_i - f_j) + z_j log σ(f_j - f_i)),
    z_i = [s_i >= s_j] (a tie counts for x_i), z_j = 1 - z_i. f: ratings (P,), s: preferences (P,),
    w: scalar or (P,)."""
    z_i = (s_i >= s_j).to(f_i.dtype)
    d = f_i - f_j
    return (-w * (z_i * F.logsigmoid(d) + (1 - z_i) * F.logsigmoid(-d))).mean()


def kmeans(x, k, iters=100, seed=0, n_init=10):
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007), seeded: x (N, D) -> (labels (N,),
    centres (k, D)). One seeding can still split a big cluster and merge two small ones, so, like
    scikit-learn's n_init, the best of n_init seedings (lowest within-cluster sum of squares) wins. An emptied
    cluster keeps its centre."""
    x = x.float()
    g = torch.Generator().manual_seed(seed)
    best = None
    if not 0 < k <= len(x):
        raise ValueError(f"k-means needs 1 <= k <= N points, got k={k}, N={len(x)}")
    for _ in range(n_init):
        centres = x[torch.randint(len(x), (1,), generator=g)]
        # the next centre is drawn with probability ~ squared distance to the nearest one
        for _ in range(k - 1):
            d2 = torch.cdist(x, centres).min(1).values.pow(2)
            pick = torch.multinomial(d2 if d2.sum() > 0 else d2 + 1, 1, generator=g)
            centres = torch.cat([centres, x[pick]])
        for _ in range(iters):
            labels = torch.cdist(x, centres).argmin(1)  # (N,)
            counts = torch.bincount(labels, minlength=k)[:, None]
            sums = torch.zeros_like(centres).index_add_(0, labels, x)  # (k, D)
            new = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
            if torch.equal(new, centres):
                break
            centres = new
        labels = torch.cdist(x, centres).argmin(1)
        inertia = (x - centres[labels]).pow(2).sum().item()
        if best is None or inertia < best[0]:
            best = (inertia, labels, centres)
    return best[1], best[2]


def select_top(scores, clusters, frac):
    """Sorted indices of the ceil(frac x size) highest-scored samples of every cluster (ties: lower index
    first)."""
    keep = []
    for c in torch.unique(clusters):
        idx = (clusters == c).nonzero().flatten()
        n = math.ceil(round(frac * len(idx), 9))  # round first: 0.07 * 100 = 7.000000000000001 keeps 7, not 8
        keep.append(idx[torch.argsort(scores[idx], descending=True, stable=True)[:n]])
    return torch.cat(keep).sort().values


def pair_accuracy(f_i, f_j, s_i, s_j):
    """The authors' test "success rate": fraction of (untied) pairs whose rating order matches the
    preference."""
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
    """A sample's text, "Question: q\\nAnswer: a" per turn (BioMed-VITAL: "Question:"+q+"Answer:"+a), no
    image tag."""
    return "\n".join(("Question: " if t["from"] == "human" else "Answer: ")
                     + t["value"].replace("<image>", "").strip() for t in rec["conversations"])


@torch.no_grad()
def selector_features(model, tokenizer, items, image_dir, batch=64, max_len=512):
    """(N, D_vision + D_text) frozen features of items {"image", "conversations"}: vision-tower patch features
    mean-pooled ++ decoder hidden states averaged over the real tokens of item_text. Each image is encoded
    once."""
    model.eval()
    size = model.config.vision.image_size
    p = next(model.parameters())
    names = sorted({it["image"] for it in items})
    img = {}
    for b in range(0, len(names), batch):
        px = torch.stack([preprocess_image(Path(image_dir) / n, size) for n in names[b:b + batch]])
        pooled = model.vision_tower(px.to(p.device, p.dtype)).mean(1).float().cpu()  # (B, D_vision)
        img.update(zip(names[b:b + batch], pooled))
    ids = [tokenizer.encode(item_text(it)).ids[:max_len] for it in items]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    text = torch.zeros(len(ids), model.config.text.hidden_size)
    for b in range(0, len(order), batch):  # batches of similar length waste little on padding
        rows = order[b:b + batch]
        T = max(len(ids[i]) for i in rows)
        # (B, T): 1 on the real tokens, right padding
        mask = torch.tensor([[1] * len(ids[i]) + [0] * (T - len(ids[i])) for i in rows])
        ids_b = torch.tensor([ids[i] + [0] * (T - len(ids[i])) for i in rows])
        h = model.hidden_states(ids_b.to(p.device), None, mask.to(p.device)).float().cpu()  # (B, T, D)
        text[rows] = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # masked mean over real tokens
    return torch.cat([torch.stack([img[it["image"]] for it in items]), text], 1)


def train_selector(x_i, x_j, s_i, s_j, human, w=400.0, epochs=6, lr=1e-4, batch=64, hidden=512, seed=0):
    """Adam on Eq. 3 over frozen pair features x_* (P, D); human (P,) bool marks the pairs that weigh w."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    head = Selector(x_i.shape[1], hidden)
    both = torch.cat([x_i, x_j])
    head.mean.copy_(both.mean(0))
    head.std.copy_(both.std(0).clamp(min=1e-6))
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    weight = torch.where(human, w, 1.0)
    steps = max(1, math.ceil(len(s_i) / batch))
    for _ in range(epochs):
        parts = [src[torch.randperm(len(src), generator=g)].tensor_split(steps)
                 for src in (human.nonzero().flatten(), (~human).nonzero().flatten())]
        # batch t = slice t of the human pairs + slice t of the model pairs
        for b in map(torch.cat, zip(*parts)):
            loss = pairwise_loss(head(x_i[b]), head(x_j[b]), s_i[b], s_j[b], weight[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


def read_pairs(path):
    """Pairs JSONL: {"items": [x_i, x_j], "scores": [R_i, R_j], "source": "human" | "model"}, x = {"image",
    "conversations"}; or `judge.py rate` rows {"image", "question", "answers": [a1, a2], "scores"} (model
    pairs unless "source" says otherwise). Rows with an "error" (judge failures) are skipped and counted; a
    malformed row stops the run naming its line."""
    def problem(r):
        if "error" in r:
            return None
        if not ("items" in r and len(r["items"]) == 2 or {"image", "question", "answers"} <= r.keys()):
            return 'a pair needs "items": [x_i, x_j], or "image", "question" and "answers"'
        if not (isinstance(r.get("scores"), list) and len(r["scores"]) == 2
                and all(isinstance(x, (int, float)) for x in r["scores"])):
            return 'a pair needs "scores": [R_i, R_j], two numbers'
    pairs = []
    rows = runs.read_records(path, check=problem)
    for r in rows:
        if "error" in r:
            continue
        items = r.get("items") or [
            {"image": r["image"], "conversations": [{"from": "human", "value": r["question"]},
                                                    {"from": "gpt", "value": a}]}
            for a in r["answers"][:2]]
        scores = [float(s) for s in r["scores"]]
        pairs.append({"items": items, "scores": scores, "source": r.get("source", "model")})
    if len(pairs) < len(rows):
        print(f"selector: {len(rows) - len(pairs)} of {len(rows)} rows of {path} are judge failures, skipped")
    if not pairs:
        fail(f"{path}: no rated pair to train the selector on")
    return pairs


def index_samples(pairs, records):
    """Distinct samples of the pairs and the records (features are computed once each): (items, ij (P, 2)
    rows of each pair's two samples, rows (N,) of the records)."""
    items, index = [], {}

    def row(x):
        key = json.dumps([x["image"], x["conversations"]])
        if key not in index:
            index[key] = len(items)
            items.append(x)
        return index[key]
    ij = torch.tensor([[row(x) for x in p["items"]] for p in pairs])  # pairs first, then the records
    return items, ij, torch.tensor([row(r) for r in records])


def synthetic_selection_data(out_dir, corrupt=0.3, n_model=4000, n_human=10, noise=1.0, pool=0.7, seed=0,
                             source="train.json"):
    """Stand-in for BioMed-VITAL's candidates and ratings, written to out_dir; returns (data, pairs,
    image_dir).
    data: the toy-radiology records of `source` (train.json conversations or captions.json), a `corrupt`
    fraction ("corrupted": true) with every answer rewritten for one other coherent set of facts (modality,
    organ and lesion count all differ; lesions kept where a question asks where or how big), so the text alone
    stays plausible.
    pairs: n_model "model" pairs of two records from the first `pool` fraction, rated by the oracle judge
    (mean score_answer over the turns + N(0, noise), rounded, clipped to 0-10 like GPT-4V), at two different
    levels as the authors draw them; n_human "human" pairs: a clean record of the pool and its corrupted copy,
    (1, 0)."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    root = S.synth_data(seed=seed)
    facts = json.loads((root / "facts.json").read_text())
    recs = json.loads((root / source).read_text())

    def qa(rec):  # (question text, answer turn) per turn
        turns = rec["conversations"]
        return [(q["value"].replace("<image>", "").strip(), a) for q, a in zip(turns[::2], turns[1::2])]

    def corrupted(rec):
        f = facts[rec["image"]]
        turns = [dict(t) for t in rec["conversations"]]
        where = any((S.parse_question(q) or {}).get("type") in ("side", "size") for q, _ in qa(rec))
        # redraw until modality, organ and count all differ; "none" to "where?" would give it away
        while ((o := S.synth_facts(rng))["modality"] == f["modality"] or o["organ"] == f["organ"]
               or o["count"] == f["count"] or (where and o["count"] == 0)):
            pass
        # a free question ("describe") gets the other image's caption
        for (q, _), a in zip(qa(rec), turns[1::2]):
            a["value"] = S.answer_question(o, q) or S.synth_caption(o)
        return {**rec, "conversations": turns, "corrupted": True}

    def rating(rec):
        s = np.mean([S.score_answer(facts[rec["image"]], q, a["value"]) for q, a in qa(rec)])
        return float(np.clip(np.round(s + noise * rng.normal()), 0, 10))

    bad = set(rng.choice(len(recs), round(corrupt * len(recs)), replace=False).tolist())
    data = [corrupted(r) if i in bad else {**r, "corrupted": False} for i, r in enumerate(recs)]
    rated = [(r, rating(r)) for r in data[:int(pool * len(data))]]
    pairs = []
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
    """`python selector.py`: train the selector, report held-out pair accuracy, then score, cluster and keep
    top K%."""
    data_path, pairs_path, image_dir = args.data, args.pairs, args.image_dir
    out = Path(args.out)
    # every flag and input is checked before the seconds of features and training
    runs.at_least(clusters=args.clusters, epochs=args.epochs, batch=args.batch)
    if not (0 < args.top <= 1 and 0 <= args.holdout < 1):
        fail(f"--top={args.top} must lie in (0, 1] and --holdout={args.holdout} in [0, 1)")
    device = runs.check_device(args.device)
    runs.check_model_dir(args.model)
    if args.tokenizer and not os.path.exists(args.tokenizer):
        fail(f"--tokenizer {args.tokenizer} does not exist")
    if not data_path:  # the synthetic default
        data_path, pairs_path, image_dir = synthetic_selection_data(out.parent, seed=args.seed)
    elif not pairs_path:
        fail("--data needs --pairs (rated pairs to train the selector on)")
    records = runs.read_records(data_path, ("conversations",))
    if not records or args.clusters > len(records):
        fail(f"--clusters={args.clusters}: {data_path} has {len(records)} records, k-means needs at least k")
    pairs = read_pairs(pairs_path)
    runs.print_settings({**vars(args), "data": data_path, "pairs": pairs_path, "image_dir": image_dir})
    model = from_pretrained(args.model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                            device=device)
    tok = args.tokenizer or args.model
    items, ij, rows = index_samples(pairs, records)
    s = torch.tensor([p["scores"] for p in pairs])  # (P, 2)
    human = torch.tensor([p["source"] == "human" for p in pairs])
    held = torch.rand(len(pairs), generator=torch.Generator().manual_seed(args.seed)) < args.holdout
    feats = selector_features(model, load_tokenizer(tok), items, image_dir)
    tr = ~held
    head = train_selector(feats[ij[tr, 0]], feats[ij[tr, 1]], s[tr, 0], s[tr, 1], human[tr], args.w,
                          args.epochs, args.lr, args.batch, seed=args.seed)
    with torch.no_grad():
        f = head(feats)
    acc = {k: round(pair_accuracy(f[ij[m, 0]], f[ij[m, 1]], s[m, 0], s[m, 1]), 4)
           for k, m in (("human", held & human), ("model", held & ~human), ("all", held))}
    print(f"selector: {int(tr.sum())} training pairs ({int((tr & human).sum())} human, weight w={args.w:g}; "
          f"{int((s[tr, 0] == s[tr, 1]).sum())} tied); held-out pair accuracy {acc}")
    scores = f[rows]
    x = feats[rows]
    labels = kmeans((x - head.mean) / head.std, args.clusters, seed=args.seed)[0]
    keep = select_top(scores, labels, args.top)
    edges = np.histogram_bin_edges(scores.numpy(), bins=10)
    histogram = {"edges": edges.round(3).tolist(), "all": np.histogram(scores, edges)[0].tolist(),
                 "kept": np.histogram(scores[keep], edges)[0].tolist()}
    per_cluster = [{"cluster": c, "size": int((labels == c).sum()), "kept": int((labels[keep] == c).sum()),
                    "mean_score": round(scores[labels == c].mean().item(), 3)} for c in range(args.clusters)]
    summary = {"data": str(data_path), "n": len(records), "kept": len(keep), "top": args.top,
               "heldout_pair_accuracy": acc, "score_histogram": histogram, "per_cluster": per_cluster}
    if all("corrupted" in r for r in records):  # synthetic: how well the scores separate the known corruption
        bad = torch.tensor([r["corrupted"] for r in records])
        seen = {x["image"] for p in pairs for x in p["items"]}
        new = torch.tensor([r["image"] not in seen for r in records])
        summary["corrupted"] = {"fraction_all": round(bad.float().mean().item(), 4),
                                "fraction_kept": round(bad[keep].float().mean().item(), 4),
                                "auc_clean_over_corrupted": round(auc(scores, ~bad), 4),
                                "auc_unseen_images": (round(auc(scores[new], ~bad[new]), 4) if new.any()
                                                      else None)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([records[i] for i in keep.tolist()], indent=1))
    Path(f"{out}.summary.json").write_text(json.dumps(summary, indent=1))
    torch.save(head.state_dict(), f"{out}.selector.pt")
    print(json.dumps({k: v for k, v in summary.items() if k != "per_cluster"}))
    kept = ", ".join(f"{c['kept']}/{c['size']}" for c in summary["per_cluster"])
    print(f"kept per cluster: {kept}; wrote {out}")
    if args.report:  # the histogram and the kept / dropped split per cluster, drawn
        R.write(args.report, f"selection: {out}", [R.selector(summary)])


def main(argv=None):
    s = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    s.add_argument("--model", default="synth_base",
                   help="model.py checkpoint whose frozen towers give the features (default synth_base)")
    s.add_argument("--tokenizer", default="",
                   help="default: the model folder's (synthetic default: the toy one)")
    s.add_argument("--data", default="",
                   help="instruction JSON to select from ('' = the synthetic corrupted data)")
    s.add_argument("--image_dir", default=".", help="image paths of --data and --pairs are relative to this "
                   "(default .)")
    s.add_argument("--pairs", default="", help="rated pairs, JSONL (see read_pairs); needed with --data")
    s.add_argument("--out", default="out/select/selected.json",
                   help="the kept records; also OUT.summary.json (default out/select/selected.json)")
    s.add_argument("--top", type=float, default=0.5,
                   help="K: fraction kept per cluster (default 0.5; the paper: 0.1, 0.5, 0.8)")
    s.add_argument("--clusters", type=int, default=8, help="k-means clusters (default 8)")
    s.add_argument("--w", type=float, default=400.0, help="weight of a human pair (default 400: the paper's "
                   "best, at 1:400)")
    s.add_argument("--epochs", type=int, default=6, help="passes over the pairs (default 6, the paper's)")
    s.add_argument("--lr", type=float, default=1e-4, help="Adam's (default 1e-4, the paper's; its code 1e-5)")
    s.add_argument("--batch", type=int, default=64, help="pairs per batch (default 64, the authors' code)")
    s.add_argument("--holdout", type=float, default=0.2, help="fraction of pairs held out for pair accuracy "
                   "(default 0.2)")
    s.add_argument("--seed", type=int, default=0, help="split, initialisation, k-means (default 0)")
    s.add_argument("--device", default="",
                   help="for the frozen features (default: cuda if available); the head trains on CPU")
    s.add_argument("--report", default="", help="also write an HTML report of the selection here")
    return select_main(s.parse_args(argv))


if __name__ == "__main__":
    runs.run_main(main)
