"""Evaluation on held-out records: the answer the model generates, the held-out loss on the
trained tokens, and accuracy over `choices`.

Generated answer (answer_accuracy, on unless --no-generate): greedy decoding in batches,
what a server returns at temperature 0, judged by the record's kind (gpart_ds/generation.py:
the choice named first, the first number, or the text after normalising).

Choice accuracy: for a record with a "choices" list, the prediction is the choice with the
largest summed log-likelihood given the prompt (rendered exactly as in training). Each
prompt is read once: one forward over the left-padded prompts keeps their keys and values
(KV cache), and one over the choices' own tokens scores every choice from it; logits only
where they predict a choice token (`logits_to_keep`), never a full-vocabulary softmax over
the whole sequence. When every choice is a single token, one forward per record scores all.

    python -m gpart_ds.evaluate --model DIR [--adapter DIR] --data eval.jsonl [--chat-template]
                                [--predictions preds.jsonl]
    python -m gpart_ds.evaluate paired before.jsonl after.jsonl     # exact McNemar test

A predictions file (--predictions here, eval_predictions.jsonl and predictions/step-N.jsonl
from a run) has one line per scored record with its verdicts: the generated answer's
(answer_correct), the chosen choice's where the record has choices, and exact match;
`paired --verdict auto` compares the generated answers when both files have them.

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
from pathlib import Path

import torch

from . import data, generation
from .errors import UserError, run_cli
from .fileio import folder_problem, overlap, write_atomic
from .hub import resolve as resolve_model


class EvalError(UserError):
    """An evaluation that cannot run or gave a non-finite result."""


class Abandoned(Exception):
    """The evaluation was given up for a stop signal: every rank agreed on it before the
    same batch (Evaluator.run's `stop`), so none is left waiting in a collective."""


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


def _next_token_logp(forward, items: list[ChoiceItem], pad_id: int, device):
    """(full-vocabulary log p of the token after each prompt, single-token choice scores)."""
    batch = data.left_padded([it.prompt for it in items], pad_id, device)
    logp = torch.log_softmax(forward(**batch, logits_to_keep=1)[:, -1].float(), dim=-1)
    return logp, [[float(logp[i, c[0]]) for c in it.choices] for i, it in enumerate(items)]


def single_token(items: list[ChoiceItem]) -> bool:
    """Every choice of every item is one token: one forward per record scores them all."""
    return all(len(c) == 1 for it in items for c in it.choices)


@torch.no_grad()
def score_items(model, items: list[ChoiceItem], pad_id: int, device, single: bool | None = None) -> list[list[float]]:
    """Summed log-likelihood of every choice of every item; `model(**batch)` returns the
    model's output (.logits; with use_cache=True the KV cache, named `cache` or, before
    transformers renamed it, `past_key_values`).

    Multi-token choices read each prompt once: its forward keeps the keys and values (the KV
    cache), copied to one row per choice, and a second forward over the choices' tokens alone
    scores them all. A record with 4 choices costs one prompt plus 4 short rows, not 4 whole
    sequences (tests/test_evaluate.py: the scores of one unpadded sequence each). Always two
    forwards for a batch, whatever it holds, so the ranks of a ZeRO-3 world (which gather
    weights in every forward) stay in step; `single` (single_token of all the items, not of
    this batch, for the same reason) takes the one-forward path instead."""
    logits = lambda **b: model(**b).logits  # noqa: E731
    if single if single is not None else single_token(items):
        return _next_token_logp(logits, items, pad_id, device)[1]
    return _cached_choices(model, items, pad_id, device)[0]


@torch.no_grad()
def score_items_and_labels(model, items: list[ChoiceItem], tails: list[list[int]], pad_id: int, device):
    """score_items, plus each record's loss and exact match where its eval example is the
    prompt, the answer choice and `tails[i]` (nothing, or EOS: label_tails): the answer's row
    of the choice forward carries its tail too, so the same two forwards give (scores, summed
    -log p of every predicted token, [exact match of each record]) and no separate loss pass
    reads the prompts again."""
    return _cached_choices(model, items, pad_id, device, tails)


def _cached_choices(model, items: list[ChoiceItem], pad_id: int, device, tails=None):
    """The two forwards of score_items (module doc there); with `tails`, the answer rows
    extended by them and (scores, loss sum, exact matches) returned, else (scores,)."""
    batch = data.left_padded([it.prompt for it in items], pad_id, device)
    out = model(**batch, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    owner, conts, choice_len, answer_row = [], [], [], []
    for i, it in enumerate(items):
        for k, c in enumerate(it.choices):
            if k == it.answer:
                answer_row.append(len(conts))
            owner.append(i)
            choice_len.append(len(c))
            conts.append(c + tails[i] if tails is not None and k == it.answer else c)
    rows = torch.tensor(owner, device=first.device)
    # handed back under the name it came by: transformers 5.x renamed past_key_values to
    # cache and drops the old name in 5.40, while the pyproject range still admits older 5.x
    cache_name = "cache" if "cache" in out else "past_key_values"
    cache = out[cache_name]
    cache.reorder_cache(rows)  # row r continues the prompt of item owner[r]
    width = max(len(c) for c in conts)
    ids = torch.full((len(conts), width), pad_id, dtype=torch.long)
    new = torch.zeros((len(conts), width), dtype=torch.long)
    for r, c in enumerate(conts):
        ids[r, : len(c)], new[r, : len(c)] = torch.tensor(c), 1
    # right-padded continuations: their padding comes after every real token, so no real
    # token attends to it; positions go on from each prompt's last one
    mask = torch.cat([batch["attention_mask"][rows], new.to(device)], dim=1)
    pos = batch["position_ids"][rows, -1:] + 1 + torch.arange(width, device=device)
    logp = torch.log_softmax(
        model(input_ids=ids.to(device), attention_mask=mask, position_ids=pos, **{cache_name: cache}).logits.float(),
        dim=-1,
    )

    def token_logps(r: int, toks: list[int]) -> torch.Tensor:
        """log p of each of row r's tokens: the first from the prompt's last position, each
        later one from the row's position before it."""
        rest = logp[r, : len(toks) - 1].gather(1, torch.tensor(toks[1:], device=logp.device)[:, None])[:, 0]
        return torch.cat([first[owner[r], toks[0]].reshape(1), rest])

    scores: list[list[float]] = [[] for _ in items]
    for r, n in enumerate(choice_len):  # a tail is not part of its choice's score
        scores[owner[r]].append(float(token_logps(r, conts[r][:n]).sum()))
    if tails is None:
        return (scores,)
    loss, matches = 0.0, []
    for i, r in enumerate(answer_row):
        toks = conts[r]
        loss -= float(token_logps(r, toks).sum())
        best = torch.cat([first[i].argmax().reshape(1), logp[r, : len(toks) - 1].argmax(-1)])
        matches.append(best.tolist() == toks)
    return scores, loss, matches


def label_tails(examples, items: list[ChoiceItem]) -> list[list[int]] | None:
    """Where every eval example is its item's prompt + the answer choice + at most one more
    token (EOS), and exactly the tokens after the prompt are predicted: each example's extra
    tokens (its tail). Then the choice forwards also give every example's loss and exact
    match (score_items_and_labels; single-token choices without a tail: one forward,
    label_is_the_answer_choice), and the evaluation needs no separate loss pass. None
    otherwise (another completion, a chat record, a truncated example)."""
    if not items or len(examples) != len(items):
        return None
    tails = []
    for ex, it in zip(examples, items):
        ids, head = list(ex.input_ids), it.prompt + it.choices[it.answer]
        if ids[: len(head)] != head or len(ids) - len(head) > 1:
            return None
        predicted = [i for i, lab in enumerate(ex.labels) if lab != data.IGNORE_INDEX]
        if (
            predicted != list(range(len(it.prompt), len(ids)))
            or [ex.labels[i] for i in predicted] != ids[len(it.prompt) :]
        ):
            return None
        tails.append(ids[len(head) :])
    return tails


def label_is_the_answer_choice(examples, items: list[ChoiceItem]) -> bool:
    """True when every eval example is exactly its item's prompt + the answer choice, the
    choice is one token and the only predicted one: then the choice forward's log-softmax
    at the last prompt position also gives the example's loss and exact match (one
    forward per record instead of two; the quickstart's case, `data.add_eos: false`)."""
    return one_forward(label_tails(examples, items), items)


def one_forward(tails: list[list[int]] | None, items: list[ChoiceItem]) -> bool:
    """label_is_the_answer_choice from label_tails' answer: no tail, single-token choices."""
    return tails is not None and not any(tails) and single_token(items)


@torch.no_grad()
def score_items_with_label(forward, items: list[ChoiceItem], pad_id: int, device):
    """score_items for single-token choices, plus (summed -log p(answer), exact match of
    each item) from the same full-vocabulary log-softmax (see label_is_the_answer_choice)."""
    logp, scores = _next_token_logp(forward, items, pad_id, device)
    answer = torch.tensor([it.choices[it.answer][0] for it in items], device=logp.device)
    loss = float(-logp.gather(1, answer[:, None]).sum())
    return scores, loss, (logp.argmax(-1) == answer).tolist()


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
def loss_and_row_matches(forward, examples, indices: list[int], pad_id: int, device) -> tuple[float, int, dict]:
    """(summed loss, predicted tokens, {example index: exact match}) for one batch.

    `forward(**batch, exact_match=True)` returns an output with `.loss` and `.matches`
    (objective.LabelLossOutput): exact match = every completion token is the argmax. An
    example with no label token has no exact match (it is not counted).
    """
    batch = {k: v.to(device) for k, v in data.collate([examples[i] for i in indices], pad_id).items()}
    labelled = batch["labels"][:, 1:] != data.IGNORE_INDEX
    n = int(labelled.sum())
    out = forward(**batch, exact_match=True)
    rows = [i for i, has in zip(indices, labelled.any(1).tolist()) if has]
    return float(out.loss) * n, n, dict(zip(rows, out.matches.tolist()))


VERDICTS = ("auto", "answer", "choice", "match")


def record_correct(p: dict, verdict: str = "auto") -> bool:
    """A prediction line's verdict. answer: the generated answer was right (answer_correct);
    choice: the chosen choice is the gold one; match: the completion was the greedy one
    (teacher-forced exact match). auto: the first of those the line has."""
    if verdict == "auto":
        verdict = "answer" if "answer_correct" in p else "choice" if "predicted" in p and "answer" in p else "match"
    if verdict == "answer":
        return bool(p["answer_correct"])
    if verdict == "choice":
        return p["predicted"] == p["answer"]
    return bool(p["match"])


def common_verdict(*files: list[dict]) -> str:
    """The verdict every line of every file has, preferring the generated answer."""
    for v, keys in (("answer", ("answer_correct",)), ("choice", ("predicted", "answer")), ("match", ("match",))):
        if all(k in p for rows in files for p in rows for k in keys):
            return v
    raise ValueError("the prediction files share no verdict (answer_correct, predicted/answer or match) on every line")


def paired(before: list[dict], after: list[dict], verdict: str = "auto") -> dict:
    """Exact McNemar test of two prediction lists over the same records, each line judged
    by the same verdict (auto: the generated answer where both files have it on every
    line, else choice accuracy, else exact match): of the records the two get differently
    right, how likely is a split this uneven if both were equally accurate (two-sided
    binomial with p = 1/2)."""
    if verdict == "auto":
        verdict = common_verdict(before, after)
    a = {p["record"]: record_correct(p, verdict) for p in before}
    b = {p["record"]: record_correct(p, verdict) for p in after}
    if set(a) != set(b):
        raise ValueError(f"the prediction files score different records ({len(set(a) ^ set(b))} differ)")
    fixed = sum(1 for k in a if b[k] and not a[k])  # wrong before, right after
    broken = sum(1 for k in a if a[k] and not b[k])  # right before, wrong after
    n, k = fixed + broken, min(fixed, broken)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
    return {
        "records": len(a),
        "verdict": verdict,
        "accuracy_before": sum(a.values()) / len(a),
        "accuracy_after": sum(b.values()) / len(b),
        "fixed": fixed,
        "broken": broken,
        "p_value": min(1.0, 2 * tail),
    }


class Evaluator:
    """The held-out evaluation, one code path for the trainer (every rank, through the
    engine) and the CLI (one process): loss per predicted token, exact match (every
    completion token is the argmax) and, for records with choices, accuracy.

    When every record is its prompt plus a single-token answer choice, loss, exact match
    and accuracy all come from one forward per record (label_is_the_answer_choice); when
    every record is its prompt plus its answer choice and at most EOS, from the two choice
    forwards (label_tails); otherwise a loss pass over the whole sequences runs as well.
    `model(**batch)` must follow objective.TrainingModel: with labels it returns `.loss`
    (and `.matches` with exact_match=True), without labels the logits.

    Batches hold records of similar length (shortest first): a batch pads to its longest
    record, and a record's result does not depend on its batch mates.
    """

    def __init__(
        self,
        examples,
        records: list[tuple[str, dict]],
        items: list[ChoiceItem],
        pad_id: int,
        questions: list | None = None,
        tokenizer=None,
    ):
        self.examples, self.items, self.pad_id = examples, items, pad_id
        # Generated answers (generation.py): the records that have one, and the tokenizer
        # that decodes them. The answer length is fixed by all of them, so every rank and
        # every evaluation generates the same number of tokens.
        self.questions, self.tokenizer = questions or [], tokenizer
        self.new_tokens = generation.max_new_tokens(self.questions, tokenizer) if self.questions else 0
        # where each example is its answer choice (and EOS): the choice forwards give the loss
        # and exact match too, and no loss pass reads the prompts a second time; with
        # single-token choices and no EOS, one forward gives everything
        tails = label_tails(examples, items)
        self.one_forward = one_forward(tails, items)
        self.tails = None if self.one_forward else tails
        self.single_token = single_token(items)  # decided on all items: every rank takes one path
        # Each verdict names its eval record: "file:line" and the record's position in the
        # file. Examples are the records in order unless data.too_long=skip dropped some;
        # then an example is named by its position among those kept.
        self.where = [w for w, _ in records]
        self.item_record = [i for i, (_, r) in enumerate(records) if r.get("choices") is not None]
        self.examples_are_records = len(examples) == len(records)

    @classmethod
    def for_files(cls, examples, path, fmt: str, tokenizer, chat_template: bool, pad_id: int) -> Evaluator:
        records, _ = data.load(path, fmt)
        return cls(
            examples,
            records,
            choice_items(records, tokenizer, chat_template),
            pad_id,
            generation.questions(records, tokenizer, chat_template),
            tokenizer,
        )

    def _example_row(self, i: int) -> tuple[int, dict]:
        """(sort key, the name of example i's record)."""
        if self.examples_are_records:
            return i, {"record": self.where[i], "index": i}
        # which records data.too_long=skip dropped is not kept: name the example itself
        name = f"{self.where[0].rpartition(':')[0]} example {i + 1} of those within data.max_length"
        return len(self.where) + i, {"record": name, "index": None}

    @torch.no_grad()
    def run(
        self,
        model,
        micro_batch: int,
        limit: int = 0,
        device="cpu",
        predictions: list | None = None,
        generate=None,
        eos: list[int] | None = None,
        generate_batch: int = 0,
        stop=None,
    ) -> dict:
        """Every rank calls it (ZeRO-3 gathers weights collectively); ranks past the end run
        a dummy batch with weight 0. `limit`: the first N records (the same on any world size).
        `predictions` (filled on rank 0) receives one dict per scored record, in file order:
        its "record" (file:line) and "index" (position in the file), "match" (exact match)
        and, where it has choices, "predicted", "answer" and the choices' "scores".
        With `generate` (a model's generate) and `eos` (the ids it stops at), every record
        with an answer is also answered greedily and judged (generation.verdict: "generated",
        "kind", "said", "answer_correct"; the result's answer_accuracy), `generate_batch`
        records at a time (0: micro_batch). Under ZeRO-3 every decoding step gathers the
        weights, so few large batches cost far less than many small ones.

        `stop` (a collective: every rank calls it before each batch, all at the same ones)
        says whether to give up: Abandoned is raised on every rank at once. A stop signal
        then waits one batch, not a whole evaluation, which with generated answers on a
        large model takes minutes: longer than a scheduler waits before it kills the job."""
        from . import comm

        def batches(n: int, size: int):
            for idx in data.shard_evenly(n, size, world, rank):
                if stop is not None and stop():
                    raise Abandoned()
                yield idx

        world, rank = comm.world(), comm.rank()
        t0 = time.perf_counter()
        generate_s = None
        loss_sum, n_tok, matched, n_ex, hits, scored = 0.0, 0, 0, 0, 0, 0
        mine: dict[int, dict] = {}  # record (sort key) -> this rank's verdicts on it
        right, answered = 0, 0
        if generate is not None and self.questions:
            qs = [q for q in self.questions if not limit or q.index < limit]
            order = sorted(range(len(qs)), key=lambda i: len(qs[i].prompt))
            for idx in batches(len(qs), generate_batch or micro_batch):
                idx = [order[i] for i in idx]
                chunk = [qs[i] for i in idx] or qs[:1]
                outs = generation.greedy(
                    generate, [q.prompt for q in chunk], self.pad_id, eos, self.new_tokens, device, synced=world > 1
                )
                for q, ids in zip(chunk if idx else [], outs):
                    v = generation.verdict(q, generation.answer_text(self.tokenizer, ids))
                    right, answered = right + v["answer_correct"], answered + 1
                    mine.setdefault(q.index, {"record": q.where, "index": q.index}).update(v)
            generate_s = time.perf_counter() - t0
        if not self.one_forward and self.tails is None:
            n = min(len(self.examples), limit) if limit else len(self.examples)
            order = sorted(range(n), key=lambda i: len(self.examples[i].input_ids))
            for idx in batches(n, micro_batch):
                idx = [order[i] for i in idx]
                s, k, em = loss_and_row_matches(model, self.examples, idx or [0], self.pad_id, device)
                if idx:
                    loss_sum, n_tok, matched, n_ex = loss_sum + s, n_tok + k, matched + sum(em.values()), n_ex + len(em)
                    for i, m in em.items():
                        key, row = self._example_row(i)
                        mine.setdefault(key, {}).update(row, match=bool(m))
        items = self.items[: min(len(self.items), limit) if limit else len(self.items)]
        order = sorted(range(len(items)), key=lambda i: len(items[i].prompt) + max(map(len, items[i].choices)))
        logits = lambda **b: model(**b).logits  # noqa: E731
        for idx in batches(len(items), micro_batch):
            idx = [order[i] for i in idx]
            chunk = [items[i] for i in idx] or items[:1]
            em = None
            if self.one_forward:  # loss and exact match from the same forward
                scores, s, em = score_items_with_label(logits, chunk, self.pad_id, device)
                if idx:  # one predicted token per record
                    loss_sum, n_tok = loss_sum + s, n_tok + len(chunk)
                    matched, n_ex = matched + sum(em), n_ex + len(chunk)
            elif self.tails is not None:  # the same from the choice forwards
                tails = [self.tails[i] for i in idx] or self.tails[:1]
                scores, s, em = score_items_and_labels(model, chunk, tails, self.pad_id, device)
                if idx:
                    predicted_tokens = sum(len(it.choices[it.answer]) + len(t) for it, t in zip(chunk, tails))
                    loss_sum, n_tok = loss_sum + s, n_tok + predicted_tokens
                    matched, n_ex = matched + sum(em), n_ex + len(chunk)
            else:
                scores = score_items(model, chunk, self.pad_id, device, self.single_token)
            if idx:
                pred = predicted(scores)
                hits, scored = hits + sum(p == it.answer for p, it in zip(pred, chunk)), scored + len(chunk)
                for j, (i, p, sc, it) in enumerate(zip(idx, pred, scores, chunk)):
                    r = self.item_record[i]
                    row = mine.setdefault(r, {"record": self.where[r], "index": r})
                    row.update(predicted=p, answer=it.answer, scores=sc)
                    if em is not None:
                        row["match"] = bool(em[j])
        loss_total, tok_total, hit_total, score_total, em_total, ex_total, right_total, answered_total = comm.all_sum(
            [loss_sum, n_tok, hits, scored, matched, n_ex, right, answered], device
        )
        if predictions is not None:
            every = comm.gather_objects(mine)
            if rank == 0:
                merged: dict[int, dict] = {}
                for part in every:
                    for r, row in part.items():
                        merged.setdefault(r, {}).update(row)
                predictions += [merged[r] for r in sorted(merged)]
        out = {"eval_loss": loss_total / max(1.0, tok_total), "exact_match": em_total / max(1.0, ex_total)}
        if score_total:
            out["accuracy"] = hit_total / score_total
        if answered_total:
            out["answer_accuracy"] = right_total / answered_total
        # What the evaluation costs (rank 0's clock): generating the answers against scoring.
        out["eval_s"] = time.perf_counter() - t0
        if generate_s is not None:
            out["generate_s"] = generate_s
        return out


# ------------------------------------------------------------------ CLI
def _load_model(model_dir: str, adapter_dir: str | None, dtype, model_flag: str = "--model"):
    """The model folder as a method root, with a GPart adapter applied if given;
    `model_flag` is how the caller's command line names the model folder (its errors say it)."""
    from transformers import AutoModelForCausalLM

    from .methods import MethodRoot
    from .model import check_weights

    check_weights(model_dir)  # a missing key would be evaluated as random values
    if adapter_dir is None:
        return MethodRoot(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()).eval()
    folder = Path(adapter_dir)
    config = folder / "adapter_config.json"
    if config.is_file():
        from .methods.gpart.adapter import read_config

        peft_type = read_config(config).get("peft_type")
    else:
        peft_type = None
    if peft_type in ("LORA", "VERA"):  # the LoRA and VeRA runs' adapters are PEFT folders
        from peft import PeftModel

        from .methods.peft_common import check_adapter

        # its digest and base model, before any weight is loaded
        check_adapter(folder, Path(model_dir), model_flag)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        return MethodRoot(PeftModel.from_pretrained(model, folder)).eval()
    from .export.source import open_source  # a GPart adapter, a checkpoint, or the GPart authors' adapter
    from .safetensors_io import read_model_header

    # Read and checked (settings, digest, layout, base identity) before the model is loaded.
    src = open_source(folder, Path(model_dir))
    src.check(read_model_header(Path(model_dir)), Path(model_dir), model_flag)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    if config.is_file() and src.kind == "gpart_ds":
        from .methods.gpart.adapter import attach_adapter

        return attach_adapter(model, folder).eval()
    return src.attach(model).eval()


def evaluate_files(
    model_dir,
    data_path,
    adapter=None,
    chat_template=False,
    max_length=512,
    batch_size=8,
    max_examples=0,
    dtype=torch.float32,
    add_eos=True,
    predictions: list | None = None,
    too_long: str = "error",
    generate: bool = True,
    generate_batch: int = 64,
) -> dict:
    """Loss, exact match (and accuracy over choices) of a model folder, optionally with an
    adapter, through the trainer's own Evaluator. `predictions`, if given, receives one
    dict per scored record: its file:line, the predicted and gold choice indices and the
    choices' log-likelihoods (to compare two models record by record: `paired`)."""
    from transformers import AutoTokenizer

    from .hub import resolve
    from .objective import TrainingModel

    model_dir = resolve(model_dir)  # a local folder, or a hub name already in the cache
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    root = _load_model(model_dir, adapter, dtype)
    model = TrainingModel(root).eval()
    records, fmt = data.load(data_path)
    if max_examples:
        records = records[:max_examples]
    t0 = time.perf_counter()
    examples, _ = data.limit_lengths(
        [(w, data.tokenize_record(r, fmt, tok, max_length, chat_template, w, add_eos)) for w, r in records],
        max_length,
        too_long,
        data_path,
    )
    items = choice_items(records, tok, chat_template)
    ev = Evaluator(examples, records, items, pad, generation.questions(records, tok, chat_template), tok)
    answers = (
        dict(generate=root.generate, eos=generation.stop_ids(root.lm, tok), generate_batch=generate_batch)
        if generate
        else {}
    )
    res = ev.run(model, batch_size, 0, "cpu", predictions, **answers)
    result = {"model": str(model_dir), "adapter": adapter, "data": str(data_path), "examples": len(examples), **res}
    if items:
        result["scored"] = len(items)
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
                keys = set(row)
            except (json.JSONDecodeError, TypeError):
                raise EvalError(f"{path}:{n}: not a JSON object (write it with --predictions)") from None
            # a verdict: the generated answer's, the chosen and gold choice, or the exact match
            missing = ({"record"} - keys) or (
                {"predicted", "answer"} - keys if not keys & {"match", "answer_correct"} else set()
            )
            if missing:
                raise EvalError(
                    f"{path}:{n}: missing {sorted(missing)} (write it with --predictions, or take "
                    "a run's eval_predictions.jsonl)"
                )
            rows.append(row)
    if not rows:
        raise EvalError(f"{path}: no predictions")
    return rows


def _paired_cli(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m gpart_ds.evaluate paired", description="exact McNemar test of two --predictions files"
    )
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument(
        "--verdict",
        choices=VERDICTS,
        default="auto",
        help="answer (generated), choice (ranked choices) or match (teacher-forced exact "
        "match); auto: the first that both files have on every line",
    )
    a = ap.parse_args(argv)
    for f in (a.before, a.after):
        if not Path(f).is_file():
            raise EvalError(f"{f}: no such predictions file")
    try:
        r = paired(*(_read_predictions(f) for f in (a.before, a.after)), verdict=a.verdict)
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    print(json.dumps(r, indent=2))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "paired":
        return run_cli(lambda: _paired_cli(argv[1:]))
    return run_cli(lambda: _eval_cli(argv))


def _eval_cli(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m gpart_ds.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model",
        required=True,
        help="a Hugging Face model folder (base or merged), or org/name already in the HF cache",
    )
    ap.add_argument("--adapter", default=None, help="a gpart_ds adapter folder to apply")
    ap.add_argument("--data", required=True)
    ap.add_argument("--chat-template", action="store_true", help="render prompts as a user turn")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--no-eos", action="store_true", help="completions end without EOS (data.add_eos: false)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-examples", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument(
        "--predictions", default=None, help="write one JSON line per scored record (record, predicted, answer, scores)"
    )
    ap.add_argument(
        "--no-generate", action="store_true", help="skip the generated answers (answer_accuracy): scoring only"
    )
    ap.add_argument("--generate-batch", type=int, default=64, help="records decoded together")
    ap.add_argument(
        "--too-long",
        default="error",
        choices=("error", "skip", "truncate_left"),
        help="records longer than --max-length (as data.too_long)",
    )
    args = ap.parse_args(argv)
    for flag, value, low in (
        ("--batch-size", args.batch_size, 1),
        ("--max-length", args.max_length, 2),
        ("--generate-batch", args.generate_batch, 1),
        ("--max-examples", args.max_examples, 0),
    ):
        if value < low:
            raise EvalError(f"{flag} {value}: must be >= {low}")
    model_dir = resolve_model(args.model)
    if not (Path(model_dir) / "config.json").is_file():
        raise EvalError(
            f"--model {args.model}: no Hugging Face model there (no config.json"
            f"{'' if Path(model_dir).is_dir() else '; no such folder'})"
        )
    if not Path(args.data).is_file():
        raise EvalError(f"--data {args.data}: no such file")
    landing = overlap(
        {"--json": args.json, "--predictions": args.predictions},
        {"--model": model_dir, "--adapter": args.adapter, "--data": args.data},
    )
    if landing or (args.json and args.json == args.predictions):
        raise EvalError(landing or f"--json and --predictions are the same file {args.json!r}")
    for flag, out in (("--json", args.json), ("--predictions", args.predictions)):
        # checked before the evaluation: a long run must not end in an error about its output
        if not out:
            continue
        parent = Path(out).parent
        problem = (
            folder_problem(parent)
            or (not parent.is_dir() and f"its folder {str(parent)!r} does not exist")
            or (Path(out).is_dir() and f"{out!r} is a folder")
        )
        if problem:
            raise EvalError(f"{flag} {out}: {problem}")
    preds = [] if args.predictions else None
    res = evaluate_files(
        model_dir,
        args.data,
        args.adapter,
        args.chat_template,
        args.max_length,
        args.batch_size,
        args.max_examples,
        add_eos=not args.no_eos,
        predictions=preds,
        too_long=args.too_long,
        generate=not args.no_generate,
        generate_batch=args.generate_batch,
    )
    print(json.dumps(res, indent=2))
    if args.json:
        write_atomic(args.json, json.dumps(res, indent=2))
    if preds is not None:
        write_atomic(args.predictions, "".join(json.dumps(p) + "\n" for p in preds))
    if not math.isfinite(res["eval_loss"]):
        raise EvalError(
            f"--model {args.model}: the held-out loss is not finite ({res['eval_loss']}): "
            "the model or adapter produces NaN or inf"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
