"""bench.theta_grad on the tiny model: the generic measurements agree with what they mean."""

import json

import pytest

from experiments.bench import theta_grad


def test_theta_grad_measures_each_entry_through_the_methods_own_merge(tiny_assets, tmp_path, capsys):
    out = tmp_path / "tg.json"
    res = theta_grad.main(
        [
            "--config",
            "configs/tiny.yaml",
            "--methods",
            "name=lora,r=4",
            "name=gpart,d=4096",
            "--batches",
            "2",
            "--line-mults",
            "1",
            "10",
            "--json",
            str(out),
        ]
    )
    lora, gpart = res["methods"]
    assert (lora["label"], gpart["label"]) == ("LoRA r=4", "GPart d=4,096") and gpart["trainable_params"] == 4096
    # A weight of group j moves by lr * s_j * u_j and sum_j n_j s_j^2 = d: measured through
    # the merged weights (GPart.merge_source) it must be ||u||_2 / sqrt(D).
    assert gpart["weight_rms_move_per_lr"] == pytest.approx(gpart["update1_l2"] / gpart["D"] ** 0.5, rel=1e-3)
    assert gpart["D"] == 86_016 and lora["weight_rms_move_per_lr"] > 0
    for r in (lora, gpart):
        assert [x["lr"] for x in r["line_search"]] == pytest.approx([r["auto_lr"], 10 * r["auto_lr"]])
        assert r["grad_per_batch"][0]["l2"] > 0 and 0 <= r["grad_per_batch"][0]["share_below_eps"] <= 1
    # the lr at which GPart's first step decreases the loss as much as LoRA's at its auto lr
    assert gpart["lr_matching_reference_loss_decrease"] == pytest.approx(
        lora["auto_lr"] * lora["loss_decrease_per_lr"] / gpart["loss_decrease_per_lr"]
    )
    assert json.loads(out.read_text())["reference"]["method"] == "LoRA r=4"
    assert "GPart d=4,096" in capsys.readouterr().out


def test_theta_grad_refuses_a_bad_entry_with_exit_2(capsys):
    assert theta_grad.cli(["--config", "configs/tiny.yaml", "--methods", "gpart,d=8"]) == 2
    assert "error: --methods 'gpart,d=8'" in capsys.readouterr().err
    assert theta_grad.cli(["--config", "configs/tiny.yaml", "--methods", "name=gpart,d=0"]) == 2
    assert "method.d" in capsys.readouterr().err
