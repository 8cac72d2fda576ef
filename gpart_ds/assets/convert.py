"""GGUF -> ordinary Hugging Face folder, verified by comparing logits.

transformers dequantises a GGUF file into a model that refuses `save_pretrained`
("quantized with gguf"). Rebuilding the same architecture from its config without the
quantization entry, loading the state dict and tying weights gives a plain folder whose
logits equal the GGUF load's.
"""

from __future__ import annotations

from pathlib import Path

import torch

VERIFY_PROMPT = "The capital of France is"


def load_gguf(folder: str | Path, gguf_file: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    return model.eval(), tok


def convert(folder: str | Path, gguf_file: str, out: str | Path) -> dict:
    """Write the plain HF folder to `out`; returns the verification record."""
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf_model, tok = load_gguf(folder, gguf_file)
    cfg_dict = gguf_model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    model_type = cfg_dict.pop("model_type")
    plain_cfg = AutoConfig.for_model(
        model_type, **{k: v for k, v in cfg_dict.items() if k not in ("architectures", "transformers_version")}
    )
    plain = AutoModelForCausalLM.from_config(plain_cfg).to(torch.float32)
    result = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    if result.unexpected_keys or [k for k in result.missing_keys if "lm_head" not in k]:
        raise RuntimeError(f"GGUF state dict does not fit {model_type}: {result}")
    plain.tie_weights()
    out = Path(out)
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    return verify(out, gguf_model, tok)


@torch.no_grad()
def verify(out: str | Path, reference_model, tok, prompt: str = VERIFY_PROMPT) -> dict:
    """Max |logit difference| between the saved folder and the reference on a prompt."""
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    diff = (saved(ids).logits - reference_model(ids).logits).abs().max().item()
    if diff != 0.0:
        raise RuntimeError(f"converted model differs from the GGUF load: max |logit diff| {diff}")
    return {"prompt": prompt, "max_abs_logit_diff": diff, "tokens": ids.shape[1]}
