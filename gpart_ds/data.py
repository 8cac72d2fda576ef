"""Training data: read records, tokenise once into a shared cache, batch in a global order.

Files: JSON lines (.jsonl / .json), CSV (.csv) or Parquet (.parquet), read with
`datasets` (JSON lines are also parsed line by line first so that errors name the line).
Record formats:
    prompt_completion  {"prompt", "completion"}: loss on the completion (+ EOS unless
                       data.add_eos is false) only
    chat               {"messages": [{"role", "content"}, ...]}: rendered with the
                       tokenizer's chat template, loss on assistant turns only
    text               {"text"}: causal LM loss on every token
Records may carry "choices" (a list of strings containing the completion) for
accuracy scoring, see gpart_ds.evaluate.

Tokenised examples are stored once per (file, tokenizer, settings) with
`datasets.save_to_disk`, built under a file lock by whichever process gets there first
and renamed into place: other ranks wait on the lock, before any process group exists,
then memory-map the same files. Nobody tokenises while peers sit in a collective.

Batch order is global and deterministic: each epoch is a seeded permutation; step s
consumes the s-th block of micro_batch * grad_accum * world examples and micro-batch
m = accum_index * world + rank of it goes to one rank, so the same global batch gives
the same update on any number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .fileio import atomic_dir, file_lock, hash_file

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FORMATS = ("auto", "prompt_completion", "chat", "text")
_CACHE_VERSION = 1
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)


class DataError(UserError):
    """Bad input data: names the file and the line (or row)."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None  # set for packed sequences
    # objective "choices": one [position, token of choice 1, token of choice 2, ...] per
    # decision, position = index of the answer's first token in input_ids.
    choices: list[list[int]] | None = None


# ------------------------------------------------------------------ reading
def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    out = []
    with open(path, "rb") as fh:  # bytes: a line that is not UTF-8 is named, not a traceback
        for lineno, raw in enumerate(fh, 1):
            try:
                # utf-8-sig on the first line: a byte-order mark, which Windows editors and
                # spreadsheet exports write, starts the file and is not part of the record
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                    f"{exc.start + 1}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            out.append((f"{path}:{lineno}", rec))
    return out


def _read_table(path: Path, kind: str) -> list[tuple[str, dict]]:
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise DataError(f"{path}: cannot read as {kind} ({type(exc).__name__}: {exc})") from None
    # CSV: the header is line 1, so row i (0-based) is on line i + 2 for one-line rows.
    first = 2 if kind == "csv" else 0
    label = "line" if kind == "csv" else "row"
    return [(f"{path} {label} {i + first}", rec) for i, rec in enumerate(ds)]


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """[(location, record)] from a .jsonl/.json, .csv or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        recs = _read_jsonl(path)
    elif suffix == ".csv":
        recs = _read_table(path, "csv")
    elif suffix == ".parquet":
        recs = _read_table(path, "parquet")
    else:
        raise DataError(f"{path}: unknown data file type {suffix!r} (use .jsonl, .json, .csv or .parquet)")
    if not recs:
        raise DataError(f"{path}: no records (empty file)")
    return recs


def detect_format(records: list[tuple[str, dict]], path) -> str:
    keys = set(records[0][1])
    if "messages" in keys:
        return "chat"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{records[0][0]}: cannot tell the record format from keys {sorted(keys)}; "
        "expected prompt+completion, messages, or text (or set data.format)"
    )


def _need_str(where: str, rec: dict, key: str) -> None:
    if key not in rec:
        raise DataError(f"{where}: missing key {key!r} (has {sorted(rec)})")
    if not isinstance(rec[key], str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(rec[key]).__name__}")


def validate(records: list[tuple[str, dict]], fmt: str) -> None:
    for where, rec in records:
        if fmt == "prompt_completion":
            _need_str(where, rec, "prompt")
            _need_str(where, rec, "completion")
        elif fmt == "text":
            _need_str(where, rec, "text")
        elif fmt == "chat":
            msgs = rec.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise DataError(f"{where}: 'messages' must be a non-empty list")
            for i, m in enumerate(msgs):
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                    raise DataError(f"{where}: messages[{i}] must be {{'role': str, 'content': str}}")
            if not any(m["role"] == "assistant" for m in msgs):
                raise DataError(f"{where}: no assistant message, nothing to learn from")
        choices = rec.get("choices")
        if choices is not None:
            if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
                raise DataError(f"{where}: 'choices' must be a list of at least two strings")
            if rec.get("completion") not in choices:
                raise DataError(f"{where}: 'completion' must be one of 'choices'")


def load(path: str | Path, fmt: str = "auto") -> tuple[list[tuple[str, dict]], str]:
    """Read and validate a data file; returns (records, resolved format)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; one of {FORMATS}")
    records = read_records(path)
    fmt = detect_format(records, path) if fmt == "auto" else fmt
    validate(records, fmt)
    return records, fmt


# ------------------------------------------------------------------ tokenising
def tokenizer_source(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or "the tokenizer")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def no_template_error(where: str, tokenizer, why: str) -> DataError:
    return DataError(
        f"{where}: {why}, but the tokenizer of {tokenizer_source(tokenizer)} has no chat template "
        "(no chat_template in its tokenizer_config.json or chat_template.jinja); use a model whose "
        "tokenizer has one, add one there, or use prompt/completion records with "
        "data.chat_template false"
    )


def apply_template(tokenizer, messages, where: str, generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation rendered by the tokenizer's chat template; a missing
    template, or a template that refuses the conversation (roles it does not accept, an
    order it does not allow: templates call raise_exception), names the record and the
    model instead of a Jinja traceback."""
    if not has_chat_template(tokenizer):
        raise no_template_error(
            where, tokenizer, "chat records (or data.chat_template) are rendered with the tokenizer's chat template"
        )
    try:
        from jinja2 import TemplateError
    except ImportError:  # transformers renders templates with jinja2; without it nothing renders
        TemplateError = ()  # noqa: N806
    try:
        return list(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
            )
        )
    except TemplateError as exc:
        roles = [m.get("role") for m in messages if isinstance(m, dict)]
        raise DataError(
            f"{where}: the chat template of {tokenizer_source(tokenizer)} refuses this conversation "
            f"(roles {roles}): {exc}"
        ) from None


def prompt_ids(tokenizer, prompt: str, chat_template: bool, where: str = "?") -> list[int]:
    """Token ids of a prompt as training sees them (shared with evaluation)."""
    if chat_template:
        return apply_template(tokenizer, [{"role": "user", "content": prompt}], where, generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def _render(tokenizer, messages, generation_prompt=False, where: str = "?") -> list[int]:
    return apply_template(tokenizer, messages, where, generation_prompt)


def check_template(path, fmt: str, chat_template: bool, tokenizer) -> None:
    """Before any tokenising: data that needs the chat template (chat records, or
    data.chat_template) with a tokenizer that has none is refused naming the data file
    and the model; the first record decides the format, as detect_format does."""
    if has_chat_template(tokenizer):
        return
    # A record the format forbids (no assistant turn, a line of another format) is named
    # first, at its file:line: it is wrong whatever the template, and the more precise.
    load(path, fmt)
    if chat_template:
        raise no_template_error(
            f"{path}", tokenizer, "data.chat_template is true (prompts are rendered as a chat turn)"
        )
    if fmt == "chat" or (fmt == "auto" and "messages" in _first_record(path)):
        raise no_template_error(
            f"{path}",
            tokenizer,
            "its records are chat conversations (messages), rendered with the tokenizer's chat template",
        )


def _first_record(path) -> dict:
    """The first record of a JSON-lines file ({} for other files or where it is unreadable:
    reading them fully is load's work, and it names their problems)."""
    p = Path(path)
    if p.suffix.lower() not in (".jsonl", ".json") or not p.is_file():
        return {}
    try:
        with open(p, "rb") as fh:
            for raw in fh:
                if raw.strip():
                    rec = json.loads(raw.decode("utf-8"))
                    return rec if isinstance(rec, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    return {}


def _chat_example(tokenizer, where: str, messages: list[dict]) -> Example:
    ids = _render(tokenizer, messages, where=where)
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True, where=where)) if i else 0
        upto = _render(tokenizer, messages[: i + 1], where=where)
        if ids[: len(upto)] != upto:
            raise DataError(
                f"{where}: the tokenizer's chat template is not prefix-stable "
                "(rendering a conversation changes its earlier turns), so "
                "assistant turns cannot be located; use prompt/completion records"
            )
        labels[start : len(upto)] = ids[start : len(upto)]
    return Example(ids, labels)


def _decision(rec: dict, tokenizer, pos: int, where: str) -> list[int]:
    """[pos, first token of each choice]: what the choices objective scores at pos."""
    choices = rec.get("choices")
    if not isinstance(choices, list) or rec["completion"] not in choices:
        raise DataError(f"{where}: train.objective 'choices' needs a 'choices' list containing the completion")
    firsts = [(tokenizer(c, add_special_tokens=False)["input_ids"] or [None])[0] for c in choices]
    if None in firsts or len(set(firsts)) != len(firsts):
        raise DataError(
            f"{where}: choices {choices!r} do not differ in their first token, which the "
            "'choices' objective scores; use train.objective lm"
        )
    return [pos] + firsts


def tokenize_record(
    rec: dict,
    fmt: str,
    tokenizer,
    max_length: int,
    chat_template: bool = False,
    where: str = "?",
    add_eos: bool = True,
    choice_loss: bool = False,
) -> Example:
    """One record as token ids and labels, at full length (see fit_length)."""
    if choice_loss and fmt != "prompt_completion":
        raise DataError(f"{where}: train.objective 'choices' needs prompt/completion records, not {fmt}")
    eos = tokenizer.eos_token_id if add_eos else None
    if fmt == "prompt_completion":
        p = prompt_ids(tokenizer, rec["prompt"], chat_template, where)
        c = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"]
        if eos is not None:
            c = c + [eos]
        ex = Example(p + c, [IGNORE_INDEX] * len(p) + c)
        if choice_loss:
            ex.choices = [_decision(rec, tokenizer, len(p), where)]
    elif fmt == "chat":
        ex = _chat_example(tokenizer, where, rec["messages"])
    else:
        ids = tokenizer(rec["text"], add_special_tokens=True)["input_ids"]
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        ex = Example(ids, list(ids))
    # The first token is never predicted (nothing precedes it): keep it out of the loss
    # so that a packed sequence never predicts one example from the previous one.
    if ex.labels:
        ex.labels[0] = IGNORE_INDEX
    return ex


def fit_length(ex: Example, max_length: int) -> Example:
    """truncate_left: keep the last max_length tokens (the prompt's oldest tokens go, the
    completion stays); decision positions of the choices objective move with them."""
    cut = len(ex.input_ids) - max_length
    if cut <= 0:
        return ex
    out = Example(ex.input_ids[cut:], ex.labels[cut:])
    out.labels[0] = IGNORE_INDEX
    if ex.choices is not None:
        out.choices = [[pos - cut] + ids for pos, *ids in ex.choices if pos - cut >= 1]
        if not out.choices:
            return None  # the answer itself would be cut: nothing left to score
    return out


def limit_lengths(exs: list[tuple[str, Example]], max_length: int, mode: str, path) -> tuple[list[Example], int]:
    """Apply data.too_long to records longer than max_length; returns (examples, dropped)."""
    long = [w for w, e in exs if len(e.input_ids) > max_length]
    if long and mode == "error":
        raise DataError(
            f"{long[0]}: {len(long)} of {len(exs)} records in {path} are longer than "
            f"data.max_length={max_length} tokens (first here); raise data.max_length, or set "
            "data.too_long=skip (drop them, counted in the log) or data.too_long=truncate_left "
            "(drop the prompt's oldest tokens)"
        )
    out, dropped = [], 0
    for _, e in exs:
        if len(e.input_ids) > max_length:
            e = fit_length(e, max_length) if mode == "truncate_left" else None
        if e is None:
            dropped += 1
        else:
            out.append(e)
    return out, dropped


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Greedily concatenate examples (in order) into sequences of at most max_length.

    position_ids restart at 0 for each example: with no 2D attention mask, transformers
    derives a block-diagonal causal mask from them, so examples never attend to each other.
    """
    with_choices = bool(examples) and examples[0].choices is not None
    packed, cur = [], Example([], [], [], [] if with_choices else None)
    for ex in examples:
        if cur.input_ids and len(cur.input_ids) + len(ex.input_ids) > max_length:
            packed.append(cur)
            cur = Example([], [], [], [] if with_choices else None)
        if with_choices:
            cur.choices += [[pos + len(cur.input_ids)] + ids for pos, *ids in ex.choices]
        cur.input_ids += ex.input_ids
        cur.labels += ex.labels
        cur.position_ids += list(range(len(ex.input_ids)))
    if cur.input_ids:
        packed.append(cur)
    return packed


# ------------------------------------------------------------------ cache
def cache_key(
    path, tokenizer_dir, fmt, max_length, packing, chat_template, add_eos=True, choice_loss=False, too_long="error"
) -> str:
    h = hashlib.sha256()
    hash_file(h, Path(path))
    for name in _TOKENIZER_FILES:
        p = Path(tokenizer_dir) / name
        if p.is_file():
            h.update(name.encode())
            hash_file(h, p)
    h.update(
        json.dumps(
            [_CACHE_VERSION, fmt, max_length, bool(packing), bool(chat_template), bool(add_eos)]
            + ([True] if choice_loss else [])
            + ([too_long] if too_long != "error" else [])
        ).encode()
    )
    return h.hexdigest()[:24]


class TokenizedSet:
    """Tokenised examples backed by a memory-mapped Arrow dataset."""

    def __init__(self, ds):
        self.ds = ds
        self.packed = "position_ids" in ds.column_names

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Example:
        row = self.ds[int(i)]
        return Example(row["input_ids"], row["labels"], row.get("position_ids"), row.get("choices"))

    def num_tokens(self) -> int:
        return sum(len(x) for x in self.ds["input_ids"])

    def has_labels(self) -> bool:
        """Some example has a token to learn (a label, or a choices decision)."""
        if "choices" in self.ds.column_names:
            return any(len(c) for c in self.ds["choices"])
        return any(any(x != IGNORE_INDEX for x in labels) for labels in self.ds["labels"])


def tokenized(
    path,
    tokenizer,
    tokenizer_dir,
    *,
    fmt="auto",
    max_length=512,
    packing=False,
    chat_template=False,
    add_eos=True,
    cache_dir=".cache/tokenized",
    choice_loss=False,
    too_long="error",
) -> TokenizedSet:
    """Tokenise `path` once (cached, shared by every rank on the file system) and load it.

    A cache entry that no longer loads (a truncated or deleted file) is rebuilt.
    """
    import datasets

    datasets.disable_progress_bars()
    key = cache_key(path, tokenizer_dir, fmt, max_length, packing, chat_template, add_eos, choice_loss, too_long)
    final = Path(cache_dir) / f"{Path(path).stem}-{key}"
    for attempt in (0, 1):
        if not (final / ".complete").exists():
            with file_lock(Path(cache_dir) / f".{final.name}.lock"):
                if not (final / ".complete").exists():
                    _build_cache(
                        final, path, tokenizer, fmt, max_length, packing, chat_template, add_eos, choice_loss, too_long
                    )
        try:
            return TokenizedSet(datasets.load_from_disk(str(final / "data")))
        except Exception as exc:  # pyarrow/datasets raise many types for a damaged file
            if attempt:
                raise DataError(f"{final}: the tokenised cache cannot be read even after a rebuild ({exc})") from None
            log.warning("tokenised cache %s is damaged (%s); rebuilding it", final, exc)
            with file_lock(Path(cache_dir) / f".{final.name}.lock"):
                (final / ".complete").unlink(missing_ok=True)


def _settings(d) -> dict:
    """tokenized()'s keyword arguments from a run's `data:` section, packing aside."""
    return dict(
        fmt=d.format,
        max_length=d.max_length,
        chat_template=d.chat_template,
        add_eos=d.add_eos,
        cache_dir=d.cache_dir,
        too_long=d.too_long,
    )


def tokenized_train(d, tokenizer, tokenizer_dir, choice_loss: bool = False) -> TokenizedSet:
    """The training set a run's `data:` section describes (`d`), tokenised (cached)."""
    return tokenized(d.train, tokenizer, tokenizer_dir, packing=d.packing, choice_loss=choice_loss, **_settings(d))


def tokenized_sets(d, tokenizer, tokenizer_dir, choice_loss: bool = False) -> tuple[TokenizedSet, TokenizedSet]:
    """The training and evaluation sets a run's `data:` section describes (`d`), tokenised
    (cached): what the trainer trains and evaluates on. A record longer than max_length
    stops here unless d.too_long says otherwise."""
    for path in (d.train, d.eval):  # chat data needs a chat template: said before any tokenising
        check_template(path, d.format, d.chat_template, tokenizer)
    train = tokenized_train(d, tokenizer, tokenizer_dir, choice_loss)
    return train, tokenized(d.eval, tokenizer, tokenizer_dir, packing=False, **_settings(d))


def _build_cache(
    final: Path, path, tokenizer, fmt, max_length, packing, chat_template, add_eos, choice_loss, too_long
) -> None:
    import datasets

    records, resolved = load(path, fmt)
    exs = [
        (where, tokenize_record(r, resolved, tokenizer, max_length, chat_template, where, add_eos, choice_loss))
        for where, r in records
    ]
    exs, dropped = limit_lengths(exs, max_length, too_long, path)
    if dropped:
        log.warning(
            "%s: %d of %d records are longer than data.max_length=%d and were %s",
            path,
            dropped,
            len(records),
            max_length,
            "skipped" if too_long == "skip" else "dropped (answer cut)",
        )
    if not exs:
        raise DataError(f"{path}: no record is left within data.max_length={max_length} tokens")
    if packing:
        exs = pack(exs, max_length)
    cols = {"input_ids": [e.input_ids for e in exs], "labels": [e.labels for e in exs]}
    if packing:
        cols["position_ids"] = [e.position_ids for e in exs]
    if choice_loss:
        cols["choices"] = [e.choices for e in exs]
    with atomic_dir(final) as tmp:
        datasets.Dataset.from_dict(cols).save_to_disk(str(tmp / "data"))
        (tmp / "meta.json").write_text(
            json.dumps(
                {
                    "source": str(Path(path).resolve()),
                    "format": resolved,
                    "max_length": max_length,
                    "packing": packing,
                    "chat_template": chat_template,
                    "add_eos": add_eos,
                    "too_long": too_long,
                    "records": len(records),
                    "dropped": dropped,
                    "examples": len(exs),
                }
            )
        )
        (tmp / ".complete").write_text("ok\n")


# ------------------------------------------------------------------ batching
def left_padded(seqs: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Token sequences padded on the left (the last tokens line up, as scoring and
    generation need), with their attention mask and position ids."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s) :] = torch.tensor(s)
        mask[i, n - len(s) :] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked and carries no loss.

    Packed examples get position_ids and no attention mask (the block-diagonal mask is
    derived from position_ids); their padding is a separate block that nothing attends to.
    """
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    packed = examples[0].position_ids is not None
    extra = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        if packed:
            extra[i, :k] = torch.tensor(e.position_ids)
            extra[i, k:] = torch.arange(n - k)
        else:
            extra[i, :k] = 1
    out = {"input_ids": ids, "labels": labels}
    out["position_ids" if packed else "attention_mask"] = extra
    if examples[0].choices is not None:
        out.update(choice_tensors(examples))
    return out


def choice_tensors(examples: list[Example]) -> dict[str, torch.Tensor]:
    """choice_index (N, 2) = (row, position of the answer token); choice_ids (N, K): the
    candidate tokens there, padded with -1."""
    rows = [(i, d[0], d[1:]) for i, e in enumerate(examples) for d in e.choices]
    k = max((len(c) for _, _, c in rows), default=1)
    index = torch.tensor([[i, p] for i, p, _ in rows], dtype=torch.long).reshape(-1, 2)
    cand = torch.full((len(rows), k), -1, dtype=torch.long)
    for j, (_, _, c) in enumerate(rows):
        cand[j, : len(c)] = torch.tensor(c)
    return {"choice_index": index, "choice_ids": cand}


def count_tokens(examples: list[Example]) -> int:
    """Real (non-padding) tokens of a micro-batch, packed or not."""
    return sum(len(e.input_ids) for e in examples)


class GlobalBatchOrder:
    """Which examples form micro-batch (step, accum_index) on a rank. Stateless."""

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


def shard_evenly(n_items: int, batch: int, world: int, rank: int):
    """Index lists for this rank; every rank gets the same number of batches (ZeRO-3 needs
    all ranks in every forward), ranks past the end get an empty list (weight 0)."""
    per_round = batch * world
    for r in range(-(-n_items // per_round)):
        start = r * per_round + rank * batch
        yield list(range(start, min(start + batch, n_items)))
