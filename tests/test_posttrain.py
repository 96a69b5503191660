"""Post-training: completion log-probabilities against transformers, the DPO and GRPO losses against reference
implementations of TRL's / DeepSeekMath's formulas, rewards, and rollouts from the serving engine."""

import numpy as np
import pytest
import torch
from conftest import chat

import reference as testing
from idefics_jax.checkpoints.load import load_pretrained
from idefics_jax.train import grpo_loss, logprobs, preference, rewards


@pytest.mark.parametrize("fixture", ["tiny_hf", "tiny2_hf"])
def test_completion_logps_equal_transformers(request, fixture):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = request.getfixturevalue(fixture)
    processor = AutoProcessor.from_pretrained(path)
    rng = np.random.default_rng(0)
    img = lambda h, w: testing.random_image(rng, h, w)  # noqa: E731
    images = [[img(40, 30)], [img(64, 64), img(20, 90)]]
    texts = [chat(processor, 1, "one?"), chat(processor, 2, "and these two images, what differs?")]
    prompts = dict(processor(text=texts, images=images, return_tensors="np", padding=True, padding_side="left"))
    tok = processor.tokenizer
    completions = [logprobs.completion_tokens(tok, "a red square", tok.eos_token_id),
                   logprobs.completion_tokens(tok, "two images, one is blue", None)]
    ours = logprobs.completion_logps(load_pretrained(path), logprobs.sequences(prompts, completions, pad_id=0))
    hf = AutoModelForImageTextToText.from_pretrained(path).eval()
    for b in range(2):  # each row alone, unpadded
        alone = processor(text=[texts[b]], images=[images[b]], return_tensors="pt")
        comp = torch.tensor([completions[b]])
        ids = torch.cat([alone["input_ids"], comp], dim=1)
        with torch.no_grad():
            logits = hf(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=alone["pixel_values"],
                        pixel_attention_mask=alone.get("pixel_attention_mask")).logits.double()
        P = alone["input_ids"].shape[1]
        lp = torch.log_softmax(logits[0, P - 1:-1], dim=-1).gather(1, comp[0][:, None]).sum().item()
        assert abs(ours[b] - lp) / abs(lp) < 1e-5, (b, ours[b], lp)


def _trl_dpo(pc, pr, rc, rr, loss, beta, ls, nc, nr):
    """TRL's DPOTrainer.dpo_loss for 'sigmoid' and 'ipo' (ipo on length-averaged log-probabilities), in torch."""
    if loss == "ipo":
        pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
    logits = (pc - pr) - (rc - rr)
    if loss == "sigmoid":
        losses = -torch.nn.functional.logsigmoid(beta * logits) * (1 - ls) \
            - torch.nn.functional.logsigmoid(-beta * logits) * ls
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses.mean(), beta * (pc - rc).detach(), beta * (pr - rr).detach()


@pytest.mark.parametrize("loss,beta,ls", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0)])
def test_dpo_loss_and_gradient_equal_trl(loss, beta, ls):
    import jax

    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.normal(-20, 5, 6) for _ in range(4))
    nc, nr = rng.integers(1, 9, 6).astype(float), rng.integers(1, 9, 6).astype(float)
    cfg = preference.DpoConfig(loss, beta, ls)

    def ours(pc, pr):
        return preference.dpo_loss(pc, pr, rc, rr, cfg, nc, nr)

    (value, metrics), grads = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(pc, pr)
    tc, tr = (torch.tensor(x, requires_grad=True) for x in (pc, pr))
    ref, chosen, rejected = _trl_dpo(tc, tr, torch.tensor(rc), torch.tensor(rr), loss, beta, ls, torch.tensor(nc),
                                     torch.tensor(nr))
    ref.backward()
    np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[0]), tc.grad.numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np.asarray(grads[1]), tr.grad.numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(float(metrics["rewards_chosen"]), chosen.mean().item(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards_margin"]), (chosen - rejected).mean().item(), rtol=1e-5)
    assert float(metrics["preference_accuracy"]) == pytest.approx(float((chosen > rejected).double().mean()))


def _deepseek_grpo(logps, old, ref, rewards_N, mask, G, beta, eps):
    """DeepSeekMath's GRPO objective (TRL's loss_type 'grpo'), written out group by group and token by token."""
    N = len(rewards_N)
    total = 0.0
    for g in range(N // G):
        r = rewards_N[g * G:(g + 1) * G]
        mean, std = r.mean(), r.std(unbiased=True)
        for i in range(g * G, (g + 1) * G):
            adv = (rewards_N[i] - mean) / (std + 1e-4)
            terms = []
            for t in range(logps.shape[1]):
                if mask[i, t]:
                    ratio = torch.exp(logps[i, t] - old[i, t])
                    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
                    kl = torch.exp(ref[i, t] - logps[i, t]) - (ref[i, t] - logps[i, t]) - 1
                    terms.append(-(surrogate - beta * kl))
            total = total + torch.stack(terms).mean()
    return total / N


def test_grpo_loss_and_gradient_equal_deepseekmath():
    import jax

    rng = np.random.default_rng(2)
    G, N, T = 4, 8, 6
    old = rng.normal(-2, 0.5, (N, T))
    logps = old + rng.normal(0, 0.3, (N, T))  # some ratios beyond the clip range
    ref = old + rng.normal(0, 0.2, (N, T))
    mask = np.zeros((N, T))
    for i, n in enumerate(rng.integers(1, T + 1, N)):
        mask[i, :n] = 1
    r = rng.integers(0, 2, N).astype(float)
    r[:G] = [1, 0, 0, 1]
    adv = grpo_loss.advantages(r, G)

    def ours(lp):
        return grpo_loss.grpo_loss(lp, old, ref, adv, mask, beta=0.04, epsilon=0.2)

    (value, metrics), grad = jax.value_and_grad(ours, has_aux=True)(logps)
    t = torch.tensor(logps, requires_grad=True)
    expected = _deepseek_grpo(t, torch.tensor(old), torch.tensor(ref), torch.tensor(r), mask, G, 0.04, 0.2)
    expected.backward()
    np.testing.assert_allclose(float(value), expected.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), t.grad.numpy(), rtol=1e-5, atol=1e-8)
    assert 0 < float(metrics["clip_fraction"]) < 1 and float(metrics["kl"]) > 0


def test_rewards():
    assert rewards.reward_function("exact")("q", " Red. ", ["red"]) == 1.0
    assert rewards.reward_function("exact")("q", "redish", ["red"]) == 0.0
    assert rewards.reward_function("numeric")("q", "there are 3.0 shapes", ["3"]) == 1.0
    assert rewards.reward_function("numeric")("q", "none", ["0"]) == 0.0
    fmt = rewards.reward_function(r"regex:\d+$")
    assert fmt("q", "4", []) == 1.0 and fmt("q", "four", []) == 0.0
    assert rewards.reward_function("idefics_jax.train.rewards:exact_match") is rewards.exact_match
    with pytest.raises(ValueError, match="not exact, numeric"):
        rewards.reward_function("nonsense")
    with pytest.raises(ValueError, match="no_such_module"):
        rewards.reward_function("no_such_module:f")
