"""The `idefics-jax` command: thin argument parsing over library functions."""

from __future__ import annotations

import argparse
import sys


def _convert(a):
    from convert.hf_to_orbax import convert

    convert(a.src, a.dst, dtype=a.dtype)
    print(f"wrote {a.dst}", file=sys.stderr)


def _export(a):
    from convert.orbax_to_hf import export

    export(a.src, a.dst)


def _train(a):
    from train import config, trainer

    trainer.train(config.load(a.config, a.overrides))


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
