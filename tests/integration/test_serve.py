"""A real server in the loop: `transformers serve` on a merged export, asked through the
`openai` client, answers what the trained model (base + adapter, in this process) answers."""

import json

import pytest
import torch

from gpart_ds import serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def moved(tmp_path_factory, deepspeed_tiny_run, tiny_assets):
    """The tiny run's adapter with theta moved far enough that the model's answers change
    (the 12-step run's answers are mostly empty), and its offline merged export."""
    from gpart_ds.export import cli as export_cli
    from gpart_ds.methods.gpart.adapter import load_adapter, save_adapter

    out, _ = deepspeed_tiny_run
    root = tmp_path_factory.mktemp("serve")
    theta, cfg = load_adapter(out / "adapter")
    torch.manual_seed(0)
    save_adapter(root / "adapter", theta + 0.5 * torch.randn_like(theta), cfg)
    assert (
        export_cli.main(
            ["--base", str(tiny_assets / "model"), "--adapter", str(root / "adapter"), "--out", str(root / "merged")]
        )
        == 0
    )
    return root


def test_served_answers_equal_the_trained_models_record_for_record(moved, tiny_assets, tmp_path, capsys):
    data = tiny_assets / "data" / "eval.jsonl"
    args = [
        "check",
        "--merged",
        str(moved / "merged"),
        "--data",
        str(data),
        "--max-examples",
        "12",
        "--base",
        str(tiny_assets / "model"),
        "--adapter",
        str(moved / "adapter"),
        "--json",
        str(tmp_path / "r.json"),
        "--predictions",
        str(tmp_path / "p.jsonl"),
    ]
    assert serve.main(args) == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "r.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert res["records"] == 12 == res["same_answers"] == len(rows)
    assert all(r["served"] == r["in_process"] for r in rows)
    assert sum(len(r["served"]) > 0 for r in rows) >= 6  # it said something
    base = [json.loads(line) for line in _base_answers(tiny_assets, data, tmp_path)]
    assert sum(r["served"] != b["generated"] for r, b in zip(rows, base)) >= 6  # and not the base's words
    assert res["served_accuracy"] == sum(r["answer_correct"] for r in rows) / 12


def _base_answers(tiny_assets, data, tmp_path):
    from gpart_ds import evaluate

    preds = []
    evaluate.evaluate_files(str(tiny_assets / "model"), str(data), max_length=64, max_examples=12, predictions=preds)
    return [json.dumps(p) for p in preds]


def test_a_served_model_that_is_not_the_trained_one_is_reported(moved, tiny_assets, capsys):
    # The base model behind the server, compared with base + adapter: every answer is named.
    rc = serve.main(
        [
            "check",
            "--merged",
            str(tiny_assets / "model"),
            "--data",
            str(tiny_assets / "data" / "eval.jsonl"),
            "--max-examples",
            "6",
            "--base",
            str(tiny_assets / "model"),
            "--adapter",
            str(moved / "adapter"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "DIFFER:" in err and "of 6 served answers are not the in-process ones" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--merged", "/nonexistent"], "--merged /nonexistent: no Hugging Face model there"),
        (["--base", "B"], "--base and --adapter go together"),
        (["--max-examples", "-1"], "--max-examples: must be >= 0, got -1"),
        (["--port", "70000"], "--port: must be in [0, 65535] (0: a free one), got 70000"),
        (["--url", "localhost:8000"], "--url 'localhost:8000': not an http(s) address"),
        (["--url", "http://127.0.0.1:1/v1"], "--url http://127.0.0.1:1/v1: no server answers"),
    ],
)
def test_bad_input_is_refused_before_any_server_starts(args, message, tiny_assets, capsys):
    base = ["check", "--merged", str(tiny_assets / "model"), "--data", str(tiny_assets / "data" / "eval.jsonl")]
    merged = dict(zip(base[1::2], base[2::2]))
    merged.update(dict(zip(args[::2], args[1::2])))
    argv = ["check"] + [x for kv in merged.items() for x in kv]
    assert serve.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def not_an_api(tmp_path):
    """An HTTP server that is not an OpenAI-compatible one (404 for /v1/models)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        yield httpd.server_address[1]
        httpd.shutdown()


def test_a_busy_port_or_an_address_that_is_not_the_api_is_refused_before_decoding(not_an_api, tiny_assets, capsys):
    # --port where something already listens: that server, not the one started, would answer
    # the check; --url at a server without the API: minutes of decoding, then a traceback
    common = ["check", "--merged", str(tiny_assets / "model"), "--data", str(tiny_assets / "data" / "eval.jsonl")]
    assert serve.main([*common, "--port", str(not_an_api)]) == 2
    assert f"--port {not_an_api}: in use on 127.0.0.1" in capsys.readouterr().err
    assert serve.main([*common, "--url", f"http://127.0.0.1:{not_an_api}"]) == 2
    assert "GET /models answered 404; the API's base is usually HOST:PORT/v1" in capsys.readouterr().err


def test_a_server_already_running_is_asked_at_its_address(moved, tiny_assets, capsys):
    # what a vLLM or TGI deployment is checked with: --url, no server started by the check
    with serve.Server(moved / "merged") as running:
        rc = serve.main(
            [
                "check",
                "--url",
                running.url,
                "--merged",
                str(moved / "merged"),
                "--data",
                str(tiny_assets / "data" / "eval.jsonl"),
                "--max-examples",
                "4",
                "--base",
                str(tiny_assets / "model"),
                "--adapter",
                str(moved / "adapter"),
            ]
        )
        assert running.proc.poll() is None  # still the one running
    assert rc == 0, capsys.readouterr().err


def test_help_without_the_subcommand_exits_0_and_no_subcommand_exits_2(capsys):
    assert serve.main(["--help"]) == 0 and "serve check --help" in capsys.readouterr().out
    assert serve.main([]) == 2 and "usage: python -m gpart_ds.serve check" in capsys.readouterr().err
