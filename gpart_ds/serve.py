"""The exported model behind a real server: what it answers, and whether that is what the
trained model answers.

    python -m gpart_ds.serve check --merged MERGED --data eval.jsonl [--base BASE --adapter A]
                                   [--max-examples N] [--port P | --url URL] [--json OUT] [--predictions OUT]

Starts `transformers serve MERGED` (transformers' OpenAI-compatible server, the `serve`
extra) on 127.0.0.1, waits for it, sends every held-out prompt through the `openai`
client at temperature 0 (/v1/completions for prompt/completion records, the chat endpoint
for chat records), judges each answer as the evaluator does (generation.judge), and stops
the server. --url asks a server already running (vLLM, TGI) on the same folder instead. With
--base and --adapter it also decodes the same prompts in this process with the adapter applied
to the base (the trained model) and compares the answers record for record; without them,
with the merged folder itself. Exit 0 when every served answer
equals the in-process one, 1 when any differs (listed), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .distributed import free_port
from .errors import UserError, run_cli
from .fileio import folder_problem, overlap, write_atomic


class ServeError(UserError):
    pass


class Server:
    """`transformers serve FOLDER` on 127.0.0.1:port, started and stopped with the context."""

    def __init__(self, folder: str, port: int | None = None, log: Path | None = None, timeout: float = 300):
        self.folder, self.port = str(folder), port or free_port()
        self.log, self.timeout = log, timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Server:
        exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
        if exe is None:
            raise ServeError(
                "no `transformers` command in this environment: install the serve extra (bash launch/setup_env.sh does)"
            )
        out = open(self.log, "w") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [
                exe,
                "serve",
                self.folder,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--device",
                "cpu",
                "--dtype",
                "auto",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
        )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServeError(
                    f"transformers serve {self.folder} exited with {self.proc.returncode} before it "
                    f"answered{f' (log: {self.log})' if self.log else ''}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise ServeError(f"transformers serve {self.folder} did not answer /health within {self.timeout:.0f} s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def check_url(url: str) -> None:
    """A server to ask (--url): an http(s) address that answers the OpenAI API's model list."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ServeError(f"--url {url!r}: not an http(s) address (e.g. http://HOST:8000/v1)")
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/models", timeout=10) as r:
            r.read()
    except urllib.error.HTTPError as exc:  # it answers, with an error: the path is not the API's
        raise ServeError(
            f"--url {url}: GET /models answered {exc.code}; the API's base is usually HOST:PORT/v1"
        ) from None
    except (OSError, ValueError) as exc:
        raise ServeError(f"--url {url}: no server answers ({getattr(exc, 'reason', exc)})") from None


def port_is_free(port: int) -> None:
    """--port: a server already there would answer the check in place of the one it starts."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ServeError(
                f"--port {port}: in use on 127.0.0.1 (a server already there? ask it with --url "
                f"http://127.0.0.1:{port}/v1, or leave --port out for a free one)"
            ) from None


def ask(
    url: str, model: str, records: list[tuple[str, dict]], questions, max_tokens: int, chat_template: bool
) -> list[str]:
    """The server's answer to each question's record, at temperature 0."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", timeout=600, max_retries=0)
    out: list[str] = []
    try:
        for q in questions:
            rec = records[q.index][1]
            if "messages" in rec or chat_template:
                msgs = rec["messages"][:-1] if "messages" in rec else [{"role": "user", "content": rec["prompt"]}]
                r = client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens, temperature=0)
                out.append(r.choices[0].message.content or "")
            else:
                r = client.completions.create(model=model, prompt=rec["prompt"], max_tokens=max_tokens, temperature=0)
                out.append(r.choices[0].text)
    except openai.APIStatusError as exc:  # the server answered with an error (e.g. an unknown model name)
        raise ServeError(
            f"{url}: record {len(out)} asked, the server answered {exc.status_code}: {exc.message}"
        ) from None
    except openai.APIConnectionError as exc:
        raise ServeError(
            f"{url}: the server stopped answering after {len(out)} records ({exc.__cause__ or exc})"
        ) from None
    return out


def check(
    merged: str,
    data_path: str,
    base: str | None = None,
    adapter: str | None = None,
    max_examples: int = 0,
    chat_template: bool = False,
    port: int | None = None,
    batch_size: int = 64,
    log: Path | None = None,
    url: str | None = None,
    model_name: str | None = None,
) -> dict:
    """Served answers of the merged folder against in-process answers (see the module doc)."""
    import torch
    from transformers import AutoTokenizer

    from . import data, generation
    from .evaluate import _load_model

    records, _ = data.load(data_path)
    if max_examples:
        records = records[:max_examples]
    tok = AutoTokenizer.from_pretrained(merged)
    qs = generation.questions(records, tok, chat_template)
    if not qs:
        raise ServeError(f"{data_path}: no record has an answer to ask for (prompt/completion or chat records)")
    new = generation.max_new_tokens(qs, tok)
    root = _load_model(base or merged, adapter, torch.float32, "--base" if base else "--merged")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = generation.stop_ids(root.lm, tok)
    order = sorted(range(len(qs)), key=lambda i: len(qs[i].prompt))
    answers: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = [qs[i] for i in order[start : start + batch_size]]
        for q, ids in zip(chunk, generation.greedy(root.generate, [q.prompt for q in chunk], pad, eos, new, "cpu")):
            answers[q.index] = generation.answer_text(tok, ids)
    local = [answers[q.index] for q in qs]
    del root
    t0 = time.perf_counter()
    if url:  # a server already running (vLLM, TGI, ...) on the same folder
        served = ask(url, model_name or merged, records, qs, new, chat_template)
    else:
        with Server(merged, port, log) as server:
            served = ask(server.url, merged, records, qs, new, chat_template)
    seconds = time.perf_counter() - t0
    rows = []
    for q, s, mine in zip(qs, served, local):
        said, ok = generation.judge(s, q)
        rows.append(
            {
                "record": q.where,
                "index": q.index,
                "served": s,
                "said": said,
                "answer_correct": ok,
                "in_process": mine,
                "same": s == mine,
            }
        )
    n = len(rows)
    return {
        "merged": merged,
        "base": base,
        "adapter": adapter,
        "data": data_path,
        "records": n,
        "served_accuracy": sum(r["answer_correct"] for r in rows) / n,
        "in_process_accuracy": sum(generation.judge(r["in_process"], q)[1] for r, q in zip(rows, qs)) / n,
        "same_answers": sum(r["same"] for r in rows),
        "serve_seconds": seconds,
        "differ": [r for r in rows if not r["same"]][:10],
        "rows": rows,
    }


def _check_cli(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m gpart_ds.serve check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--merged", required=True, help="the merged Hugging Face folder to serve")
    ap.add_argument("--data", required=True, help="held-out records (prompt/completion or chat)")
    ap.add_argument("--base", default=None, help="the base model the adapter was trained on")
    ap.add_argument("--adapter", default=None, help="the trained adapter (with --base)")
    ap.add_argument("--max-examples", type=int, default=0)
    ap.add_argument("--chat-template", action="store_true", help="prompts as a user turn (the chat endpoint)")
    ap.add_argument("--port", type=int, default=0, help="default: a free port")
    ap.add_argument(
        "--url",
        default=None,
        help="ask a server already running instead (e.g. vLLM: http://HOST:8000/v1); "
        "--merged is then the folder it serves, read for its tokenizer",
    )
    ap.add_argument("--model-name", default=None, help="with --url: the model name it serves (default --merged)")
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--predictions", default=None, help="one JSON line per record: served and in-process answers")
    ap.add_argument("--brief", action="store_true", help="one line instead of the JSON result")
    ap.add_argument(
        "--max-differ",
        type=int,
        default=0,
        help="answers that may differ before the exit status says so (default 0). The server "
        "decodes each prompt alone, this process in left-padded batches: at a near-tie "
        "between two tokens the last bits of fp32 can pick the other one",
    )
    args = ap.parse_args(argv)
    if (args.base is None) != (args.adapter is None):
        raise ServeError("--base and --adapter go together (the trained model to compare the served one with)")
    for flag, path in (("--merged", args.merged), ("--base", args.base)):
        if path is not None and not (Path(path) / "config.json").is_file():
            raise ServeError(f"{flag} {path}: no Hugging Face model there (no config.json)")
    if not Path(args.data).is_file():
        raise ServeError(f"--data {args.data}: no such file")
    for flag, value in (("--max-examples", args.max_examples), ("--max-differ", args.max_differ)):
        if value < 0:
            raise ServeError(f"{flag}: must be >= 0, got {value}")
    if not 0 <= args.port < 65536:
        raise ServeError(f"--port: must be in [0, 65535] (0: a free one), got {args.port}")
    if args.url:
        check_url(args.url)  # before minutes of in-process decoding
    elif args.port:
        port_is_free(args.port)
    landing = overlap(
        {"--json": args.json, "--predictions": args.predictions},
        {"--merged": args.merged, "--base": args.base, "--adapter": args.adapter, "--data": args.data},
    )
    if landing or (args.json and args.json == args.predictions):
        raise ServeError(landing or f"--json and --predictions are the same file {args.json!r}")
    for flag, out in (("--json", args.json), ("--predictions", args.predictions)):
        if out:
            parent = Path(out).parent
            problem = folder_problem(parent) or (not parent.is_dir() and f"its folder {str(parent)!r} does not exist")
            if problem:
                raise ServeError(f"{flag} {out}: {problem}")
    res = check(
        args.merged,
        args.data,
        args.base,
        args.adapter,
        args.max_examples,
        args.chat_template,
        args.port or None,
        url=args.url,
        model_name=args.model_name,
    )
    rows = res.pop("rows")
    if args.brief:
        against = f"base + adapter ({args.adapter})" if args.adapter else "the merged folder in process"
        print(
            f"served by transformers serve ({args.merged}): generated answer right on "
            f"{100 * res['served_accuracy']:.1f}% of {res['records']} held-out records; "
            f"{res['same_answers']}/{res['records']} answers equal to {against}; "
            f"{res['serve_seconds']:.0f} s to start the server and ask"
        )
    else:
        print(json.dumps(res, indent=2))
    if args.json:
        write_atomic(args.json, json.dumps(res, indent=2))
    if args.predictions:
        write_atomic(args.predictions, "".join(json.dumps(r) + "\n" for r in rows))
    differ = res["records"] - res["same_answers"]
    if differ > args.max_differ:
        print(f"DIFFER: {differ} of {res['records']} served answers are not the in-process ones", file=sys.stderr)
        return 1
    if differ:
        print(
            f"OK within --max-differ {args.max_differ}: {differ} of {res['records']} served answers are not the "
            f"in-process ones (near-ties); served accuracy {100 * res['served_accuracy']:.1f}%",
            file=sys.stderr,
        )
        return 0
    print(
        f"OK: all {res['records']} served answers equal the in-process ones; served accuracy "
        f"{100 * res['served_accuracy']:.1f}%",
        file=sys.stderr,
    )
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "check":
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(
            "usage: python -m gpart_ds.serve check --merged MERGED --data DATA [--base B --adapter A] ...\n"
            "(python -m gpart_ds.serve check --help for every option)",
            file=sys.stdout if asked else sys.stderr,
        )
        return 0 if asked else 2
    return run_cli(lambda: _check_cli(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
