"""The `idefics-jax` command: thin argument parsing over library functions."""

from __future__ import annotations

import argparse
import sys


def _convert(a):
    from idefics_jax.convert.hf_to_orbax import convert

    convert(a.src, a.dst, dtype=a.dtype)
    print(f"wrote {a.dst}", file=sys.stderr)


def _export(a):
    from idefics_jax.convert.orbax_to_hf import export
    from idefics_jax.train.export import export_run, is_run

    (export_run if is_run(a.src) else export)(a.src, a.dst)


def _train(a):
    from idefics_jax.train import config, heap, trainer

    heap.reexec_with_tunables(sys.argv)  # XLA:CPU reuses freed memory instead of faulting it in each step

    trainer.train(config.load(a.config, a.overrides))


def _generate(a):
    from idefics_jax.chat import Chat

    if a.temperature is not None and not a.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (0 means greedy); got {a.temperature}")
    chat = Chat.load(a.model, dtype=a.dtype, do_image_splitting=False if a.no_image_splitting else None,
                     longest_edge=a.longest_edge)
    content = [{"type": "image"} for _ in a.image] + [{"type": "text", "text": a.prompt}]
    # Sampling when any sampling knob is set (a temperature of 0 means greedy).
    sample = a.top_k is not None or a.top_p is not None or (a.temperature is not None and a.temperature > 0)
    kw = dict(do_sample=sample, temperature=a.temperature or 1.0, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
              attention=a.attention)
    for piece in chat.stream([{"role": "user", "content": content}], a.image, max_new_tokens=a.max_new_tokens, **kw):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="idefics-jax", description="Idefics2 / Idefics3 / SmolVLM in JAX.")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="HF safetensors directory -> Orbax checkpoint")
    c.add_argument("src", help="HF model directory (config.json + model.safetensors or shards)")
    c.add_argument("dst", help="output directory (must not exist)")
    c.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: the checkpoint's")
    c.set_defaults(fn=_convert)
    e = sub.add_parser("export", help="Orbax checkpoint -> HF safetensors directory")
    e.add_argument("src", help="checkpoint written by `idefics-jax convert`")
    e.add_argument("dst", help="output HF directory (must not exist)")
    e.set_defaults(fn=_export)
    t = sub.add_parser("train", help="fine-tune with a config from configs/ (resumes from WORKDIR)")
    t.add_argument("config", help="YAML file, e.g. configs/tiny.yaml")
    t.add_argument("overrides", nargs="*", help="key=value, nested with dots (optim.learning_rate=1e-4)")
    t.set_defaults(fn=_train)
    g = sub.add_parser("generate", help="answer a prompt about images, streaming the text to stdout")
    g.add_argument("--model", default="tiny-shapes",
                   help="checkpoint directory (idefics-jax or HF) or a shipped model's name (default: tiny-shapes)")
    g.add_argument("--image", action="append", default=[], metavar="PATH", help="image file or URL (repeatable)")
    g.add_argument("--prompt", required=True, help="the question or instruction")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=None, help="sample at this temperature (0: greedy)")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with this probability")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    g.add_argument("--no-image-splitting", action="store_true", help="one tile per image (fewer image tokens)")
    g.add_argument("--longest-edge", type=int, default=None, metavar="PX", help="resize images to this longest edge")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: the checkpoint's")
    g.add_argument("--attention", choices=["xla", "cudnn", "pallas"], default=None,
                   help="prompt attention backend (default: pallas on TPU, cudnn on GPU, xla on CPU)")
    g.set_defaults(fn=_generate)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, OSError, KeyboardInterrupt) as e:
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"idefics-jax {args.command}: error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
