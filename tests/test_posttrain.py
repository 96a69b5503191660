"""Post-training: completion log-probabilities against transformers, the DPO and GRPO losses against reference
implementations of TRL's / DeepSeekMath's formulas, rewards, and rollouts from the serving engine."""

import numpy as np
import pytest
import torch
from conftest import chat

import reference as testing
from idefics_jax.checkpoints.load import load_pretrained
from idefics_jax.train import grpo_loss, logprobs, preference, rewards
from idefics_jax.train.config import DpoConfig


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
    cfg = DpoConfig(loss, beta, ls)

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


@pytest.fixture(scope="module")
def rollout_setup(lively_hf):
    from transformers import AutoProcessor

    from idefics_jax.generation.chat import user_turn
    from idefics_jax.train import rollouts

    processor = AutoProcessor.from_pretrained(lively_hf)
    model = load_pretrained(lively_hf)
    rng = np.random.default_rng(3)
    prompts = [rollouts.Prompt(user_turn(q, 1), [testing.random_image(rng, 40, 50)], ("x",))
               for q in ["what is this?", "describe it", "and this one?"]]
    engine = rollouts.rollout_engine(model, processor, slots=4, max_len=rollouts.max_len_for(200, 8))
    with engine:
        yield model, processor, prompts, engine


def _generated(model, processor, prompt, max_new_tokens):
    from idefics_jax.generation.api import generate
    from idefics_jax.generation.chat import Chat

    chat_ = Chat(model, processor)
    inputs = chat_.inputs(prompt.messages, prompt.images)
    new = generate(model, **inputs, max_new_tokens=max_new_tokens)[0, inputs["input_ids"].shape[1]:].tolist()
    eos = set(model.generation_defaults.eos_token_ids)
    end = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
    return tuple(new[:end])


def test_rollouts_greedy_equal_generate_sampled_repeat_and_follow_weight_updates(rollout_setup):
    import jax
    from flax import nnx

    from idefics_jax.generation import decode
    from idefics_jax.train import rollouts

    model, processor, prompts, engine = rollout_setup
    kw = dict(group_size=2, max_new_tokens=8)
    greedy = rollouts.sample_groups(engine, prompts, temperature=0.0, **kw)
    for p, group in zip(prompts, greedy):
        assert group[0].tokens == group[1].tokens == _generated(model, processor, p, 8)
    sampled = rollouts.sample_groups(engine, prompts, temperature=1.0, seed=5, **kw)
    assert sampled == rollouts.sample_groups(engine, prompts, temperature=1.0, seed=5, **kw)
    assert len({c.tokens for g in sampled for c in g}) > 1

    # A changed weight (as a policy update changes it), same shapes: the engine samples from it at once.
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x, state)
    state["lm_head"].set_value(state["lm_head"][...] * -1.0)
    changed = nnx.merge(graphdef, state)
    changed.generation_defaults = model.generation_defaults
    engine.update_weights(changed)
    after = rollouts.sample_groups(engine, prompts, temperature=0.0, **kw)
    assert [g[0] for g in after] != [g[0] for g in greedy]
    for p, group in zip(prompts, after):
        assert group[0].tokens == _generated(changed, processor, p, 8)

    # Other weights end answers at other steps, so the first round with them may meet new batch shapes; once
    # both have run, switching weights back and forth compiles nothing.
    compiled = decode.decode._cache_size(), decode.prefill._cache_size()
    for weights, expected in [(model, greedy), (changed, after), (model, greedy)]:
        engine.update_weights(weights)
        assert rollouts.sample_groups(engine, prompts, temperature=0.0, **kw) == expected
    assert (decode.decode._cache_size(), decode.prefill._cache_size()) == compiled  # nothing recompiled


def test_lora_reference_is_the_base_without_adapters(tiny_hf):
    import jax

    from idefics_jax.train import step as step_lib
    from idefics_jax.train.config import LoraConfig

    lora = LoraConfig(rank=2)
    parts = step_lib.split(load_pretrained(tiny_hf), lora=lora, key=jax.random.key(0))
    ref = logprobs.reference_params(parts.frozen, None)
    assert all(ref[p] is parts.frozen[p] for p in parts.frozen)  # no second copy of the weights
    moved = jax.tree.map(lambda x: x + 0.5, parts.trainable)  # adapters that change the policy
    policy = logprobs.policy_params(parts, moved, parts.frozen, lora)
    ids = np.array([[5, 9, 12, 7, 8]], np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "completion_mask": np.array([[0, 0, 1, 1, 1]])}
    base = logprobs.completion_logps(load_pretrained(tiny_hf), batch)
    np.testing.assert_allclose(np.sum(np.asarray(logprobs.params_token_logps(parts, ref, batch)), axis=1), base,
                               rtol=1e-6)
    assert abs(float(np.sum(logprobs.params_token_logps(parts, policy, batch))) - base[0]) > 1e-3


def test_dpo_run_on_jsonl_pairs(tmp_path):
    import json
    import math

    from idefics_jax.shapes import task as shapes
    from idefics_jax.train import config as config_lib, run

    rng = np.random.default_rng(4)
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(2):
            ex = shapes.sample(rng)
            ex.image.save(tmp_path / f"{i}.png")
            q = shapes.color_count_questions(ex.shapes)[0]
            f.write(json.dumps({"images": [f"{i}.png"], "prompt": q.text, "chosen": q.answer,
                                "rejected": str(int(q.answer) + 1)}) + "\n")
    work = str(tmp_path / "run")
    run.run(config_lib.load("configs/tiny-shapes-dpo.yaml", [
        f"workdir={work}", f"data.train={tmp_path / 'pairs.jsonl'}", "steps=2", "data.batch_size=2", "log_every=1",
        "optim.warmup_steps=0", "optim.learning_rate=1e-3"]))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    # At the start the policy is the reference: every reward is 0 and the loss is log 2.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards_margin"] == pytest.approx(0, abs=1e-6)
    # One update on the same two pairs prefers the chosen answers.
    assert rows[1]["rewards_margin"] > 0 and rows[1]["preference_accuracy"] == 1.0


def test_jsonl_records_resolve_images_and_name_a_bad_line(tmp_path):
    """DPO pairs and GRPO prompts from JSONL: images beside the file, and a bad line is one error naming it."""
    import json

    from idefics_jax.train.dpo import jsonl_pairs
    from idefics_jax.train.grpo import jsonl_prompts

    good = {"images": ["a.png", "/abs/b.png"], "prompt": "How many?", "chosen": 3, "rejected": "4", "answers": [3]}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(good) + "\n\n")
    (pair,), (prompt,) = jsonl_pairs(str(path)), jsonl_prompts(str(path))
    assert pair.images == [str(tmp_path / "a.png"), "/abs/b.png"] == prompt.images
    assert (pair.chosen, pair.rejected, prompt.answers) == ("3", "4", ("3",))
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "x", "answers": ["1"]}) + "\n")
    with pytest.raises(ValueError, match=r"r\.jsonl:2: not a DPO record \{images, prompt, chosen, rejected\} "
                                         r"\('chosen'\)$"):
        jsonl_pairs(str(path))
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"r\.jsonl:1: not a GRPO record \{images, prompt, answers\} \("):
        jsonl_prompts(str(path))
    path.write_text("\n")
    with pytest.raises(ValueError, match=r"r\.jsonl: no records$"):
        jsonl_prompts(str(path))
