"""The label-positions-only loss equals transformers' full-vocabulary loss, gradients too."""

import torch

from gpart_ds.methods.gpart.layer import apply_gpart
from gpart_ds.objective import IGNORE_INDEX, TrainingModel, supports_label_positions
from tests.helpers import micro_llama


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (3, 9), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 6:] = ids[0, 6:]  # a completion at the end
    labels[1, 3:5] = ids[1, 3:5]  # one in the middle, then right padding
    labels[2, 8] = ids[2, 8]  # a single answer token
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run(label_positions_only: bool, b: dict):
    g = apply_gpart(micro_llama(), d=64, seed=3)
    with torch.no_grad():
        g.gpart_theta.copy_(torch.randn(64, generator=torch.Generator().manual_seed(1)) * 0.1)
    model = TrainingModel(g)
    model.label_positions_only = label_positions_only
    out = model(**b)
    out.loss.backward()
    return out.loss.detach(), g.gpart_theta.grad.clone()


def test_label_positions_loss_and_grad_equal_the_full_head():
    b = batch()
    full_loss, full_grad = run(False, b)
    loss, grad = run(True, b)
    assert supports_label_positions(micro_llama())
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=0)  # fp32 CE, sum/n vs mean
    torch.testing.assert_close(grad, full_grad, rtol=1e-5, atol=1e-9)
    assert full_grad.abs().sum() > 0


def test_a_batch_without_labels_gives_zero_loss_and_still_backpropagates():
    b = batch()
    b["labels"] = torch.full_like(b["labels"], IGNORE_INDEX)
    loss, grad = run(True, b)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_models_that_post_process_logits_keep_the_full_head():
    m = micro_llama()
    m.config.final_logit_softcapping = 30.0
    assert not supports_label_positions(m)


def test_choices_objective_is_cross_entropy_among_the_candidate_tokens():
    from gpart_ds.data import Example, collate, pack

    g = torch.Generator().manual_seed(2)
    exs = []
    for n, (a, b) in [(6, (7, 9)), (4, (9, 7)), (5, (11, 7))]:
        ids = torch.randint(12, 50, (n,), generator=g).tolist()
        ids[-1] = a  # the answer token; b is the other choice
        labels = [-100] * (n - 1) + [a]
        exs.append(Example(ids, labels, None, [[n - 1, a, b]]))
    model = apply_gpart(micro_llama(), d=64, seed=3)
    with torch.no_grad():
        model.gpart_theta.copy_(torch.randn(64, generator=torch.Generator().manual_seed(1)) * 0.1)

    def reference(batch_exs):
        total = 0.0
        for e in batch_exs:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0].float()
            for pos, *cand in e.choices:
                row = torch.log_softmax(logits[pos - 1, cand], -1)
                total -= row[cand.index(e.labels[pos])]
        return total / sum(len(e.choices) for e in batch_exs)

    want = reference(exs)
    got = TrainingModel(model)(**collate(exs, 0)).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    packed = pack(exs, max_length=32)
    assert len(packed) == 1 and [c[0] for c in packed[0].choices] == [5, 9, 14]
    got_packed = TrainingModel(model)(**collate(packed, 0)).loss
    torch.testing.assert_close(got_packed, want, rtol=1e-5, atol=1e-6)
    got_packed.backward()
    assert model.gpart_theta.grad.abs().sum() > 0


def test_choices_lm_adds_the_full_vocabulary_loss_of_the_label():
    from gpart_ds.data import Example, collate

    g = torch.Generator().manual_seed(4)
    exs = []
    for n, (a, b) in [(6, (7, 9)), (5, (9, 7))]:
        ids = torch.randint(12, 50, (n,), generator=g).tolist()
        ids[-1] = a
        exs.append(Example(ids, [-100] * (n - 1) + [a], None, [[n - 1, a, b]]))
    model = apply_gpart(micro_llama(), d=64, seed=3)
    with torch.no_grad():
        model.gpart_theta.copy_(torch.randn(64, generator=torch.Generator().manual_seed(1)) * 0.1)
    batch = collate(exs, 0)
    choice = TrainingModel(model, "choices")(**batch).loss
    lm = TrainingModel(model, "lm")(**{k: v for k, v in batch.items() if k not in ("choice_index", "choice_ids")}).loss
    both = TrainingModel(model, "choices_lm")(**batch).loss
    torch.testing.assert_close(both, choice + lm, rtol=1e-6, atol=1e-7)
    assert lm > choice > 0  # the label against the whole vocabulary costs more


def test_exact_match_is_greedy_decoding_reproducing_the_completion():
    from gpart_ds.objective import objective_forward

    torch.manual_seed(0)
    model = micro_llama().eval()
    prompt = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(4))
    greedy = prompt
    with torch.no_grad():
        for _ in range(3):  # greedy decoding, step by step
            nxt = model(input_ids=greedy).logits[:, -1].argmax(-1, keepdim=True)
            greedy = torch.cat([greedy, nxt], 1)
    wrong = greedy.clone()
    wrong[0, 7] = (wrong[0, 7] + 1) % 50  # the last completion token differs
    ids = torch.cat([greedy, wrong])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 5:] = ids[:, 5:]
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        fast = objective_forward(model, (), dict(b, exact_match=True), label_positions_only=True)
        full = objective_forward(model, (), dict(b, exact_match=True), label_positions_only=False)
    assert fast.matches.tolist() == [True, False]
    assert full.matches.tolist() == [True, False]
    torch.testing.assert_close(fast.loss, full.loss, rtol=1e-6, atol=0)
