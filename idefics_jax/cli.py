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
    from idefics_jax import configs

    if a.list:
        print("\n".join(configs.names()))
        return
    if a.config is None:
        raise ValueError(f"name a config: a YAML file or a shipped one ({', '.join(configs.names())})")
    from idefics_jax.train import config, heap, trainer

    cfg = config.load(a.config, a.overrides)  # a bad config fails before the restart
    if a.program:  # the idefics-jax command itself, not main(argv) called in a Python process
        heap.reexec_with_tunables()  # XLA:CPU reuses freed memory instead of faulting it in each step
    trainer.train(cfg)


def _generate(a):
    from idefics_jax.chat import Chat
    from idefics_jax.generation import check_arguments
    from idefics_jax.images import load_image
    from idefics_jax.model import check_attention

    # Every argument is checked before the model loads (seconds), images included.
    if a.temperature is not None and not a.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (0 means greedy); got {a.temperature}")
    if a.longest_edge is not None and a.longest_edge < 1:
        raise ValueError(f"--longest-edge must be a positive number of pixels; got {a.longest_edge}")
    # Sampling when any sampling knob is set (a temperature of 0 means greedy).
    sample = a.top_k is not None or a.top_p is not None or (a.temperature is not None and a.temperature > 0)
    kw = dict(do_sample=sample, temperature=a.temperature or 1.0, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    check_arguments(max_new_tokens=a.max_new_tokens, **kw)
    check_attention(a.attention)
    images = [load_image(i) for i in a.image]
    chat = Chat.load(a.model, dtype=a.dtype, do_image_splitting=False if a.no_image_splitting else None,
                     longest_edge=a.longest_edge)
    content = [{"type": "image"} for _ in a.image] + [{"type": "text", "text": a.prompt}]
    for piece in chat.stream([{"role": "user", "content": content}], images, max_new_tokens=a.max_new_tokens,
                             attention=a.attention, **kw):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("idefics-jax")
    except PackageNotFoundError:  # a source tree that is not installed
        return "0+unknown"

def _serve(a):
    from idefics_jax.serve.app import serve

    serve(a.model, host=a.host, port=a.port, slots=a.slots, max_len=a.max_len, max_queue=a.max_queue, dtype=a.dtype,
          allow_local_images=a.allow_local_images, max_images=a.max_images, max_image_pixels=a.max_image_pixels,
          attention=a.attention)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="idefics-jax", description="Idefics2 / Idefics3 / SmolVLM in JAX.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    # --debug after the subcommand too; SUPPRESS keeps a --debug given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    parser = lambda name, **kw: sub.add_parser(name, parents=[common], **kw)  # noqa: E731
    c = parser("convert", help="HF safetensors directory -> Orbax checkpoint")
    c.add_argument("src", help="HF model directory (config.json + model.safetensors or shards)")
    c.add_argument("dst", help="output directory (must not exist)")
    c.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: the checkpoint's")
    c.set_defaults(fn=_convert)
    e = parser("export", help="Orbax checkpoint -> HF safetensors directory")
    e.add_argument("src", help="checkpoint written by `idefics-jax convert`")
    e.add_argument("dst", help="output HF directory (must not exist)")
    e.set_defaults(fn=_export)
    t = parser("train", help="fine-tune with a shipped config or a YAML file (resumes from WORKDIR)")
    t.add_argument("config", nargs="?", help="a shipped config's name (see --list), or a YAML file")
    t.add_argument("--list", action="store_true", help="name the shipped configs and exit")
    t.add_argument("overrides", nargs="*", help="key=value, nested with dots (optim.learning_rate=1e-4)")
    t.set_defaults(fn=_train)
    g = parser("generate", help="answer a prompt about images, streaming the text to stdout")
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
    s = parser("serve", help="OpenAI-compatible chat server with continuous batching, and a chat page at /")
    s.add_argument("--model", default="tiny-shapes", help="checkpoint or shipped model (default: tiny-shapes)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--slots", type=int, default=8, help="requests decoded together")
    s.add_argument("--max-len", type=int, default=None, help="cache positions per slot (prompt + answer)")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    s.add_argument("--allow-local-images", default=None, metavar="DIR", help="accept image paths under DIR")
    s.add_argument("--max-images", type=int, default=8, help="images per request")
    s.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="pixels per image")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: the checkpoint's")
    s.add_argument("--attention", choices=["xla", "cudnn", "pallas"], default=None,
                   help="prompt attention backend (default: pallas on TPU, cudnn on GPU, xla on CPU)")
    s.set_defaults(fn=_serve)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.program = argv is None  # the process's own command line: `train` may restart the process
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
