"""How well a rule lr = C * (D/d)^a serves a method's learning-rate sweeps, and which (C, a) serves them best.

    python -m experiments.lr_fit docs/quality_rt.json docs/quality_qasc.json docs/quality_arithmetic.json
        [--method gpart] [--C C --exponent A] [--probe-steps 5,10,20,40] [--json out.json]

Reads the rows of one method (default gpart) in study reports (experiments/study.py: each
row's lr sweep on seed 0 with its dev metric, the run's D and d = its trainable
parameters) and, for a rule, puts its lr into every sweep: the
dev metric there is interpolated linearly in log(lr) between the two grid rates around it
(a rule that leaves a sweep's grid is not judged on it: `outside`). A sweep's loss under the
rule is its best dev metric minus that value. For each exponent a it then finds the C that
makes the worst loss over all sweeps smallest (ties: the mean loss), and prints, per
exponent, that C, the worst and mean loss, and how many sweeps have the rule's lr within 2x
of their best grid rate; then the sweeps one by one (with the test metric read the same
way: a held-out look at each rule, not used by the fit) under train.lr: auto as each report
recorded it, under the best fit, and under --C/--exponent if given. The choice of a rule is then
made on dev records only, like the study's choice of each lr; the test records stay for the
report. 200 dev records give a standard error of ~3 points: losses below that are not told apart from none.

Two limits of any such rule are printed beside it: per exponent, the most sweeps any C puts
within 2x of their best rate; and, for sweeps of the same D and d (other tasks), how far
apart their best rates are: over 4x, no function of D and d is within 2x of all of them.
--probe-steps judges a rule with another input, a startup probe that trains every grid rate
k steps and keeps the one of lowest training loss (read off the recorded losses).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from gpart_ds.config import ConfigError

EXPONENTS = [round(0.40 + 0.05 * i, 2) for i in range(15)]  # 0.40 .. 1.10
MIN_RATES = 3  # a sweep of fewer rates says nothing about where its best lies
WITHIN = 2.0  # "within 2x of the best rate" (the study's target, docs/quality.md)
PROBE_WINDOW = 5  # --probe-steps: a probe's loss is the mean of its last this-many steps


def sweeps(reports: list[tuple[str, dict]], method: str = "gpart") -> list[dict]:
    """The sweeps of `method`'s rows: task, entry, D, d, rates (lr, dev) sorted by lr, and
    the lr train.lr: auto gave the entry when the report was written."""
    out = []
    for source, rep in reports:
        for row in (r for r in rep["summary"] if r["name"] == method):
            pts = sorted((s["lr"], s["dev"]) for s in row["sweep"] if s["dev"] is not None)
            test = sorted((s["lr"], s["test"]) for s in row["sweep"] if s["dev"] is not None)
            # the sweep runs' training losses (seed = the report's sweep seed), for --probe-steps
            losses = {
                r["lr"]: r["losses"]
                for r in rep.get("runs", [])
                if (r["task"], r["method"], r["phase"]) == (row["task"], row["method"], "sweep")
                and r["seed"] == rep.get("sweep_seed", 0)
                and r.get("losses")
            }
            out.append(
                {
                    "task": row["task"],
                    "method": row["method"],
                    "source": source,
                    "D": rep["D"][row["task"]][row["method"]],
                    "d": row["trainable_params"],
                    "points": pts,
                    "auto_lr": row.get("auto_lr"),
                    "test_points": test,
                    "losses": losses,
                    "best_lr": max(pts, key=lambda p: p[1])[0] if pts else None,
                    "best_dev": max((p[1] for p in pts), default=None),
                }
            )
    return out


def dev_at(points: list[tuple[float, float]], lr: float) -> float | None:
    """The dev metric at lr, linear in log(lr) between the grid rates around it; None outside."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= lr <= x1:
            t = math.log(lr / x0) / math.log(x1 / x0)
            return y0 + t * (y1 - y0)
    if points and math.isclose(lr, points[0][0], rel_tol=1e-9):
        return points[0][1]
    return None


def rule_lr(C: float, a: float, D: int, d: int) -> float:
    return C * (D / d) ** a


def judge(sw: list[dict], C: float, a: float, lr_of=None) -> list[dict]:
    """Each sweep under the rule (or lr_of(sweep)): its lr, the dev metric there, the loss
    and the ratio to the best rate."""
    out = []
    for s in sw:
        lr = lr_of(s) if lr_of else rule_lr(C, a, s["D"], s["d"])
        dev = dev_at(s["points"], lr)
        # the test metric the same way: a held-out look at the rule, never used to choose it
        test, test_best = dev_at(s["test_points"], lr), dict(s["test_points"])[s["best_lr"]]
        out.append(
            {
                **s,
                "rule_lr": lr,
                "rule_dev": dev,
                "loss": None if dev is None else s["best_dev"] - dev,
                "over_best": lr / s["best_lr"],
                "rule_test": test,
                "test_loss": None if test is None else test_best - test,
            }
        )
    return out


def score(judged: list[dict]) -> tuple[float, float]:
    """(worst loss, mean loss); inf when the rule leaves a sweep's grid."""
    losses = [j["loss"] for j in judged]
    if any(x is None for x in losses):
        return math.inf, math.inf
    return max(losses), sum(losses) / len(losses)


def best_C(sw: list[dict], a: float, n: int = 400) -> tuple[float, tuple[float, float]]:
    """The C (on a log grid spanning every sweep's rates) minimising (worst loss, mean loss) at exponent a."""
    lo = min(p[0] / (s["D"] / s["d"]) ** a for s in sw for p in s["points"])
    hi = max(p[0] / (s["D"] / s["d"]) ** a for s in sw for p in s["points"])
    grid = [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
    return min(((C, score(judge(sw, C, a))) for C in grid), key=lambda x: (x[1], x[0]))


def within_2x(judged: list[dict]) -> int:
    return sum(1 for j in judged if 1 / WITHIN <= j["over_best"] <= WITHIN)


def most_within_2x(sw: list[dict], a: float) -> int:
    """The most sweeps any C puts within 2x of their best rate at exponent a: the rule's
    log(lr) is log C + a log(D/d), so each sweep admits an interval of log C of width
    2 log(WITHIN), and the answer is the deepest overlap of those intervals."""
    ends = []
    for s in sw:
        c = math.log(s["best_lr"] / (s["D"] / s["d"]) ** a)
        ends += [(c - math.log(WITHIN), 0), (c + math.log(WITHIN), 1)]  # opens sort before closes at a tie
    depth = most = 0
    for _, closes in sorted(ends):
        depth += -1 if closes else 1
        most = max(most, depth)
    return most


def same_size_spread(sw: list[dict]) -> list[dict]:
    """Sweeps of one D and d (tasks differ, the rule's inputs do not): the spread of their
    best rates. Above WITHIN^2 (4x) no function of D and d is within 2x of every one of them."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for s in sw:
        groups.setdefault((s["D"], s["d"]), []).append(s)
    out = []
    for (D, d), g in sorted(groups.items(), key=lambda kv: kv[0][0] / kv[0][1]):
        if len(g) < 2:
            continue
        lo, hi = min(g, key=lambda s: s["best_lr"]), max(g, key=lambda s: s["best_lr"])
        spread = hi["best_lr"] / lo["best_lr"]
        out.append(
            {
                "D": D,
                "d": d,
                "sweeps": len(g),
                "lowest": (lo["task"], lo["best_lr"]),
                "highest": (hi["task"], hi["best_lr"]),
                "spread": spread,
                "feasible": spread <= WITHIN**2,
            }
        )
    return out


def probe(sw: list[dict], steps: list[int], window: int = PROBE_WINDOW) -> list[dict]:
    """Another input than D and d: a probe that trains each grid rate `k` steps and keeps
    the one with the lowest training loss (mean of the last `window` steps up to k; a
    non-finite loss loses). Read off the sweeps' recorded losses (same data order at every
    rate), it says how long such a probe must run to pick as the dev metric would."""
    out = []
    for s in sw:
        rates = [lr for lr, _ in s["points"] if lr in s["losses"]]
        picks = {}
        for k in steps:

            def tail(lr, k=k, s=s):
                L = s["losses"][lr][:k][-window:]
                return math.inf if len(s["losses"][lr]) < k or not all(math.isfinite(x) for x in L) else sum(L) / len(L)

            scored = [(tail(lr), lr) for lr in rates]
            if not scored or min(scored)[0] == math.inf:
                picks[k] = None
                continue
            lr = min(scored)[1]
            picks[k] = {"lr": lr, "over_best": lr / s["best_lr"], "loss": s["best_dev"] - dict(s["points"])[lr]}
        out.append(
            {
                "task": s["task"],
                "method": s["method"],
                "best_lr": s["best_lr"],
                "rates": len(rates),
                "steps": len(next(iter(s["losses"].values()), [])),
                "picks": picks,
            }
        )
    return out


def fit(sw: list[dict]) -> list[dict]:
    rows = []
    for a in EXPONENTS:
        C, (worst, mean) = best_C(sw, a)
        judged = judge(sw, C, a)
        rows.append(
            {
                "exponent": a,
                "C": C,
                "worst_loss": worst,
                "mean_loss": mean,
                "within_2x": within_2x(judged),
                "most_within_2x": most_within_2x(sw, a),
                "sweeps": len(judged),
            }
        )
    return rows


def _load(path: str) -> dict:
    try:
        rep = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable JSON study report ({exc})") from None
    if not isinstance(rep, dict) or "summary" not in rep or "D" not in rep:
        raise ConfigError(f"{path}: not a study report (no summary or D); the study writes one as study.json")
    return rep


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _table(title: str, judged: list[dict]) -> None:
    print(f"\n{title}\n")
    print(
        "| task | entry | D/d | best rate (dev) | rule's lr (x best) | dev there | dev loss (pts) | test there "
        "| test loss (pts) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for j in judged:
        print(
            f"| {j['task']} | {j['method']} | {j['D'] / j['d']:.0f} | {j['best_lr']:.3g} ({_pct(j['best_dev'])}) "
            f"| {j['rule_lr']:.3g} ({j['over_best']:.2f}x) | {_pct(j['rule_dev'])} | {_pct(j['loss'])} "
            f"| {_pct(j['rule_test'])} | {_pct(j['test_loss'])} |"
        )
    tl = [j["test_loss"] for j in judged if j["test_loss"] is not None]
    if tl:
        print(f"\ntest loss against the dev-chosen rate: worst {_pct(max(tl))}, mean {_pct(sum(tl) / len(tl))} pts")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.lr_fit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("reports", nargs="+", help="study reports (study.json, docs/quality_*.json)")
    ap.add_argument("--method", default="gpart", help="the method whose rows are fitted (default gpart)")
    ap.add_argument("--C", type=float, default=None, help="also judge lr = C * (D/d)^exponent (both needed)")
    ap.add_argument("--exponent", type=float, default=None)
    ap.add_argument("--json", default=None, help="write the fit here as well")
    ap.add_argument(
        "--probe-steps",
        default="",
        help="comma-separated step counts k: judge a probe that "
        "keeps the grid rate of lowest training loss after k steps (from the recorded losses)",
    )
    args = ap.parse_args(argv)
    try:
        args.probe_steps = [int(k) for k in args.probe_steps.split(",") if k.strip()]
    except ValueError:
        raise ConfigError(f"--probe-steps {args.probe_steps!r}: give step counts like 5,10,20") from None
    if any(k < 1 for k in args.probe_steps):
        raise ConfigError(f"--probe-steps {args.probe_steps}: step counts start at 1")
    if (args.C is None) != (args.exponent is None):
        raise ConfigError("--C and --exponent: give both (the rule lr = C * (D/d)^exponent) or neither")
    all_sw = sweeps([(p, _load(p)) for p in args.reports], args.method)
    sw = [s for s in all_sw if len(s["points"]) >= MIN_RATES]
    if not sw:
        raise ConfigError(f"no {args.method} sweep of >= {MIN_RATES} rates in {', '.join(args.reports)}")
    skipped = [f"{s['task']}/{s['method']} ({len(s['points'])} rate(s))" for s in all_sw if s not in sw]
    rows = fit(sw)
    best = min(rows, key=lambda r: (r["worst_loss"], r["mean_loss"]))
    print(
        f"{len(sw)} {args.method} sweeps"
        + (f"; skipped (fewer than {MIN_RATES} rates): {', '.join(skipped)}" if skipped else "")
    )
    print(
        "\n| exponent a | best C | worst dev loss (pts) | mean dev loss (pts) | rule within 2x of best rate "
        "| most within 2x at any C |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['exponent']:.2f} | {r['C']:.3g} | {_pct(r['worst_loss'])} | {_pct(r['mean_loss'])} | "
            f"{r['within_2x']}/{r['sweeps']} | {r['most_within_2x']}/{r['sweeps']} |"
        )
    out = {
        "reports": args.reports,
        "method": args.method,
        "sweeps": sw,
        "fit": rows,
        "best": best,
        "same_size": same_size_spread(sw),
    }
    if out["same_size"]:
        print("\nsweeps of the same D and d (one rate for all of them from any rule of D and d):\n")
        print("| D/d | sweeps | lowest best rate | highest best rate | spread | one rate within 2x of all |")
        print("|---|---|---|---|---|---|")
        for g in out["same_size"]:
            print(
                f"| {g['D'] / g['d']:.0f} | {g['sweeps']} | {g['lowest'][1]:.3g} ({g['lowest'][0]}) "
                f"| {g['highest'][1]:.3g} ({g['highest'][0]}) | {g['spread']:.1f}x | "
                f"{'possible' if g['feasible'] else 'impossible'} |"
            )
    recorded = [s for s in sw if s["auto_lr"]]
    if recorded:
        out["recorded_auto"] = judge(recorded, 0, 0, lr_of=lambda s: s["auto_lr"])
        _table("train.lr: auto as each report recorded it", out["recorded_auto"])
    out["best"]["judged"] = judge(sw, best["C"], best["exponent"])
    _table(f"best fit: lr = {best['C']:.3g} * (D/d)^{best['exponent']:.2f}", out["best"]["judged"])
    if args.C is not None:
        out["given"] = {"C": args.C, "exponent": args.exponent, "judged": judge(sw, args.C, args.exponent)}
        _table(f"given rule: lr = {args.C:.3g} * (D/d)^{args.exponent:.2f}", out["given"]["judged"])
    if args.probe_steps:
        out["probe"] = probe(sw, args.probe_steps)
        print(
            "\na probe by training loss: each grid rate trained k steps, the lowest loss (mean of the "
            f"last {PROBE_WINDOW}) kept; its rate (x best) and dev loss (pts)\n"
        )
        print("| task | entry | " + " | ".join(f"k = {k}" for k in args.probe_steps) + " |")
        print("|---|---|" + "---|" * len(args.probe_steps))
        for p in out["probe"]:
            cells = [
                "-" if p["picks"][k] is None else f"{p['picks'][k]['over_best']:.2g}x ({_pct(p['picks'][k]['loss'])})"
                for k in args.probe_steps
            ]
            print(f"| {p['task']} | {p['method']} | " + " | ".join(cells) + " |")
    if args.json:
        from gpart_ds.fileio import write_atomic

        write_atomic(Path(args.json), json.dumps(out, indent=1))
    return out


def cli(argv=None) -> int:
    from gpart_ds.errors import run_cli

    return run_cli(lambda: main(argv))


if __name__ == "__main__":
    raise SystemExit(cli())
