"""Choice scoring: the KV-cache scorer against one whole sequence per choice, same process.

    python -m experiments.bench.scoring [--model .cache/models/SmolLM2-135M-Instruct]
        [--data .cache/data/sciq/eval.jsonl] [--records 48] [--batch 8] [--gpart-d 131072]
        [--repeats 2] [--json out.json]

Both scorers read the same records in the same batches of `--batch` records, on the same
model, alternately (`--repeats` rounds, the best round of each reported):
  baseline  every (prompt, choice) pair as its own left-padded sequence in one forward:
            a record with 4 choices reads its prompt 4 times (the scorer before the cache)
  cached    evaluate.score_items: one forward over the prompts keeps their keys and
            values, a second scores the choices' own tokens on them (what runs now)
With `--gpart-d` the model carries a GPart adapter with a random, nonzero theta, so every
forward regenerates delta (what evaluation during training pays). The scores of the two
must agree (max |difference| printed; exit 1 above 1e-3): a faster scorer that scores
something else is no speed-up. Prints seconds, records/s and the ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gpart_ds import data, evaluate

from .compare import machine


def whole_sequence_scores(model, items: list[evaluate.ChoiceItem], pad_id: int) -> list[list[float]]:
    """The baseline: one left-padded row per (record, choice), summed log p of its tokens."""
    rows = [it.prompt + c for it in items for c in it.choices]
    batch = data.left_padded(rows, pad_id, "cpu")
    keep = 1 + max(len(c) for it in items for c in it.choices)  # logits of the choices' places only
    with torch.no_grad():
        logp = torch.log_softmax(model(**batch, logits_to_keep=keep).logits.float(), dim=-1)
    width = keep
    scores: list[list[float]] = [[] for _ in items]
    r = 0
    for i, it in enumerate(items):
        for c in it.choices:
            # the choice's tokens are the row's last len(c); each is predicted one place earlier
            at = torch.arange(width - len(c) - 1, width - 1)
            scores[i].append(float(logp[r, at, torch.tensor(c)].sum()))
            r += 1
    return scores


def _timed(fn, model, items, pad_id, batch: int) -> tuple[float, list[list[float]]]:
    t0 = time.perf_counter()
    out = []
    for s in range(0, len(items), batch):
        out += fn(model, items[s : s + batch], pad_id)
    return time.perf_counter() - t0, out


def _cached(model, items, pad_id):
    return evaluate.score_items(model, items, pad_id, "cpu", single=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=".cache/models/SmolLM2-135M-Instruct")
    ap.add_argument("--data", default=".cache/data/sciq/eval.jsonl", help="records with `choices` (prompt/completion)")
    ap.add_argument("--records", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8, help="records per forward (the study's eval micro-batch)")
    ap.add_argument("--gpart-d", type=int, default=0, help="attach GPart with this d and a random theta (0: plain)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    for flag, v, least in (("--records", args.records, 1), ("--batch", args.batch, 1), ("--repeats", args.repeats, 1)):
        if v < least:
            ap.error(f"{flag}: must be >= {least}, got {v}")
    if args.gpart_d < 0:
        ap.error(f"--gpart-d: must be >= 0 (0: no adapter), got {args.gpart_d}")
    for flag, path in (("--model", args.model), ("--data", args.data)):
        if not Path(path).exists():
            ap.error(f"{flag} {path}: not found (python -m gpart_ds.assets smollm2 sciq prepares the defaults)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    records, _ = data.load(args.data)
    items = evaluate.choice_items(records[: args.records], tok, chat_template=False)
    if not items:
        ap.error(f"--data {args.data}: no record with `choices` among the first {args.records}")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    if args.gpart_d:
        from gpart_ds.methods.gpart.layer import apply_gpart

        model = apply_gpart(model, args.gpart_d, seed=0)
        with torch.no_grad():
            model.theta.copy_(torch.randn(args.gpart_d, generator=torch.Generator().manual_seed(0)) * 1e-3)
        model.eval()
    best = {"baseline": float("inf"), "cached": float("inf")}
    scores = {}
    for _ in range(args.repeats):
        for name, fn in (("baseline", whole_sequence_scores), ("cached", _cached)):
            s, scores[name] = _timed(fn, model, items, pad, args.batch)
            best[name] = min(best[name], s)
    diff = max(abs(a - b) for ra, rb in zip(scores["baseline"], scores["cached"]) for a, b in zip(ra, rb))
    choices = sum(len(it.choices) for it in items)
    prompt_tokens = sum(len(it.prompt) for it in items) / len(items)
    result = {
        "machine": machine(),
        "model": args.model,
        "data": args.data,
        "records": len(items),
        "choices_per_record": choices / len(items),
        "prompt_tokens_mean": prompt_tokens,
        "batch": args.batch,
        "gpart_d": args.gpart_d,
        "threads": torch.get_num_threads(),
        "seconds": best,
        "records_per_s": {k: len(items) / v for k, v in best.items()},
        "speedup": best["baseline"] / best["cached"],
        "max_abs_score_diff": diff,
    }
    adapter = f"GPart d = {args.gpart_d}" if args.gpart_d else "plain model"
    print(
        f"{len(items)} records ({choices / len(items):.1f} choices, {prompt_tokens:.0f} prompt tokens on average), "
        f"{args.batch} a forward, {adapter}, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}:"
    )
    for k, v in best.items():
        print(f"  {k:9s} {v:7.2f} s  {len(items) / v:6.2f} records/s")
    print(f"  speed-up  {result['speedup']:.2f}x   max |score difference| {diff:.2e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    if not diff <= 1e-3:
        print(f"error: the two scorers disagree by {diff:.3g} (> 1e-3): the timing compares different results")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
