"""The parity demo: build a small random SmolVLM-style checkpoint offline, convert it with `idefics-jax convert`,
answer a question about an image in JAX, and check logits and generated tokens against transformers.

    python3 scripts/demo.py [--workdir out/demo]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # reference.py


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="out/demo")
    a = p.parse_args(argv)

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from idefics_jax.generation.chat import Chat
    from idefics_jax.convert.hf_to_orbax import convert
    from idefics_jax.checkpoints.load import load_pretrained
    from idefics_jax.generation.api import generate
    import reference as testing

    hf_dir, orbax_dir = os.path.join(a.workdir, "hf"), os.path.join(a.workdir, "orbax")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        print(f"building a random tiny Idefics3 checkpoint in {hf_dir}")
        testing.save_hf_checkpoint(hf_dir, seed=0)
    if not os.path.exists(orbax_dir):
        convert(hf_dir, orbax_dir)
    processor = AutoProcessor.from_pretrained(orbax_dir)
    model = load_pretrained(orbax_dir)

    image = testing.random_image(np.random.default_rng(0), 50, 70)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What do we see?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = dict(processor(text=prompt, images=[image], return_tensors="np"))
    t0 = time.time()
    logits = np.asarray(model(**inputs))
    t1 = time.time()
    logits = np.asarray(model(**inputs))
    t2 = time.time()
    ref = AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        ref_logits = ref(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    err = np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()
    top = processor.tokenizer.convert_ids_to_tokens(int(logits[0, -1].argmax()))
    print(f"prompt: {inputs['input_ids'].shape[1]} tokens, {inputs['pixel_values'].shape[1]} image tiles")
    print(f"jax forward: {t1 - t0:.2f} s with compile, {1000 * (t2 - t1):.1f} ms after")
    theirs = processor.tokenizer.convert_ids_to_tokens(int(ref_logits[0, -1].argmax()))
    print(f"next token (random weights): {top!r}; transformers agrees: {top == theirs}")
    print(f"max |logit diff| / max |logit| vs transformers: {err:.2e}")

    chat = Chat(model, processor)
    t0 = time.time()
    answer = chat(messages, [image], max_new_tokens=24)
    print(f"answer (random weights, {time.time() - t0:.1f} s with compile): {answer!r}")
    ours = generate(model, **inputs, max_new_tokens=24)
    with torch.no_grad():
        theirs = ref.generate(**{k: torch.from_numpy(v) for k, v in inputs.items()}, max_new_tokens=24,
                              do_sample=False).numpy()
    same = ours.shape == theirs.shape and bool((ours == theirs).all())
    print(f"transformers' generate gives the same {ours.shape[1] - inputs['input_ids'].shape[1]} tokens: {same}")
    return 0 if err <= 1e-4 and same else 1


if __name__ == "__main__":
    sys.exit(main())
