"""Prompt/completion data: read JSON lines, tokenise, batch in a rank-independent order.

Records are {"prompt": str, "completion": str}; the loss covers the completion tokens
(and the EOS that ends them) only. Malformed input is reported with file and line.

Batch order is global and deterministic: each epoch is a seeded permutation of the
records; step s consumes the s-th block of micro_batch * grad_accum * world records,
and micro-batch m of that block (m = accum_index * world + rank) goes to one rank. The
same global batch therefore yields the same gradient on 1 rank or on many.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100


class DataError(ValueError):
    """Bad input data: names the file and line."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def read_jsonl(path: str | Path, required=("prompt", "completion")) -> list[dict]:
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for key in required:
                if key not in rec:
                    raise DataError(f"{path}:{lineno}: missing key {key!r} (has {sorted(rec)})")
                if not isinstance(rec[key], str):
                    raise DataError(f"{path}:{lineno}: {key!r} must be a string, "
                                    f"got {type(rec[key]).__name__}")
            records.append(rec)
    if not records:
        raise DataError(f"{path}: no records (empty file)")
    return records


def tokenize(records: list[dict], tokenizer, max_length: int) -> list[Example]:
    """prompt tokens (with the tokenizer's BOS) + completion tokens + EOS, truncated."""
    eos = tokenizer.eos_token_id
    out = []
    for rec in records:
        p = tokenizer(rec["prompt"], add_special_tokens=True)["input_ids"]
        c = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"]
        if eos is not None:
            c = c + [eos]
        ids = (p + c)[:max_length]
        labels = ([IGNORE_INDEX] * len(p) + c)[:max_length]
        out.append(Example(ids, labels))
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked and carries no loss."""
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class GlobalBatchOrder:
    """Which records form micro-batch (step, accum_index) on a rank. Stateless."""

    def __init__(self, n_records: int, micro_batch: int, grad_accum: int, world: int, seed: int):
        self.n, self.mb, self.accum, self.world, self.seed = n_records, micro_batch, grad_accum, world, seed
        self._perms: dict[int, list[int]] = {}

    @property
    def global_batch(self) -> int:
        return self.mb * self.accum * self.world

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def _record(self, position: int) -> int:
        return self._perm(position // self.n)[position % self.n]

    def indices(self, step: int, accum_index: int, rank: int) -> list[int]:
        m = accum_index * self.world + rank
        start = step * self.global_batch + m * self.mb
        return [self._record(start + i) for i in range(self.mb)]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n


def eval_batches(n_examples: int, micro_batch: int, world: int, rank: int):
    """Index lists for this rank; every rank gets the same number of batches (ZeRO-3 needs
    all ranks in every forward), ranks past the end get an empty list (weight 0)."""
    per_round = micro_batch * world
    for r in range(-(-n_examples // per_round)):
        start = r * per_round + rank * micro_batch
        yield list(range(start, min(start + micro_batch, n_examples)))
