"""What the fault tests assert: one case's verdict, with what went wrong in the message."""

from __future__ import annotations

from tests.faults.cases import CASES


def cases_of(*kinds: str, ci: bool = True) -> list:
    return [c for c in CASES if c.kind in kinds and (c.ci or not ci)]


def assert_case(faults, case) -> None:
    """Run one case and require its expected behaviour (clear error or documented result)."""
    import pytest

    from tests.faults.probe import run_case

    r = run_case(faults.server, faults.fx, case, faults.root)
    if r["category"] == "not_run":
        pytest.skip("; ".join(r["problems"]))
    if r["category"] in ("clear", "ok"):
        return
    ws = faults.root / case.id
    tail = ""
    err = ws / "_call" / "stderr.txt"
    if err.is_file():
        tail = "\n".join(err.read_text(errors="replace").splitlines()[-25:])
    raise AssertionError(
        f"{case.title}\n  command: {r.get('command')}\n  exit: {r.get('rc')}   verdict: {r['category']}"
        + (f"   (defect: {case.defect})" if case.defect else "")
        + "\n  problems:\n    - "
        + "\n    - ".join(r.get("problems", []))
        + f"\n  first error line: {r.get('error')}\n  --- stderr (last lines) ---\n{tail}"
    )
