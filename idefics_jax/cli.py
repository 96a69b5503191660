"""The `idefics-jax` command: thin argument parsing over library functions."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _convert(a):
    from idefics_jax.convert.hf_to_orbax import convert

    convert(a.src, a.dst, dtype=a.dtype, quantize=a.quantize, group_size=a.group_size)
    print(f"wrote {a.dst}", file=sys.stderr)


def _export(a):
    from idefics_jax.convert.orbax_to_hf import export
    from idefics_jax.checkpoints.registry import is_run
    from idefics_jax.train.export import export_run

    (export_run if is_run(a.src) else export)(a.src, a.dst)


def _train(a):
    from idefics_jax import configs
    from idefics_jax.runtime import distributed

    if a.list:
        print("\n".join(configs.names()))
        return
    if a.config is None:
        raise ValueError(f"name a config: a YAML file or a shipped one ({', '.join(configs.names())})")
    from idefics_jax.train import config, run

    cfg = config.load(a.config, a.overrides)  # a bad config fails before joining other hosts
    if a.dry_run or a.topology:
        from idefics_jax.train.dry_run import dry_run, estimate, estimate_report, report

        plan = dry_run(cfg, a.topology)
        text = report(plan)
        print(text, flush=True)
        if not plan["fits"]:
            raise ValueError(text.splitlines()[-1])
        if a.topology:  # only the TPU compiler estimates time
            print("estimating the step time: the step compiled again at 1 and 2 layers, its loops unrolled (minutes "
                  "for an 8B model) ...", file=sys.stderr, flush=True)
            print(estimate_report(plan, estimate(cfg, a.topology, plan)))
        return
    distributed.initialize()  # several hosts (TPU pod, SLURM, coordinator variables): join them
    run.run(cfg)


def _generate(a):
    from idefics_jax.generation.images import load_image
    from idefics_jax.generation.sampling import SamplingParams
    from idefics_jax.generation.video import probe
    from idefics_jax.runtime import distributed

    # Every argument is checked before the model loads (seconds), images included.
    if a.longest_edge is not None and a.longest_edge < 1:
        raise ValueError(f"--longest-edge must be a positive number of pixels; got {a.longest_edge}")
    _check_quantize_options(a)
    _check_mesh(a)
    # Sampling when any sampling knob is set (a temperature of 0 means greedy).
    knobs = a.top_k is not None or a.top_p is not None
    temperature = a.temperature if a.temperature is not None else (1.0 if knobs else 0.0)
    sampling = SamplingParams.from_temperature(temperature, a.top_p, max_new_tokens=a.max_new_tokens, top_k=a.top_k,
                                               seed=a.seed)
    response_format = _response_format(a)
    images = [load_image(i) for i in a.image]
    for v in a.video:  # readable, with frames (PyAV installed)
        probe(v)
    from idefics_jax.train.loading import load_chat  # after the checks: imports Orbax

    distributed.initialize()
    chat = load_chat(a.model, dtype=a.dtype, do_image_splitting=False if a.no_image_splitting else None,
                     longest_edge=a.longest_edge, quantize=a.quantize, group_size=a.group_size, attention=a.attention,
                     mesh=a.mesh)
    out = sys.stdout if distributed.is_main() else open(os.devnull, "w")  # every host computes, one prints
    content = [{"type": "video"} for _ in a.video] + [{"type": "image"} for _ in a.image] + [
        {"type": "text", "text": a.prompt}]
    messages = [{"role": "user", "content": content}]
    if a.assistant_prefix is not None:  # continued by the model, and printed as the answer's start
        messages.append({"role": "assistant", "content": [{"type": "text", "text": a.assistant_prefix}]})
        out.write(a.assistant_prefix)
    for piece in chat.stream(messages, images, videos=a.video,
                             max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample,
                             temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                             seed=sampling.seed, response_format=response_format):
        out.write(piece)
        out.flush()
    out.write("\n")


def _response_format(a) -> dict | None:
    """--json-schema FILE / --regex / --choice as a checked response format (before the model loads)."""
    from idefics_jax.generation.structured import grammar_source

    given = [n for n, v in (("--json-schema", a.json_schema), ("--regex", a.regex), ("--choice", a.choice)) if v]
    if len(given) > 1:
        raise ValueError(f"give one of {', '.join(given)}, not several")
    if a.json_schema:
        with open(a.json_schema) as f:
            try:
                schema = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"--json-schema {a.json_schema}: not JSON ({e})") from None
        rf = {"type": "json_schema", "json_schema": {"schema": schema}}
    elif a.regex:
        rf = {"type": "regex", "regex": a.regex}
    elif a.choice:
        rf = {"type": "choice", "choice": a.choice}
    else:
        return None
    grammar_source(rf)
    return rf


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("idefics-jax")
    except PackageNotFoundError:  # a source tree that is not installed
        return "0+unknown"


def _serve(a):
    _check_quantize_options(a)
    _check_mesh(a)
    if a.dry_run or a.topology:
        from idefics_jax.serve.dry_run import dry_run, report

        plan = dry_run(a.model, slots=a.slots, max_len=a.max_len, dtype=a.dtype, quantize=a.quantize,
                       group_size=a.group_size, mesh=a.mesh, slice_name=a.topology,
                       prefix_cache_gb=a.prefix_cache_gb, image_cache_gb=a.image_cache_gb)
        text = report(plan)
        print(text)
        if not plan["fits"]:
            raise ValueError(text.splitlines()[-1])
        return
    from idefics_jax.serve.app import serve
    from idefics_jax.train.loading import load_chat

    serve(a.model, load=load_chat, host=a.host, port=a.port, slots=a.slots, max_len=a.max_len, max_queue=a.max_queue,
          dtype=a.dtype, allow_local_images=a.allow_local_images, max_images=a.max_images,
          max_image_pixels=a.max_image_pixels, quantize=a.quantize, group_size=a.group_size, attention=a.attention,
          api_key=a.api_key, max_body_mb=a.max_body_mb, prefix_cache_gb=a.prefix_cache_gb,
          image_cache_gb=a.image_cache_gb, mesh=a.mesh)


def _quantize_options(p: argparse.ArgumentParser, what: str) -> None:
    # Checked by the library (one-line errors), not by argparse choices.
    p.add_argument("--quantize", default=None, metavar="int8|int4",
                   help=f"{what}: int8 per output channel, int4 in groups along the contraction")
    p.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="int4 group size (default 128, or the largest power of two below it dividing the width)")


def _mesh_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default=None, metavar="MESH",
                   help="spread the model over this host's devices (all hosts' on a pod): tensor (what decoding "
                        "wants), fsdp, fsdp_tp, data, or sizes (tensor=4,data=2); default one device")


def _check_mesh(a) -> None:
    from idefics_jax.model.sharding import parse_mesh

    if a.mesh is not None:
        parse_mesh(a.mesh)


def _check_quantize_options(a) -> None:
    """The format before the model loads; whether a group size divides the widths is checked against the model's
    config when it loads, before any weight is read."""
    from idefics_jax.ops.quantize import check_format

    if a.quantize is not None:
        check_format(a.quantize)


def _eval(a):
    from idefics_jax.evaluate.runner import run
    from idefics_jax.train.loading import load_chat

    r = run(a.model, a.task, a.data, a.out or os.path.join("eval-out", a.task), limit=a.limit,
            batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, shard=a.shard, dtype=a.dtype,
            max_len=a.max_len, load=load_chat)
    print(json.dumps({k: r[k] for k in ("task", "metric", "score", "count")}))


def build_parser() -> argparse.ArgumentParser:
    from idefics_jax.evaluate.tasks import TASKS  # names only: no jax import

    p = argparse.ArgumentParser(prog="idefics-jax", description="Idefics2 / Idefics3 / SmolVLM in JAX.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    # --debug after the subcommand too; SUPPRESS keeps a --debug given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    parser = lambda name, **kw: sub.add_parser(name, parents=[common], **kw)  # noqa: E731
    c = parser("convert", help="HF safetensors directory or hub id -> Orbax checkpoint")
    c.add_argument("src", help="HF model directory (config.json + model.safetensors or shards), a hub id "
                               "(org/name[@revision]) or a preset name (smolvlm-256m)")
    c.add_argument("dst", help="output directory (must not exist)")
    c.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: the checkpoint's")
    _quantize_options(c, "store the matmul weights quantized")
    c.set_defaults(fn=_convert)
    e = parser("export", help="Orbax checkpoint -> HF safetensors directory")
    e.add_argument("src", help="checkpoint written by `idefics-jax convert`")
    e.add_argument("dst", help="output HF directory (must not exist)")
    e.set_defaults(fn=_export)
    t = parser("train", help="fine-tune with a shipped config or a YAML file (resumes from WORKDIR)")
    t.add_argument("config", nargs="?", help="a shipped config's name (see --list), or a YAML file")
    t.add_argument("--list", action="store_true", help="name the shipped configs and exit")
    t.add_argument("--dry-run", action="store_true",
                   help="compile the step for the config's mesh (no weights, no data): memory per device, fits or not")
    t.add_argument("--topology", default=None, metavar="SLICE",
                   help="with --dry-run: compile for this TPU slice (v5e-8, v6e-8, v4-8, v5p-8, v5e-256, v6e-256; "
                        "needs libtpu: the [aot] extra)")
    t.add_argument("overrides", nargs="*", help="key=value, nested with dots (optim.learning_rate=1e-4)")
    t.set_defaults(fn=_train)
    g = parser("generate", help="answer a prompt about images, streaming the text to stdout")
    g.add_argument("--model", default="tiny-shapes",
                   help="checkpoint directory (idefics-jax or HF), training WORKDIR, hub id (org/name[@revision]), "
                        "preset (smolvlm-256m) or shipped model (default: tiny-shapes)")
    g.add_argument("--image", action="append", default=[], metavar="PATH", help="image file or URL (repeatable)")
    g.add_argument("--video", action="append", default=[], metavar="FILE",
                   help="video file (SmolVLM2: sampled frames; repeatable)")
    g.add_argument("--prompt", required=True, help="the question or instruction")
    g.add_argument("--assistant-prefix", default=None, metavar="TEXT",
                   help="start the answer with TEXT; the model continues it")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=None, help="sample at this temperature (0: greedy)")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with this probability")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    g.add_argument("--json-schema", default=None, metavar="FILE", help="answer JSON that validates against this schema")
    g.add_argument("--regex", default=None, metavar="PATTERN", help="answer text that matches this regex")
    g.add_argument("--choice", action="append", default=[], metavar="TEXT",
                   help="answer exactly one of these (repeatable)")
    g.add_argument("--no-image-splitting", action="store_true", help="one tile per image (fewer image tokens)")
    g.add_argument("--longest-edge", type=int, default=None, metavar="PX", help="resize images to this longest edge")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: the checkpoint's")
    _quantize_options(g, "quantize the matmul weights while loading (a quantized checkpoint needs no flag)")
    g.add_argument("--attention", choices=["xla", "cudnn", "pallas"], default=None,
                   help="prompt attention backend (default: pallas on TPU, cudnn on GPU, xla on CPU)")
    _mesh_option(g)
    g.set_defaults(fn=_generate)
    s = parser("serve", help="OpenAI-compatible chat server with continuous batching, and a chat page at /")
    s.add_argument("--model", default="tiny-shapes", help="checkpoint or shipped model (default: tiny-shapes)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--slots", type=int, default=8, help="requests decoded together")
    s.add_argument("--max-len", type=int, default=None, help="cache positions per slot (prompt + answer)")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    s.add_argument("--prefix-cache-gb", type=float, default=1.0, help="device memory for cached prompt prefixes' "
                   "keys and values, reused by later requests (0: off)")
    s.add_argument("--image-cache-gb", type=float, default=0.25, help="device memory for encoded images (0: off)")
    s.add_argument("--allow-local-images", default=None, metavar="DIR", help="accept image paths under DIR")
    s.add_argument("--max-images", type=int, default=8, help="images per request")
    s.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="pixels per image")
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help="require Authorization: Bearer KEY (default: $IDEFICS_JAX_API_KEY; unset: open)")
    s.add_argument("--max-body-mb", type=float, default=64, help="request body limit in MB (413 above)")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: the checkpoint's")
    _quantize_options(s, "quantize the matmul weights while loading (a quantized checkpoint needs no flag)")
    s.add_argument("--attention", choices=["xla", "cudnn", "pallas"], default=None,
                   help="prompt attention backend (default: pallas on TPU, cudnn on GPU, xla on CPU)")
    _mesh_option(s)
    s.add_argument("--dry-run", action="store_true", help="compile the decode step (no weights): memory per device, "
                   "fits or not; with --topology also the estimated tokens/s")
    s.add_argument("--topology", default=None, metavar="SLICE",
                   help="with --dry-run: compile for this TPU slice (v5e-8, v6e-8, v4-8, v5p-8, v5e-256, v6e-256; "
                        "needs libtpu: the [aot] extra)")
    s.set_defaults(fn=_serve)
    v = parser("eval", help="score a model on a benchmark (vqav2, textvqa, docvqa, chartqa, mmmu, ...)")
    v.add_argument("--model", default="tiny-shapes", help="checkpoint directory or a shipped model's name")
    v.add_argument("--task", required=True, choices=list(TASKS))
    v.add_argument("--data", required=True, help="a hub dataset, org/name[@revision][:subset][:split], or a .jsonl "
                   "file, a .parquet file or a folder of parquet shards")
    v.add_argument("--limit", type=int, default=None, help="the first N samples only")
    v.add_argument("--batch-size", type=int, default=16, help="requests the serving engine decodes together")
    v.add_argument("--max-len", type=int, default=None,
                   help="cache positions per request (prompt + answer; default: the model's, at most 2048)")
    v.add_argument("--out", default=None, help="output folder (default eval-out/TASK); a partial one is resumed")
    v.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (lmms-eval's)")
    v.add_argument("--shard", default=None, metavar="I/N", help="this host's share (default: jax's process index)")
    v.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: the checkpoint's")
    v.set_defaults(fn=_eval)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"idefics-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"idefics-jax {args.command}: error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
