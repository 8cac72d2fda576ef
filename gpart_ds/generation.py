"""Generated answers: what a served model says, and how an answer is judged.

A server (transformers serve, vLLM, TGI) answers by greedy or sampled decoding, never by
ranking label words. This module decodes the held-out prompts greedily, in batches
(left padding, KV cache, stopping at the model's end-of-sequence tokens), exactly as a
server at temperature 0 would, and judges each answer by the kind of its record:

    choice   the record has "choices": the choice named first in the answer (as a whole
             word, case and spacing ignored; of two named at the same place, the longer)
             must be the gold one
    number   the reference is a number: the first number in the answer must equal it
    text     otherwise: the answer equals the reference, or one of the record's "answers"
             (other accepted answers, e.g. every annotator's span), after SQuAD's
             normalisation (case, punctuation, the articles a/an/the, spacing)

Prompts are rendered as training renders them (data.prompt_ids; chat records through the
tokenizer's chat template with the generation prompt), so the answer is the one a
server sends for the same prompt (/v1/completions for prompt/completion records, the
chat endpoint for chat records).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from . import data

KINDS = ("choice", "number", "text")
# The answer may run past the reference (the model says "positive review"): a few tokens
# beyond the longest reference let the judge see it, and bound the cost.
EXTRA_TOKENS = 8
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_PUNCT = re.compile(r"[^\w\s]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass
class Question:
    where: str  # file:line of the record
    index: int  # its position in the file
    prompt: list[int]  # token ids, as training renders the prompt
    reference: str
    choices: list[str] | None
    kind: str
    answers: tuple[str, ...] = ()  # accepted besides the reference (text records)


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def normalise_text(text: str) -> str:
    """SQuAD's answer normalisation: a free-form answer is right whatever its case,
    punctuation, articles and spacing ("The Eiffel Tower." == "eiffel tower")."""
    return " ".join(_ARTICLES.sub(" ", _PUNCT.sub(" ", text.lower())).split())


def _number(text: str):
    try:
        return float(text.strip().replace(",", ""))
    except ValueError:
        return None


def kind_of(reference: str, choices, answers=()) -> str:
    if choices:
        return "choice"
    if answers:  # several accepted spans ("July 1899", "1899"): judged as text against each
        return "text"
    return "number" if _number(reference) is not None else "text"


def _answers(rec: dict, where: str) -> tuple[str, ...]:
    alts = rec.get("answers")
    if alts is None:
        return ()
    if not (isinstance(alts, list) and alts and all(isinstance(a, str) for a in alts)):
        raise data.DataError(f"{where}: 'answers' must be a non-empty list of strings (the accepted answers)")
    return tuple(alts)


def questions(records: list[tuple[str, dict]], tokenizer, chat_template: bool) -> list[Question]:
    """Every record that has an answer: prompt/completion records and chat records whose
    last turn is the assistant's (plain text records have none and are skipped)."""
    out = []
    for i, (where, rec) in enumerate(records):
        if "messages" in rec:
            msgs = rec["messages"]
            if not msgs or msgs[-1].get("role") != "assistant":
                continue
            prompt = list(
                tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
            )
            ref, choices = msgs[-1]["content"], None
        elif "prompt" in rec and "completion" in rec:
            prompt = data.prompt_ids(tokenizer, rec["prompt"], chat_template)
            ref, choices = rec["completion"], rec.get("choices")
        else:
            continue
        alts = _answers(rec, where)
        out.append(Question(where, i, prompt, ref, choices, kind_of(ref, choices, alts), alts))
    return out


def judge(answer: str, q: Question) -> tuple[object, bool]:
    """(what the answer said, in the record's terms; whether that is right)."""
    if q.kind == "choice":
        said = normalise(answer)
        first, where = None, (len(said) + 1, 0)
        for i, c in enumerate(q.choices):
            m = re.search(r"(?<!\w)" + re.escape(normalise(c)) + r"(?!\w)", said)
            # the earliest choice named; where two start there ("heat", "heat energy"), the
            # longer one is what was said, whatever the order the choices are listed in
            if m and (m.start(), -len(m.group())) < where:
                first, where = i, (m.start(), -len(m.group()))
        gold = q.choices.index(q.reference) if q.reference in q.choices else None
        return first, first is not None and first == gold
    if q.kind == "number":
        m = _NUMBER.search(answer.replace(",", ""))
        got = float(m.group()) if m else None
        return (m.group() if m else None), got is not None and got == _number(q.reference)
    said = normalise_text(answer)
    return said, any(said == normalise_text(a) for a in (q.reference, *q.answers))


def max_new_tokens(qs: list[Question], tokenizer) -> int:
    longest = max(
        (len(tokenizer(a, add_special_tokens=False)["input_ids"]) for q in qs for a in (q.reference, *q.answers)),
        default=1,
    )
    return longest + 1 + EXTRA_TOKENS


def stop_ids(model, tokenizer) -> list[int]:
    """The end-of-sequence ids a server stops at: the generation config's and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def greedy(
    generate, prompts: list[list[int]], pad_id: int, eos: list[int], new_tokens: int, device, synced: bool = False
) -> list[list[int]]:
    """The greedy continuation of each prompt (left-padded batch, KV cache), cut after the
    first end-of-sequence token. `generate` is a model's generate; `synced` keeps every
    rank stepping until all are done (ZeRO-3 gathers weights collectively)."""
    batch = data.left_padded(prompts, pad_id, device)  # generate derives positions from the mask
    n = batch["input_ids"].shape[1]
    out = generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=pad_id,
        synced_gpus=synced,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    res = []
    for row in out[:, n:].tolist():
        cut = next((j for j, t in enumerate(row) if t in eos), None)
        res.append(row if cut is None else row[:cut])
    return res


def answer_text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def verdict(q: Question, answer: str) -> dict:
    said, ok = judge(answer, q)
    return {"generated": answer, "kind": q.kind, "said": said, "answer_correct": ok}
