"""The fault harness itself: its verdicts, its file snapshots, and that a CLI call in a
fork of the warm server ends as the real command does (exit status, error line, traceback)."""

import os
import subprocess
import sys

from tests.faults.cases import BY_ID
from tests.faults.forkserver import REPO, snapshot
from tests.faults.runner import Call, Expect, Outcome, diff, judge


def _out(rc, stderr="", changed=(), leftovers=()):
    return Outcome(rc, "", stderr, 0.1, changed=list(changed), leftovers=list(leftovers))


def test_verdicts():
    refuse = Expect(error=True, code=2, names=(r"cfg\.yaml:\d+", "lr"), not_names=("override",))
    assert judge(refuse, [_out(2, "error: cfg.yaml:3 ('train.lr'): must be > 0")], []).category == "clear"
    assert judge(refuse, [_out(0)], []).category == "loss_or_silent"  # accepted bad input
    assert (
        judge(refuse, [_out(2, "error: cfg.yaml:3 lr", changed=["run/a (modified)"])], []).category == "loss_or_silent"
    )  # refused, but damaged a file
    tb = "Traceback (most recent call last):\n  File \"x\", line 1\nKeyError: 'lr'\n"
    v = judge(refuse, [_out(1, tb)], [])
    assert v.category == "traceback" and any("KeyError: 'lr'" in p for p in v.problems)
    assert judge(refuse, [_out(2, "error: something went wrong")], []).category == "unclear"  # no what/where
    assert judge(refuse, [_out(2, "error: override cfg.yaml:3 lr")], []).category == "unclear"  # wrong blame
    assert judge(refuse, [_out(2, "error: cfg.yaml:3 lr", leftovers=[".x.tmp"])], []).category == "unclear"
    resume = Expect(error=False, code=75, says=("stop signal",))
    assert judge(resume, [_out(75, "stop signal received")], []).category == "ok"
    assert judge(resume, [_out(75, "stop signal received")], ["theta is NaN"]).category == "loss_or_silent"
    assert judge(resume, [_out(2, "error: no")], []).category == "unclear"


def test_every_defect_a_case_names_is_explained_and_reports_show_no_local_paths():
    from tests.faults.cases import CASES
    from tests.faults.probe import DEFECTS, shown_command

    assert sorted({c.defect for c in CASES if c.defect} - set(DEFECTS)) == []
    assert shown_command(["--out", "/tmp/x y", "--title", "a b", "--report", str(REPO / "docs" / "r.md")]) == (
        "python -m tests.faults.probe --out OUT --title 'a b' --report docs/r.md"
    )
    assert shown_command(["--out=/tmp/x", "--only", "ckpt-"]) == "python -m tests.faults.probe --out=OUT --only ckpt-"


def test_snapshots_see_changes_deletions_growth_and_leftovers(tmp_path):
    (tmp_path / "run" / "ck").mkdir(parents=True)
    (tmp_path / "run" / "ck" / "a").write_text("a")
    (tmp_path / "run" / "metrics.jsonl").write_text("1\n")
    (tmp_path / "keep").write_text("k")
    before = snapshot(tmp_path)
    (tmp_path / "run" / "ck" / "a").write_text("b")
    (tmp_path / "keep").unlink()
    (tmp_path / "run" / "metrics.jsonl").write_text("1\n2\n")
    (tmp_path / "run" / ".step-2.tmp").mkdir()
    (tmp_path / "run" / ".step-2.tmp" / "x").write_text("x")
    after = snapshot(tmp_path)
    grew = lambda rel, _: (tmp_path / rel).read_text().startswith("1\n")  # noqa: E731
    changed, left = diff(before, after, Call("train", []), grew)
    assert sorted(changed) == ["keep (deleted)", "run/ck/a (modified)"] and left == ["run/.step-2.tmp"]
    changed, _ = diff(before, after, Call("train", [], may_change=("run/ck/*", "keep")), grew)
    assert changed == []


def _direct(case_id, faults):
    """The case's command as a real `python launch/train.py ...` in a new interpreter."""
    case = BY_ID[case_id]
    ws = faults.root / f"{case_id}-direct"
    ws.mkdir(parents=True)
    call = case.build(ws, faults.fx)
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), *map(str, call.argv)],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_forked_call_ends_as_the_real_command(faults):
    """Exit status, `error:` line and traceback are the same in a fork of the warm server
    as in a new interpreter, for a failure after the process group started (where torch
    prefixes a rank's traceback lines with [rank0])."""
    from tests.faults.probe import run_case

    for case_id in ("config-ds-fp16",):
        forked = run_case(faults.server, faults.fx, BY_ID[case_id], faults.root)
        real = _direct(case_id, faults)
        real_tb = "Traceback (most recent call last)" in real.stderr
        real_err = next((ln for ln in real.stderr.splitlines() if ln.startswith("error: ")), None)
        assert (forked["rc"], forked["traceback"]) == (real.returncode, real_tb), real.stderr[-2000:]
        if real_err is not None or forked["error"] is not None:
            assert (forked["error"] or "").replace(str(faults.root / case_id), "WS") == (real_err or "").replace(
                str(faults.root / f"{case_id}-direct"), "WS"
            )
