"""Fault probes: try bad or unusual inputs of every kind the CLIs accept, as a careful
user would, on the tiny config, and count what happened.

    python -m tests.faults.probe --out /tmp/faults               # every case (~5 min on 2 cores)
    python -m tests.faults.probe --out /tmp/faults --only 'ckpt-|export-' --kinds adapter,checkpoint
    python -m tests.faults.probe --out /tmp/faults --report docs/faults_baseline.md

Each case (tests/faults/cases_*.py) runs its command in a fresh fork of one warm process
(tests/faults/forkserver.py; 2-rank cases through the real deepspeed launcher) inside
its own folder, and is judged (tests/faults/runner.py) on: exit status; an `error:`
line naming what and where; a printed traceback; files that existed before and changed
although the command's purpose was not to change them; temporary files left behind;
wrong or non-finite results with exit 0. Verdicts:

    clear           refused as it should: exit 2, `error:` naming what and where, nothing changed
    ok              the documented recovery or result (e.g. damaged checkpoint skipped, exit 75)
    unclear         refused, but with another status, no `error:` line, a vague message or
                    leftovers; or refused where a recovery was documented
    traceback       a Python traceback instead of a message
    loss_or_silent  a file that existed was changed or lost, or a wrong/non-finite result
                    (or an accepted bad input) came with exit 0

Writes DIR/results.json (every case, its commands, exit status, problems) and prints the
counts; --report writes them as Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from tests.faults.cases import CASES, KINDS, Case
from tests.faults.fixtures import Fx
from tests.faults.forkserver import REPO
from tests.faults.runner import CATEGORIES, Call, ForkServer, Verdict, judge, run_call

# What a case's `defect` means: the kind of defect the probe showed on the code it was written
# against (round one: the first list; round two: output ownership, identity, up-front refusals).
DEFECTS = {
    "traceback": "a Python traceback instead of `error:` and exit 2",
    "unclear-message": "refused, but with a message that does not say what and where",
    "dry-run-accepts": "--dry-run accepts what training refuses",
    "resume-past-max-steps": "train.max_steps below the checkpoint's step overwrites a genuine checkpoint",
    "run-replaces-run": "a new run into an existing output_dir replaces the earlier run's results",
    "non-finite": "non-finite values pass training, export or verify with exit 0",
    "duplicate-keys": "duplicate YAML keys accepted, the last one winning",
    "no-label-tokens": "training with no label tokens runs to the end with loss 0",
    "refused-resume-writes": "a refused (drifted) resume still writes into output_dir",
    "export-checks-less": "export accepts adapters that evaluate refuses (other shapes, bad seeds, flipped bytes)",
    "all-checkpoints-corrupt": "every checkpoint corrupt: resume=auto starts over and overwrites them",
    "checkpoint-as-adapter": "a checkpoint folder given to export as the adapter fails",
    "old-reference-adapter": "reference adapters the project cannot reproduce merged silently",
    "export-unchecked": "export writes merged tensors without checking they are finite and every target was found",
    "one-writer": "two writers on one output folder, stale locks, preemption during start-up",
    "adapter-identity": "an adapter or checkpoint whose defining fields were edited is applied",
    "wrong-base": "an adapter applied to another base model of the same shapes",
    "merged-as-base": "a merged model given as the base (the delta twice)",
    "base-changed": "a resume whose base weights changed in place trains on",
    "deepspeed-json": "a DeepSpeed JSON setting the project cannot run, not refused up front",
    "environment": "an unavailable backend or bad launcher variables, not refused up front",
    "chat-template": "chat records with a tokenizer that has no chat template",
    "new": "found by the probes themselves, in no earlier list",
}


def shown_command(argv: list[str]) -> str:
    """The probe's command line as a report shows it: --out as OUT, --report inside the repository relative."""
    shown, it = [], iter(argv)
    for a in it:
        if a in ("--out", "--report"):
            shown.append(a)
            a = next(it, "")
            if shown[-1] == "--out":
                shown.append("OUT")
                continue
        elif a.startswith("--out="):
            shown.append("--out=OUT")
            continue
        path = Path(a)
        if path.is_absolute() and path.resolve().is_relative_to(REPO):
            a = str(path.resolve().relative_to(REPO))
        shown.append(a)
    return shlex.join(["python", "-m", "tests.faults.probe", *shown])


def run_case(server: ForkServer, fx: Fx, case: Case, root: Path) -> dict:
    """Build, run and judge one case in root/<case id>/ (recreated)."""
    ws = Path(root) / case.id
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True)
    res = {"id": case.id, "kind": case.kind, "title": case.title, "defect": case.defect, "ci": case.ci}
    if case.needs == "tmpfs" and server.fs_mode != "tmpfs":
        res.update(category="not_run", problems=["needs a private tmpfs (mount namespace), not available here"])
        return res
    t0 = time.monotonic()
    try:
        calls = case.build(ws, fx)
    except Exception as exc:  # noqa: BLE001 - a broken case is reported, not fatal
        res.update(category="harness_error", problems=[f"building the case failed: {type(exc).__name__}: {exc}"])
        return res
    calls = calls if isinstance(calls, list) else [calls]
    outs = []
    for i, call in enumerate(calls):
        outs.append(run_call(server, ws, call, tag="call" if i == len(calls) - 1 else f"setup{i}"))
    last, call = outs[-1], calls[-1]
    if last.rc == 99:
        res.update(category="harness_error", problems=["the harness failed inside the child: " + last.stderr[-800:]])
        return res
    found = []
    # A case's checks look for wrong results behind a success status (a failure status
    # already says "no result"; files it damaged are caught by the snapshots).
    claims_success = last.rc == 0 or (
        not case.expect.error
        and (last.rc == case.expect.code or (case.expect.code is None and last.rc not in (0, None)))
    )
    for check in call.checks if claims_success else ():
        try:
            msg = check(ws, last)
        except Exception as exc:  # noqa: BLE001
            msg = f"check {getattr(check, '__qualname__', check)} failed: {type(exc).__name__}: {exc}"
        if msg:
            found.append(msg)
    v: Verdict = judge(case.expect, [last], found)
    err = last.error_text
    res.update(
        category=v.category,
        problems=v.problems,
        rc=last.rc,
        seconds=round(time.monotonic() - t0, 2),
        command=_shown(call, ws),
        error=(err.splitlines()[0][:400] if err else None),
        traceback=last.traceback,
        changed=last.changed,
        leftovers=last.leftovers,
    )
    return res


def _shown(call: Call, ws: Path) -> str:
    prog = {
        "train": "python launch/train.py",
        "export": "python -m gpart_ds.export",
        "evaluate": "python -m gpart_ds.evaluate",
        "plan": "python -m gpart_ds.plan",
        "assets": "python -m gpart_ds.assets",
        "preflight": "python -m gpart_ds.preflight",
        "study": "python -m experiments.study",
        "bench": "python -m experiments.bench",
    }.get(call.cli)
    args = [str(a).replace(str(ws), "WS") for a in call.argv]
    if call.cli == "launcher":
        prog, args = f"deepspeed --num_gpus {args[0]} launch/train.py", args[1:]
    return " ".join([prog] + args)


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(
            next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1]
        )
        mem = f", {kb / 2**20:.0f} GB RAM"
    except (OSError, StopIteration):
        pass
    return f"{platform.node()}: {os.cpu_count()} cores of {cpu}{mem}, Python {platform.python_version()}"


def counts(results: list[dict]) -> dict:
    c = Counter(r["category"] for r in results)
    tried = sum(v for k, v in c.items() if k in CATEGORIES)
    return {
        "tried": tried,
        **{k: c.get(k, 0) for k in CATEGORIES},
        "not_run": c.get("not_run", 0),
        "harness_error": c.get("harness_error", 0),
    }


def summary_line(n: dict) -> str:
    return (
        f"cases tried {n['tried']}: clear errors {n['clear']}, documented recoveries/results {n['ok']}, "
        f"unclear errors {n['unclear']}, tracebacks {n['traceback']}, "
        f"data loss / silent wrong results {n['loss_or_silent']}"
        + (f"; not run {n['not_run']}" if n["not_run"] else "")
        + (f"; HARNESS ERRORS {n['harness_error']}" if n["harness_error"] else "")
    )


def markdown(results: list[dict], meta: dict) -> str:
    n = counts(results)
    lines = [
        f"# Fault probes: {meta['title']}",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- code: `{meta['commit']}`",
        f"- command: `{meta['command']}` ({meta['seconds'] / 60:.1f} min)",
        f"- small file system for disk-full probes: {meta['fs_mode']}",
        "",
        "## Counts",
        "",
        "| verdict | cases |",
        "|---|---|",
    ]
    for k, label in (
        ("clear", "clear error (exit 2, names what and where, nothing changed)"),
        ("ok", "documented recovery / correct result"),
        ("unclear", "unclear error (other status, no `error:` line, vague, leftovers)"),
        ("traceback", "Python traceback"),
        ("loss_or_silent", "data loss or silent wrong result"),
    ):
        lines.append(f"| {label} | {n[k]} |")
    lines.append(f"| **cases tried** | **{n['tried']}** |")
    if n["not_run"]:
        lines.append(f"| not run (needs a private tmpfs) | {n['not_run']} |")
    lines += [
        "",
        "By kind:",
        "",
        "| kind | tried | clear | ok | unclear | traceback | loss/silent |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        rs = [r for r in results if r["kind"] == kind]
        if rs:
            k = counts(rs)
            lines.append(
                f"| {kind} | {k['tried']} | {k['clear']} | {k['ok']} | {k['unclear']} | {k['traceback']} "
                f"| {k['loss_or_silent']} |"
            )
    order = {"loss_or_silent": 0, "traceback": 1, "unclear": 2, "harness_error": 3, "not_run": 4}
    bad = sorted(
        (r for r in results if r["category"] not in ("clear", "ok")),
        key=lambda r: (order.get(r["category"], 9), r["kind"], r["id"]),
    )
    lines += [
        "",
        f"## Failing probes ({len(bad)})",
        "",
        "`defect`: the kind of defect the probe showed when it was written (`DEFECTS` in tests/faults/probe.py).",
        "",
        "| verdict | probe | what the user did | exit | what went wrong | defect |",
        "|---|---|---|---|---|---|",
    ]
    for r in bad:
        probs = "; ".join(p.replace("|", "\\|") for p in r.get("problems", []))[:500]
        lines.append(
            f"| {r['category']} | `{r['id']}` | {r['title']} | {r.get('rc', '-')} | {probs} | {r.get('defect', '')} |"
        )
    good = [r for r in results if r["category"] in ("clear", "ok")]
    lines += ["", f"## Passing probes ({len(good)})", ""]
    lines += [", ".join(f"`{r['id']}`" for r in good), ""]
    lines += [
        "Each probe's command, exit status, first `error:` line and problems are in the run's `results.json`.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests.faults.probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, type=Path, help="folder for the probes' files and results.json")
    ap.add_argument("--only", default=None, help="regex over case ids")
    ap.add_argument("--kinds", default=None, help=f"comma-separated subset of {','.join(KINDS)}")
    ap.add_argument("--ci-only", action="store_true", help="only the cases the pytest suite runs")
    ap.add_argument("--report", type=Path, default=None, help="also write the counts and failures as Markdown")
    ap.add_argument("--title", default="baseline")
    args = ap.parse_args(argv)

    from gpart_ds import assets

    assets.ensure("tiny")
    cases = [
        c
        for c in CASES
        if (not args.only or re.search(args.only, c.id))
        and (not args.kinds or c.kind in args.kinds.split(","))
        and (not args.ci_only or c.ci)
    ]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # close the fork server on the way out
    t0 = time.monotonic()
    server = ForkServer(log=out / "forkserver.log")
    results = []
    try:
        fx = Fx(out / "shared", server)
        for i, case in enumerate(cases, 1):
            r = run_case(server, fx, case, out / "cases")
            results.append(r)
            mark = {"clear": ".", "ok": "."}.get(r["category"], "X")
            print(
                f"[{i:3d}/{len(cases)}] {mark} {r['category']:14s} {case.id} ({r.get('seconds', 0):.1f} s)"
                + ("" if mark == "." else f"\n      {'; '.join(r.get('problems', []))[:400]}"),
                flush=True,
            )
    finally:
        server.close()
    seconds = time.monotonic() - t0
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    meta = {
        "title": args.title,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": machine() + f"; load average at the end {load} (1/5/15 min)",
        "commit": commit + (" + local changes" if dirty else ""),
        "command": shown_command(sys.argv[1:] if argv is None else list(argv)),
        "seconds": seconds,
        "fs_mode": {
            "tmpfs": "a private tmpfs per probe (mount namespace)",
            "rlimit": "RLIMIT_FSIZE (no mount namespace here)",
        }[server.fs_mode],
    }
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "counts": counts(results), "results": results}, indent=2) + "\n"
    )
    print(summary_line(counts(results)))
    print(f"{seconds / 60:.1f} min; details in {out / 'results.json'}")
    if args.report:
        args.report.write_text(markdown(results, meta))
        print(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
