"""The training objectives: causal-LM loss at label positions only, and rank classification.

Prompt/completion and chat data put labels on a few tokens per example (one for a
classification answer), yet a plain `model(labels=...)` projects every position onto
the whole vocabulary: on SmolLM2 (49k vocabulary, 576 hidden) that head is ~15% of a
training step's FLOPs, nearly all of it wasted. Here the decoder runs as usual and the
head sees only the rows whose next token carries a label. The loss is the same mean
over label tokens as transformers' `ForCausalLMLoss` (fp32 cross-entropy, -100 ignored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

IGNORE_INDEX = -100


@dataclass
class LabelLossOutput(CausalLMOutputWithPast):
    """The loss, and with exact_match=True per-row flags: every label token is the argmax.

    Teacher-forced argmax agreement over a row's label tokens is the same event as greedy
    decoding reproducing the whole completion (each greedy step then sees the gold
    prefix), so it is exact match without running generate.
    """

    matches: torch.Tensor | None = None  # (rows with a label,) bool


def supports_label_positions(model) -> bool:
    """True when logits = lm_head(decoder(x)) with nothing in between.

    Models that post-process logits (Gemma-2's soft-capping, scaled heads) keep the
    full forward, which is always correct.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    try:
        return model.get_decoder() is not None and model.get_output_embeddings() is not None
    except (AttributeError, NotImplementedError):
        return False


def label_positions_loss(
    model,
    labels: torch.Tensor,
    choice_index=None,
    choice_ids=None,
    exact_match: bool = False,
    lm_weight: float = 0.0,
    **inputs,
) -> CausalLMOutputWithPast:
    """Mean next-token cross-entropy over label positions; `logits` is not returned.

    With choice_index / choice_ids (data.choice_tensors: the "choices" objective) the
    loss is instead the cross-entropy among the candidate tokens at each decision
    position (rank classification): it trains exactly what choice accuracy measures.
    lm_weight > 0 ("choices_lm") adds that much of the next-token loss over the whole
    vocabulary: the choice term decides between the label words, the other makes the
    model say one of them (what a server's greedy answer needs).
    """
    inputs.setdefault("use_cache", False)
    hidden = model.get_decoder()(**inputs).last_hidden_state
    if choice_index is not None:
        out = _choice_loss(model, hidden, labels, choice_index, choice_ids)
        if lm_weight:
            out.loss = out.loss + lm_weight * _label_loss(model, hidden, labels, False).loss
        return out
    return _label_loss(model, hidden, labels, exact_match)


def _label_loss(model, hidden, labels, exact_match: bool) -> CausalLMOutputWithPast:
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows = hidden[:, :-1][keep]  # (n_label_tokens, hidden)
    logits = model.get_output_embeddings()(rows).float()
    n = keep.sum()
    # Sum / count rather than mean(): a micro-batch with no label token gives 0, not NaN,
    # and still takes part in the backward (ZeRO-3 needs every rank to).
    loss = F.cross_entropy(logits, targets[keep], reduction="sum") / n.clamp(min=1)
    if not exact_match:
        return CausalLMOutputWithPast(loss=loss)
    return LabelLossOutput(loss=loss, matches=_row_matches(logits.argmax(-1) == targets[keep], keep))


def _row_matches(hit: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per row with at least one label: all its label positions hit."""
    row = keep.nonzero()[:, 0]
    misses = torch.zeros(keep.shape[0], dtype=torch.long, device=hit.device).index_add(0, row, (~hit).long())
    has = keep.any(1)
    return (misses == 0)[has]


def _choice_loss(model, hidden, labels, index, cand) -> CausalLMOutputWithPast:
    rows, pos = index[:, 0], index[:, 1]
    logits = model.get_output_embeddings()(hidden[rows, pos - 1]).float()  # predicts token at pos
    scores = logits.gather(1, cand.clamp(min=0)).masked_fill(cand < 0, float("-inf"))
    target = (cand == labels[rows, pos][:, None]).float().argmax(1)
    loss = F.cross_entropy(scores, target, reduction="sum") / max(1, len(rows))
    return CausalLMOutputWithPast(loss=loss)


def objective_forward(model, args: tuple, kwargs: dict, label_positions_only: bool = True, lm_weight: float = 0.0):
    """Forward of a causal LM for training and evaluation, whatever wraps its layers.

    choice_index / choice_ids (the "choices" objective) and labelled batches go through
    the label-position loss; calls without labels (logits for scoring) and models that
    post-process logits take the model's own forward.
    """
    if "choice_index" in kwargs:
        if not supports_label_positions(model):
            raise ValueError(
                f"the 'choices' objective needs logits = lm_head(decoder(x)); "
                f"{type(model).__name__} post-processes its logits"
            )
        return label_positions_loss(model, lm_weight=lm_weight, **kwargs)
    exact = kwargs.pop("exact_match", False)
    if (
        label_positions_only
        and not args
        and kwargs.get("labels") is not None
        and "logits_to_keep" not in kwargs
        and supports_label_positions(model)
    ):
        return label_positions_loss(model, exact_match=exact, **kwargs)
    out = model(*args, **kwargs)
    if exact and kwargs.get("labels") is not None:
        labels = kwargs["labels"]
        keep = labels[:, 1:] != IGNORE_INDEX
        hit = out.logits[:, :-1].argmax(-1)[keep] == labels[:, 1:][keep]
        out = LabelLossOutput(loss=out.loss, matches=_row_matches(hit, keep))
    return out


def trains_on_choices(objective: str) -> bool:
    """The objectives whose loss ranks each record's choices: their training data carries the
    choices' tokens (data.tokenized(choice_loss=True))."""
    return objective in ("choices", "choices_lm")


class TrainingModel(torch.nn.Module):
    """What the engine trains: any method's root behind the training objective.

    The root's `prepare()` runs first (GPart forms theta * s), then the label-position
    loss (or the choices objective) on its causal LM; called without labels it returns
    the model's own output (logits for scoring).
    """

    def __init__(self, root, objective: str = "lm"):
        super().__init__()
        self.root = root
        # With labels, run the vocabulary head only at label positions; callers that need
        # logits call without labels.
        self.label_positions_only = True
        # choices_lm: the choice cross-entropy plus the next-token loss of the label
        self.lm_weight = 1.0 if objective == "choices_lm" else 0.0

    def forward(self, *args, **kwargs):
        self.root.prepare()
        return objective_forward(self.root.lm, args, kwargs, self.label_positions_only, self.lm_weight)
