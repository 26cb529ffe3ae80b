"""
Run bookkeeping shared by every job: settings from the command line (parse_config, with a --help written from
the config dataclass), one-line user errors (exit code 2), fingerprints that say what made an output, the
lock that keeps two runs out of one out_dir, the effective settings as config.json, inputs checked before
expensive work (model directories, devices, record formats), and JSONL outputs that survive a kill.
No torch at import (check_device imports it when a torch job calls), so judge.py can use it too.

    from runs import fail, fingerprint, check_reuse, lock_out_dir
    fp = fingerprint(model=identity(cfg.model), data=identity(cfg.data), n_questions=cfg.n_questions)
    if check_reuse(out, fp, cfg.overwrite):   # True: same inputs, reuse; a difference stops with its name
        ...
"""
import argparse
import atexit
import hashlib
import inspect
import json
import os
import re
import shutil
import sys
import typing
from dataclasses import asdict, fields


class UsageError(Exception):
    """A user mistake (bad flag, missing or malformed file). `run_main` prints it as one line, exit code 2."""


def fail(msg):
    """Stop with a one-line error that names the culprit and what would be right."""
    raise UsageError(msg)


def run_main(main, argv=None):
    """Run a job's main(); a UsageError becomes `<script>: error: <msg>` on stderr and exit code 2
    (argparse's convention), with no traceback. Everything else is a bug and keeps its traceback."""
    try:
        return main(argv)
    except UsageError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        raise SystemExit(2)


# -----------------------------------------------------------------------------
# A job's settings: a dataclass from the command line, `--help` written from the dataclass itself


def field_help(cls):
    """Each field's one-line description: the comment beside it in the class source, else the comment
    lines right above it (nanoGPT keeps a config's documentation there too)."""
    helps, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
            continue
        m = re.match(r"(\w+)\s*:[^#]*?(?:  # (.*))?$", text)
        if m:
            helps[m.group(1)] = m.group(2) or " ".join(above)
        above = []
    return helps


def parse_config(cls, argv=None, synthetic=None, usage=None, epilog=None):
    """A dataclass from `--key=value` arguments, and the dict of the keys the command line set.

    Booleans are `--flag` / `--no-flag`; a `Literal[...]` field takes only its values. `--help` lists every
    field with its description (field_help), its default and, where the synthetic default replaces it,
    the value that applies there (`synthetic`, key -> value). A bad flag, type or choice stops with one
    line, exit code 2, as every user error does (fail)."""
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0]
    p = argparse.ArgumentParser(description=doc, usage=usage, epilog=epilog)
    p.error = lambda message: fail(message + " (--help lists the flags)")
    helps = field_help(cls)
    for f in fields(cls):
        default = f"default {f.default!r}"
        if synthetic and f.name in synthetic:
            default += f"; synthetic default {synthetic[f.name]}"
        desc = f"{helps.get(f.name) or f.name} ({default})".replace("%", "%%")
        if f.type in (bool, "bool"):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None, help=desc)
        elif typing.get_origin(f.type) is typing.Literal:
            p.add_argument(f"--{f.name}", choices=typing.get_args(f.type), default=None, help=desc)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(f"--{f.name}", type=typ, default=None, help=desc, metavar=typ.__name__.upper())
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    return cls(**given), given


# -----------------------------------------------------------------------------
# Fingerprints: the inputs an output depends on, compared before it is reused

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".json", ".model")


def identity(path):
    """What identifies an input file or model directory without reading gigabytes: its absolute path and each
    weight/config file's size and modification time (as make decides staleness). "" for an empty path."""
    if not path:
        return ""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        st = os.stat(path)
        return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if not os.path.isdir(path):
        return {"path": path, "missing": True}
    files = sorted(f for f in os.listdir(path) if f.endswith(WEIGHT_SUFFIXES))
    stats = {f: os.stat(os.path.join(path, f)) for f in files}
    return {"path": path, "files": {f: [s.st_size, s.st_mtime_ns] for f, s in stats.items()}}


def fingerprint(**inputs):
    """A JSON-able record of the inputs and settings that change an output (identities, numbers, strings)."""
    return json.loads(json.dumps(inputs, sort_keys=True, default=str))


def fingerprint_path(output):
    """Where an output's fingerprint lives: inside a directory, beside a file."""
    return os.path.join(output, "fingerprint.json") if os.path.isdir(output) else output + ".fingerprint.json"


def differences(old, new):
    """The top-level keys whose values differ, as `key (old -> new)` strings, or `key (path changed since)`
    for a file or directory whose identity changed at the same path."""
    keys = sorted(set(old) | set(new))
    return [f"{k} ({old[k]['path']} changed since)" if _same_path(old.get(k), new.get(k)) else
            f"{k} ({_short(old.get(k))} -> {_short(new.get(k))})" for k in keys if old.get(k) != new.get(k)]


def _same_path(a, b):
    return isinstance(a, dict) and isinstance(b, dict) and "path" in a and a.get("path") == b.get("path")


def _short(v):
    if isinstance(v, dict) and "path" in v:
        return v["path"]
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_reuse(output, fp, overwrite=False, hint="--overwrite", old=None):
    """May `output` (a file or directory) be reused for inputs `fp`?

    False when it does not exist, or `overwrite` is set (the caller starts it afresh); True when it exists
    with the same fingerprint (its fingerprint_path file, or `old` for an output that holds its own). An
    output made from other inputs stops with a message naming what differs and how to start fresh (`hint`,
    or another output path). An output without a fingerprint is refused the same way: nothing says what
    made it."""
    if not os.path.exists(output) or overwrite:
        return False
    path = fingerprint_path(output)
    if old is None and not os.path.exists(path):
        fail(f"{output} exists but records no fingerprint, so it may come from other inputs; "
             f"pass {hint} to start afresh, or choose another output path")
    old = json.load(open(path)) if old is None else old
    if old != fp:
        fail(f"{output} was made from other inputs: " + "; ".join(differences(old, fp))
             + f". Pass {hint} to start afresh, or choose another output path")
    return True


def start_or_resume(output, fp, overwrite=False, hint="--overwrite"):
    """check_reuse, then: a fresh start removes the old output (a file); the fingerprint is recorded either
    way, before any work, so a killed run's output still says what made it. True: resuming."""
    reuse = check_reuse(output, fp, overwrite, hint)
    if not reuse and os.path.isfile(output):
        os.remove(output)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_fingerprint(output, fp)
    return reuse


def write_fingerprint(output, fp):
    """Record `fp` for `output` (atomically, so a kill leaves the old record or the new one)."""
    path = fingerprint_path(output)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(fp, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# One run per out_dir, and the settings it ran with


def lock_out_dir(out_dir):
    """Take out_dir for this process until it exits: a second run into the same out_dir is refused while the
    first lives (its pid is in out_dir/.lock); a lock left by a killed run is taken over."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, ".lock")
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(open(path).read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                fail(f"{out_dir} is in use by another run (pid {pid}); wait for it, or use another out_dir")
            os.remove(path)  # stale: its owner is gone
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        atexit.register(unlock_out_dir, out_dir)
        return path


def unlock_out_dir(out_dir):
    """Give out_dir back: remove its lock if this process holds it (never another run's)."""
    path = os.path.join(out_dir, ".lock")
    try:
        if int(open(path).read().strip() or 0) == os.getpid():
            os.remove(path)
    except (OSError, ValueError):
        pass


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def print_settings(settings, marked=()):
    """One line of a job's effective settings at its start, marking (`*`) those the synthetic default set."""
    print(f"settings{' (* = set by the synthetic default)' * bool(marked)}: " + " ".join(
        f"{k}={v}{'*' * (k in marked)}" for k, v in settings.items()), flush=True)


def write_config(out_dir, settings, marked=()):
    """print_settings, and the settings written as out_dir/config.json."""
    os.makedirs(out_dir, exist_ok=True)
    print_settings(settings, marked)
    path = os.path.join(out_dir, "config.json")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"settings": settings, "synthetic_default": sorted(marked)}, f, indent=1)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Inputs checked before expensive work, and JSONL outputs that survive a kill at any instant

MADE_BY = {  # where the README's model directories come from, for the "does not exist" message
    "synth_base": "the repository (the synthetic base model; `python sft.py --make_base` remakes it)",
    "merged": "`python sft.py --merge` (out/sft/merged) or `python dpo.py` (out/dpo/merged, its train step)",
    "final": "the end of `python sft.py` (out/sft/final) or `python dpo.py train` (out/dpo/final)",
}


def check_model_dir(path, flag="--model", adapter=None, vision_path=None):
    """Stop with one line unless `path` is a model directory (config.json and a tokenizer), `adapter` (if
    given) a PEFT LoRA directory and `vision_path` a directory. Names the command that writes a missing README
    directory, and what to pass instead of a LoRA adapter directory."""
    if adapter and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        fail(f"--adapter {adapter}: no adapter_config.json (a PEFT LoRA directory, e.g. out/sft/final)")
    if vision_path and not os.path.isdir(vision_path):
        fail(f"--vision_path {vision_path} does not exist (a local CLIP checkpoint directory)")
    if not os.path.isdir(path):
        made = MADE_BY.get(os.path.basename(os.path.normpath(path)))
        fail(f"{flag} {path} does not exist" + (f"; it is written by {made}" if made else ""))
    if not os.path.exists(os.path.join(path, "config.json")):
        if os.path.exists(os.path.join(path, "adapter_config.json")):
            base = json.load(open(os.path.join(path, "adapter_config.json"))).get("base_model_name_or_path")
            merged = os.path.join(os.path.dirname(os.path.normpath(path)), "merged")
            fail(f"{flag} {path} is a LoRA adapter, not a model: pass {flag}={base or '<its base model>'} "
                 f"--adapter={path}" + (f", or the merged model {flag}={merged}" if os.path.isdir(merged)
                                        else ""))
        fail(f"{flag} {path} is not a model directory (no config.json)")
    if not any(os.path.exists(os.path.join(path, t)) for t in ("tokenizer.json", "tokenizer.model")):
        fail(f"{flag} {path} has no tokenizer (tokenizer.json or tokenizer.model): copy its base model's")


def check_device(device, flag="--device"):
    """Stop with one line unless torch can use `device` ("" or None: cuda if available, else cpu); returns
    the torch.device. torch is imported here only, when a torch job calls."""
    import torch
    try:
        d = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        fail(f"{flag}={device}: not a torch device (cpu, cuda, cuda:1, ...)")
    if d.type == "cuda" and not torch.cuda.is_available():
        fail(f"{flag}={device}: torch {torch.__version__} sees no CUDA GPU"
             + (" (a CPU-only build)" if torch.version.cuda is None else "") + f"; pass {flag}=cpu")
    return d


def at_least(low=1, **values):
    """Stop naming the first flag whose value (None = not given) is below `low`."""
    for flag, v in values.items():
        if v is not None and v < low:
            fail(f"--{flag}={v}: must be at least {low}")


def check_format(records, path, formats, fmt):
    """Stop at the first record without a field of format `fmt` ({name: fields} in `formats`), naming the
    format whose fields it has, if any."""
    for i, r in enumerate(records):
        if missing := [f for f in formats[fmt] if not isinstance(r, dict) or f not in r]:
            like = [n for n, fs in formats.items() if isinstance(r, dict) and set(fs) <= r.keys()]
            fail(f"{path} record {i} has no {missing[0]!r} field, so it is not {fmt} data"
                 + (f"; it looks like {like[0]} data" if like else ""))


def check_overlap(path, ids, known, what):
    """Stop unless most ids of an input file are `known` (else its rows would all count as missing), naming
    how many match and one that does not."""
    ids = set(ids)
    hit = ids & set(known)
    if len(hit) < max(1, len(ids) / 2):
        fail(f"{path}: only {len(hit)} of its {len(ids)} ids are {what}"
             + (f" (e.g. {sorted(ids - hit)[0]!r} is not)" if ids - hit else ""))


def read_records(path, need=(), check=None):
    """The records of a JSONL file or a JSON list, each an object with the fields `need` (and no problem
    `check(record)` names); else the run stops with one line (file, line, what is wrong), before any work."""
    try:
        text = open(path).read()
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror or e}")
    # a JSON list is one value starting on line 1
    numbered = [(1, text)] if text.lstrip().startswith("[") else enumerate(text.splitlines(), 1)
    out = []
    for n, line in numbered:
        try:
            rs = json.loads(line) if line.strip() else []
        except json.JSONDecodeError as e:
            fail(f"{path}, line {n + e.lineno - 1}: not JSON ({e.msg})")
        for i, r in enumerate(rs if isinstance(rs, list) else [rs]):
            where = f"record {i}" if isinstance(rs, list) else f"line {n}"  # a JSON list's index, from 0
            if not (isinstance(r, dict) and set(need) <= r.keys()):
                fail(f"{path}, {where}: a record needs {', '.join(need) or 'to be an object'}")
            if check and (problem := check(r)):
                fail(f"{path}, {where}: {problem}")
            out.append(r)
    return out


def read_output_jsonl(path, need=(), repair=True):
    """The records of a JSONL output this project appends to. A torn last line (a kill mid-write) is dropped
    with a note and, with `repair`, the file rewritten without it, atomically; any other unreadable line
    stops naming its file and line (nothing is dropped silently). [] when the file does not exist."""
    if not os.path.exists(path):
        return []
    lines = open(path).readlines()
    rows, good = [], []
    for n, line in enumerate(lines, 1):
        try:
            r = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            r = False
        if isinstance(r, dict) and set(need) <= r.keys():
            rows.append(r)
            good.append(line if line.endswith("\n") else line + "\n")
        elif r is not None and not (n == len(lines) and not line.endswith("\n")):
            fail(f"{path}, line {n}: not a record with {', '.join(need) or 'JSON'}; fix or delete that line")
    if lines and not lines[-1].endswith("\n"):  # a kill mid-write: the line is torn, or only its "\n" lost
        kept = good[-1:] == [lines[-1] + "\n"]
        print(f"note: {path}: {'kept' if kept else 'dropped'} the last line, left unfinished by a killed run "
              f"({lines[-1][:60]!r})", file=sys.stderr)
        if repair:
            replace_text(path, "".join(good))
    return rows


def append_jsonl(f, rows):
    """Append rows to the open file `f` and make them durable (flush + fsync): a kill loses at most the rows
    not yet appended."""
    f.write("".join(json.dumps(r) + "\n" for r in rows))
    f.flush()
    os.fsync(f.fileno())


def replace_text(path, text):
    """Write `path` atomically: a temporary file beside it, fsync'd, then os.replace."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def merge_parts(out, key, order):
    """Join the JSONL parts `out.rank0`, `out.rank1`, ... (one per rank) into `out`, one row per `key` (from
    `out` first, then the parts in rank order), in `order` (rows with keys outside it kept at the end),
    written atomically; then the parts are removed."""
    import glob
    parts = sorted(glob.glob(glob.escape(out) + ".rank*"), key=lambda p: int(p.rsplit("rank", 1)[1]))
    if not parts:
        return
    rows = {}  # key -> row
    for p in [out, *parts]:
        for r in read_output_jsonl(p, (key,)):  # a torn last line is cut off
            rows.setdefault(str(r[key]), r)
    order = [str(k) for k in order]
    order += sorted(set(rows) - set(order))
    replace_text(out, "".join(json.dumps(rows[k]) + "\n" for k in order if k in rows))
    for p in parts:
        os.remove(p)


def content_hash(path):
    """SHA-256 of a file's bytes ("" when there is none): for outputs whose content, not their path, names
    them (a rewrite with the same rows keeps it)."""
    return hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.exists(path) else ""


# Surviving a kill at any instant: temporary files, directory swaps, logs cut back to a checkpoint


def remove_stale_temps(folder):
    """Remove `<name>.tmp<pid>` files (atomic writes' temporaries, gigabytes for a 7B checkpoint) whose writer
    is dead: a kill between the write and the rename leaves them, and nothing else would."""
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = re.fullmatch(r".+\.tmp(\d+)", name)
        if m and not _alive(int(m[1])) and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


def _complete(folder, marker):
    return os.path.isfile(os.path.join(folder, marker))


def remove_dir(folder, marker):
    """rmtree that removes `marker` first: a kill part-way leaves a directory that says it is incomplete."""
    if os.path.exists(os.path.join(folder, marker)):
        os.remove(os.path.join(folder, marker))
    shutil.rmtree(folder, ignore_errors=True)


def replace_dir(tmp, path, marker):
    """Swap the finished directory `tmp` (its `marker` file written last) in for `path`. A directory cannot
    be replaced in one rename: `path` moves to `path`.old first. A kill at any instant leaves a state that
    `recover_dir` finishes or undoes; a leftover .old from an earlier kill is cleared first (it used to make
    every later save fail with "Directory not empty")."""
    old = path + ".old"
    if os.path.exists(old):  # a swap killed after its first rename: tmp, complete, supersedes both
        if not _complete(path, marker):
            remove_dir(path, marker)
        remove_dir(old, marker)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    remove_dir(old, marker)


def recover_dir(path, marker):
    """Finish or undo a `replace_dir` that a kill interrupted, so that `path` is the newest complete
    directory (a complete `path`, else `path`.tmp, else `path`.old), and no .tmp or .old is left over."""
    tmp, old = path + ".tmp", path + ".old"
    if not _complete(path, marker):
        done = next((d for d in (tmp, old) if _complete(d, marker)), None)
        if done is not None:
            if os.path.exists(path):
                remove_dir(path, marker)
            os.replace(done, path)
    for d in (tmp, old):
        if os.path.exists(d):
            remove_dir(d, marker)


def remove_output(output, marker="meta.pt"):
    """Remove an output (a file or a directory) and its fingerprint, to start it afresh."""
    path = fingerprint_path(output)
    if os.path.isdir(output):
        remove_dir(output, marker)
    elif os.path.exists(output):
        os.remove(output)
    if os.path.exists(path):
        os.remove(path)


def cut_log(path, step):
    """Keep the rows of a JSONL log up to `step` (their "step" <= step), atomically: a run resumed from a
    checkpoint at `step` logs each later step again, so each step then appears once. A line cut by a kill
    is dropped too."""
    if not os.path.exists(path):
        return
    rows = []
    for line in open(path):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            rows.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(rows)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# A training run's out_dir (train.fit)

# Settings that --resume may change: bookkeeping and memory knobs (grad_ckpt, cpu_offload: the same
# arithmetic, though not bit for bit on a GPU), generation and judging knobs, and the steps to stop at
# (epochs, max_steps): the schedule's length they set is fingerprinted itself, so a resume may stop later or
# earlier only where that leaves the cosine schedule unchanged. The format (shard) has a check of its own.
RESUMABLE = ("out_dir", "resume", "overwrite", "save_every", "log_every", "max_steps", "epochs", "merge",
             "plan", "world", "grad_ckpt", "cpu_offload", "shard", "workers", "timeout", "max_tries",
             "retry_failed", "price_in", "price_out", "gen_batch", "gen_tokens")


def run_fingerprint(cfg, n_examples, total, inputs=None):
    """What a checkpoint's trajectory depends on: the model and data files (runs.identity), the number of
    examples, the schedule's length, every setting not in RESUMABLE and the caller's `inputs` (more
    identities). A checkpoint records it; a resume, or a fresh run into its out_dir, with another one is
    refused with the difference named."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE}
    for k in ("model", "vision_path", "data", "image_dir"):
        if k in settings:
            settings[k] = identity(settings[k])
    return fingerprint(**settings, **(inputs or {}), n_examples=n_examples, schedule_steps=total)


def open_run(cfg, out_dir, fp, ckpt_path, other, marked=()):
    """Rank 0, before anything loads: take out_dir (runs.lock_out_dir), remove dead runs' temporary files,
    finish or undo a sharded checkpoint's interrupted swap, then check the checkpoint's fingerprint: --resume
    needs the same one; a fresh run refuses a checkpoint of other inputs unless --overwrite, and removes an
    old one (fit's Logger then empties the log). Writes out_dir/config.json (`marked`: keys the synthetic
    default set, starred)."""
    lock_out_dir(out_dir)
    remove_stale_temps(out_dir)
    recover_dir(os.path.join(out_dir, "checkpoint"), "meta.pt")
    overwrite = getattr(cfg, "overwrite", False)
    if cfg.resume and overwrite:
        fail("--resume continues the checkpoint and --overwrite starts afresh: pass one of them")
    if cfg.resume and not os.path.exists(ckpt_path) and os.path.exists(other):
        shard = "fsdp" if other.endswith("checkpoint") else "ddp"
        fail(f"--resume: {other} was written with --shard={shard}; resume with that")
    if not (cfg.resume and check_reuse(ckpt_path, fp, hint="--overwrite instead of --resume")):
        for path in (ckpt_path, other):  # a fresh start (or nothing to resume)
            check_reuse(path, fp, overwrite)  # other inputs: refused, naming what differs
            remove_output(path)
        if ckpt_path.endswith(".pt"):
            write_fingerprint(ckpt_path, fp)  # beside checkpoint.pt; a sharded one holds its own
    write_config(out_dir, asdict(cfg), marked)


def first_line(e):
    """An exception's first line, for a one-line error; of the first rank's failure in a
    torch.distributed.checkpoint CheckpointException (its `failures`: {rank: (exception, traceback)})."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        e = next(iter(failures.values()))[0]
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
