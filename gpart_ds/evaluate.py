"""Evaluation: held-out loss on the trained tokens, and accuracy over `choices`.

Accuracy: for a record with a "choices" list, the prediction is the choice with the
largest summed log-likelihood given the prompt (rendered exactly as in training). Only
the positions that predict choice tokens are scored: sequences are left-padded so the
choice sits at the end, and the model computes logits for those last positions only
(`logits_to_keep`), never a full-vocabulary softmax over the whole sequence. When every
choice is a single token, one forward per record scores all of them.

    python -m gpart_ds.evaluate --model DIR [--adapter DIR] --data eval.jsonl [--chat-template]
                                [--predictions preds.jsonl]
    python -m gpart_ds.evaluate paired before.jsonl after.jsonl     # exact McNemar test

The functions take a `forward(**batch) -> logits` callable, so the same code runs on a
plain model, a GPart model, or a DeepSpeed engine on every rank.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass

import torch

from . import data
from .fileio import write_atomic


@dataclass
class ChoiceItem:
    prompt: list[int]
    choices: list[list[int]]
    answer: int


def choice_items(records, tokenizer, chat_template: bool) -> list[ChoiceItem]:
    items = []
    for _, rec in records:
        if rec.get("choices") is None:
            continue
        p = data.prompt_ids(tokenizer, rec["prompt"], chat_template)
        cs = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in rec["choices"]]
        items.append(ChoiceItem(p, cs, rec["choices"].index(rec["completion"])))
    return items


def _left_padded(seqs: list[list[int]], pad_id: int, device):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = torch.tensor(s)
        mask[i, n - len(s):] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}


@torch.no_grad()
def score_sequences(forward, prompts: list[list[int]], conts: list[list[int]], pad_id: int, device) -> list[float]:
    """Summed log p(cont | prompt) for each pair, computing logits for the tail only."""
    keep = max(len(c) for c in conts)
    batch = _left_padded([p + c for p, c in zip(prompts, conts)], pad_id, device)
    logits = forward(**batch, logits_to_keep=keep + 1)[:, -(keep + 1):-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    out = []
    for i, c in enumerate(conts):
        rows = logp[i, keep - len(c):]
        out.append(float(rows.gather(1, torch.tensor(c, device=rows.device)[:, None]).sum()))
    return out


def _next_token_logp(forward, items: list[ChoiceItem], pad_id: int, device):
    """(full-vocabulary log p of the token after each prompt, single-token choice scores)."""
    batch = _left_padded([it.prompt for it in items], pad_id, device)
    logp = torch.log_softmax(forward(**batch, logits_to_keep=1)[:, -1].float(), dim=-1)
    return logp, [[float(logp[i, c[0]]) for c in it.choices] for i, it in enumerate(items)]


@torch.no_grad()
def score_items(forward, items: list[ChoiceItem], pad_id: int, device) -> list[list[float]]:
    """Summed log-likelihood of every choice of every item."""
    if all(len(c) == 1 for it in items for c in it.choices):
        return _next_token_logp(forward, items, pad_id, device)[1]
    flat_p, flat_c, owner = [], [], []
    for i, it in enumerate(items):
        for c in it.choices:
            flat_p.append(it.prompt)
            flat_c.append(c)
            owner.append(i)
    scores = score_sequences(forward, flat_p, flat_c, pad_id, device)
    out = [[] for _ in items]
    for i, s in zip(owner, scores):
        out[i].append(s)
    return out


def label_is_the_answer_choice(examples, items: list[ChoiceItem]) -> bool:
    """True when every eval example is exactly its item's prompt + the answer choice, the
    choice is one token and the only predicted one: then the choice forward's log-softmax
    at the last prompt position also gives the example's loss and exact match (one
    forward per record instead of two; the quickstart's case, `data.add_eos: false`)."""
    if not items or len(examples) != len(items):
        return False
    for ex, it in zip(examples, items):
        if any(len(c) != 1 for c in it.choices):
            return False
        if list(ex.input_ids) != it.prompt + it.choices[it.answer]:
            return False
        if [i for i, lab in enumerate(ex.labels) if lab != data.IGNORE_INDEX] != [len(it.prompt)]:
            return False
    return True


@torch.no_grad()
def score_items_with_label(forward, items: list[ChoiceItem], pad_id: int, device):
    """score_items for single-token choices, plus (summed -log p(answer), exact matches)
    from the same full-vocabulary log-softmax (see label_is_the_answer_choice)."""
    logp, scores = _next_token_logp(forward, items, pad_id, device)
    answer = torch.tensor([it.choices[it.answer][0] for it in items], device=logp.device)
    loss = float(-logp.gather(1, answer[:, None]).sum())
    matches = int((logp.argmax(-1) == answer).sum())
    return scores, loss, matches


def predicted(scores: list[list[float]]) -> list[int]:
    """Index of the best-scored choice of each item."""
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


def correct(scores: list[list[float]], items: list[ChoiceItem]) -> list[bool]:
    return [p == it.answer for p, it in zip(predicted(scores), items)]


@torch.no_grad()
def loss_sums(forward_loss, examples, indices: list[int], pad_id: int, device) -> tuple[float, int]:
    """(summed loss over predicted tokens, number of predicted tokens) for one batch."""
    batch = {k: v.to(device) for k, v in data.collate([examples[i] for i in indices], pad_id).items()}
    n = int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
    return float(forward_loss(**batch)) * n, n


@torch.no_grad()
def loss_and_match_sums(forward, examples, indices: list[int], pad_id: int, device) -> tuple[float, int, int, int]:
    """(summed loss, predicted tokens, exact matches, examples scored) for one batch.

    `forward(**batch, exact_match=True)` returns an output with `.loss` and `.matches`
    (lm_loss.LabelLossOutput): exact match = every completion token is the argmax.
    """
    batch = {k: v.to(device) for k, v in data.collate([examples[i] for i in indices], pad_id).items()}
    n = int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
    out = forward(**batch, exact_match=True)
    m = out.matches
    return float(out.loss) * n, n, int(m.sum()), int(m.numel())


def paired(before: list[dict], after: list[dict]) -> dict:
    """Exact McNemar test of two prediction lists over the same records: of the records
    the two get differently right, how likely is a split this uneven if both were
    equally accurate (two-sided binomial with p = 1/2)."""
    a = {p["record"]: p["predicted"] == p["answer"] for p in before}
    b = {p["record"]: p["predicted"] == p["answer"] for p in after}
    if set(a) != set(b):
        raise ValueError(f"the prediction files score different records ({len(set(a) ^ set(b))} differ)")
    fixed = sum(1 for k in a if b[k] and not a[k])      # wrong before, right after
    broken = sum(1 for k in a if a[k] and not b[k])     # right before, wrong after
    n, k = fixed + broken, min(fixed, broken)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n if n else 1.0
    return {"records": len(a), "accuracy_before": sum(a.values()) / len(a), "accuracy_after": sum(b.values()) / len(b),
            "fixed": fixed, "broken": broken, "p_value": min(1.0, 2 * tail)}


# ------------------------------------------------------------------ CLI
def _load_model(model_dir: str, adapter_dir: str | None, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    if adapter_dir is None:
        return model
    from .adapter import attach_adapter

    return attach_adapter(model, adapter_dir).eval()


def evaluate_files(model_dir, data_path, adapter=None, chat_template=False, max_length=512,
                   batch_size=8, max_examples=0, dtype=torch.float32, add_eos=True,
                   predictions: list | None = None) -> dict:
    """Loss (and accuracy over choices) of a model folder, optionally with an adapter.
    `predictions`, if given, receives one dict per scored record: its line, the
    predicted and gold choice indices and the choices' log-likelihoods (to compare two
    models record by record, e.g. a paired test of before vs after)."""
    from transformers import AutoTokenizer

    from .hub import resolve

    model_dir = resolve(model_dir)   # a local folder, or a hub name already in the cache
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = _load_model(model_dir, adapter, dtype)
    records, fmt = data.load(data_path)
    if max_examples:
        records = records[:max_examples]
    t0 = time.perf_counter()
    examples = [data.tokenize_record(r, fmt, tok, max_length, chat_template, w, add_eos) for w, r in records]
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        s, n = loss_sums(lambda **b: model(**b).loss, examples,
                         list(range(start, min(start + batch_size, len(examples)))), pad, "cpu")
        total, count = total + s, count + n
    result = {"model": str(model_dir), "adapter": adapter, "data": str(data_path),
              "examples": len(examples), "eval_loss": total / max(1, count)}
    items = choice_items(records, tok, chat_template)
    if items:
        hits = []
        where = [w for w, r in records if r.get("choices") is not None]
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            scores = score_items(lambda **b: model(**b).logits, chunk, pad, "cpu")
            hits += correct(scores, chunk)
            if predictions is not None:
                predictions += [{"record": where[start + i], "predicted": p, "answer": it.answer, "scores": s}
                                for i, (p, s, it) in enumerate(zip(predicted(scores), scores, chunk))]
        result["accuracy"] = sum(hits) / len(hits)
        result["scored"] = len(hits)
    result["seconds"] = time.perf_counter() - t0
    return result


def _read_predictions(path: str) -> list[dict]:
    rows = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                missing = {"record", "predicted", "answer"} - set(row)
            except (json.JSONDecodeError, TypeError):
                raise ValueError(f"{path}:{n}: not a JSON object (write it with --predictions)") from None
            if missing:
                raise ValueError(f"{path}:{n}: missing {sorted(missing)} (write it with --predictions)")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no predictions")
    return rows


def _paired_cli(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpart_ds.evaluate paired",
                                 description="exact McNemar test of two --predictions files")
    ap.add_argument("before")
    ap.add_argument("after")
    a = ap.parse_args(argv)
    try:
        r = paired(*(_read_predictions(f) for f in (a.before, a.after)))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=2))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "paired":
        return _paired_cli(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="a Hugging Face model folder (base or merged), or org/name already in the HF cache")
    ap.add_argument("--adapter", default=None, help="a gpart_ds adapter folder to apply")
    ap.add_argument("--data", required=True)
    ap.add_argument("--chat-template", action="store_true", help="render prompts as a user turn")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--no-eos", action="store_true", help="completions end without EOS (data.add_eos: false)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-examples", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--predictions", default=None,
                    help="write one JSON line per scored record (record, predicted, answer, scores)")
    args = ap.parse_args(argv)
    preds = [] if args.predictions else None
    try:
        res = evaluate_files(args.model, args.data, args.adapter, args.chat_template, args.max_length,
                             args.batch_size, args.max_examples, add_eos=not args.no_eos, predictions=preds)
    except (data.DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2))
    if args.json:
        write_atomic(args.json, json.dumps(res, indent=2))
    if preds is not None:
        write_atomic(args.predictions, "".join(json.dumps(p) + "\n" for p in preds))
    return 0 if math.isfinite(res["eval_loss"]) else 1


if __name__ == "__main__":
    sys.exit(main())
