"""
Run bookkeeping shared by every job: one-line user errors (exit code 2), fingerprints that say what made an
output, the lock that keeps two runs out of one out_dir, and the effective settings as config.json.
No torch here, so judge.py can use it too.

    from runs import fail, fingerprint, check_reuse, lock_out_dir
    fp = fingerprint(model=identity(cfg.model), data=identity(cfg.data), n_questions=cfg.n_questions)
    if check_reuse(out, fp, cfg.overwrite):   # True: same inputs, reuse; a difference stops with its name
        ...
"""
import atexit
import json
import os
import sys


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
    """The top-level keys whose values differ, as `key (old -> new)` strings."""
    keys = sorted(set(old) | set(new))
    return [f"{k} ({_short(old.get(k))} -> {_short(new.get(k))})" for k in keys if old.get(k) != new.get(k)]


def _short(v):
    if isinstance(v, dict) and "path" in v:
        return v["path"] + (" (changed since)" if "files" in v or "size" in v else "")
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_reuse(output, fp, overwrite=False, hint="--overwrite"):
    """May `output` (a file or directory) be reused for inputs `fp`?

    False when it does not exist, or `overwrite` is set (the caller starts it afresh); True when it exists
    with the same fingerprint. An output made from other inputs stops with a message naming what differs
    and how to start fresh (`hint`, or another output path). An output without a fingerprint is refused the
    same way: nothing says what made it."""
    if not os.path.exists(output) or overwrite:
        return False
    path = fingerprint_path(output)
    if not os.path.exists(path):
        fail(f"{output} exists but records no fingerprint, so it may come from other inputs; "
             f"pass {hint} to start afresh, or choose another output path")
    old = json.load(open(path))
    if old != fp:
        fail(f"{output} was made from other inputs: " + "; ".join(differences(old, fp))
             + f". Pass {hint} to start afresh, or choose another output path")
    return True


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
        atexit.register(lambda: os.path.exists(path) and os.remove(path))
        return path


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_config(out_dir, settings, marked=()):
    """Print the effective settings, marking (`*`) those the synthetic default changed, and write them as
    out_dir/config.json."""
    os.makedirs(out_dir, exist_ok=True)
    print("settings (* = set by the synthetic default): " + " ".join(
        f"{k}={v}{'*' * (k in marked)}" for k, v in settings.items()))
    path = os.path.join(out_dir, "config.json")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"settings": settings, "synthetic_default": sorted(marked)}, f, indent=1)
    os.replace(tmp, path)
