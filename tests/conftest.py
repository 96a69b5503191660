import os

import numpy as np
import pytest

from programs import QUICK_XLA

# Tests run on the CPU in fp32; full-precision matmuls keep parity tolerances meaningful. XLA's flags: programs.py.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", QUICK_XLA)
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import reference as testing  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """A random tiny Idefics3 HF checkpoint, one safetensors file."""
    return testing.save_hf_checkpoint(str(tmp_path_factory.mktemp("hf") / "tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_hf_sharded(tmp_path_factory):
    """The same architecture, other weights, saved as several shards with an index."""
    return testing.save_hf_checkpoint(str(tmp_path_factory.mktemp("hf") / "tiny-sharded"), seed=1,
                                      max_shard_size="60KB")


@pytest.fixture(scope="session")
def lively_hf(tmp_path_factory):
    """Same architecture and processor, larger random weights: the greedy output depends on the prompt and the
    rows of a batch say different things (at the default init a random model repeats one token)."""
    return testing.save_hf_checkpoint(str(tmp_path_factory.mktemp("hf") / "lively"), seed=1, weight_scale=8.0)


@pytest.fixture(scope="session")
def processor(tiny_hf):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_hf)


def chat(processor, n_images: int, text: str) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@pytest.fixture(scope="session")
def cases(processor):
    """Processor outputs (numpy) for the parity cases."""
    rng = np.random.default_rng(0)
    img = lambda h, w: testing.random_image(rng, h, w)  # noqa: E731
    out = {}
    # 50x70: resized to 46x64, split into 2x2 tiles of 32, the last row and column padded.
    out["one_image_split_padded"] = dict(processor(text=[chat(processor, 1, "what is this?")],
                                                   images=[[img(50, 70)]], return_tensors="np"))
    out["batch_1_and_2_images"] = dict(processor(
        text=[chat(processor, 1, "one?"), chat(processor, 2, "and these two images, what differs?")],
        images=[[img(40, 30)], [img(64, 64), img(20, 90)]], return_tensors="np", padding=True))
    out["text_only"] = dict(processor(text=["<|im_start|>User: hello, how are you?<end_of_utterance>\nAssistant:",
                                            "<|im_start|>User: hi<end_of_utterance>\nAssistant:"],
                                      return_tensors="np", padding=True))
    return out


def hf_logits(model, inputs) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}).logits.float().numpy()


def rel_err(a, b, attention_mask) -> float:
    """max |a - b| / max |b| over non-padded positions."""
    keep = np.asarray(attention_mask).astype(bool)
    return float(np.abs(a[keep] - b[keep]).max() / np.abs(b[keep]).max())


@pytest.fixture(scope="session")
def tiny2_hf(tmp_path_factory):
    """A random tiny Idefics2 HF checkpoint with its processor (image splitting on)."""
    return testing.save_hf_checkpoint(str(tmp_path_factory.mktemp("hf") / "tiny-idefics2"),
                                      testing.tiny_idefics2_config(), seed=0)


@pytest.fixture(scope="session")
def processor2(tiny2_hf):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny2_hf)


TEXT_ONLY = ["<|im_start|>User: hello, how are you?<end_of_utterance>\nAssistant:",
             "<|im_start|>User: hi<end_of_utterance>\nAssistant:"]


@pytest.fixture(scope="session")
def cases2(processor2):
    """Idefics2 processor outputs (numpy). Image sizes are not multiples of the patch, and the 4 crops are
    smaller than the original, so padded pixels cut through patches (where the all-pixels rule decides)."""
    rng = np.random.default_rng(0)
    img = lambda h, w: testing.random_image(rng, h, w)  # noqa: E731
    p = processor2
    return {
        # 30x45 -> original 21x32, crops 15x22 and 15x23, all padded to 21x32.
        "one_image_split": dict(p(text=[chat(p, 1, "what is this?")], images=[[img(30, 45)]], return_tensors="np")),
        "batch_1_and_2_images": dict(p(
            text=[chat(p, 1, "one?"), chat(p, 2, "and these two images, what differs?")],
            images=[[img(40, 26)], [img(64, 64), img(18, 90)]], return_tensors="np", padding=True)),
        "batch_image_and_no_image": dict(p(
            text=[chat(p, 1, "describe"), "<|im_start|>User: just text here<end_of_utterance>\nAssistant:"],
            images=[[img(50, 37)], []], return_tensors="np", padding=True)),
        "text_only": dict(p(text=TEXT_ONLY, return_tensors="np", padding=True)),
    }


def assert_same_hf_weights(path_a: str, path_b: str) -> None:
    """Two HF directories load into transformers with the same tensor names and bit-identical values."""
    import torch
    from transformers import AutoModelForImageTextToText

    a = AutoModelForImageTextToText.from_pretrained(path_a).state_dict()
    b = AutoModelForImageTextToText.from_pretrained(path_b).state_dict()
    assert set(a) == set(b)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory) -> dict:
    """One persistent compilation cache for the whole run: every test process (all xdist workers) and every
    program they start (through os.environ). The model's initialisation and train step take tens of seconds to
    compile here; the next process with the same program and flags loads it instead. The cache changes no result:
    it stores the executables a compile would produce."""
    root = tmp_path_factory.getbasetemp()
    folder = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "xla-cache"
    folder.mkdir(exist_ok=True)
    env = {"JAX_COMPILATION_CACHE_DIR": str(folder), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    os.environ.update(env)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return env


@pytest.fixture(scope="session")
def program_env(compilation_cache) -> dict:
    """Environment for the programs that tests start as users do (training runs, the CLI, notebook kernels): the
    CPU, one device, the tests' XLA flags and their compilation cache."""
    return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": QUICK_XLA, **compilation_cache}


# Scheduling for `pytest -n 2 --dist loadgroup --no-loadscope-reorder` (the README's command): a file's tests run on
# one worker, where its module fixtures (servers, trained models, the docs' interpreters) are built once, except
# for SPREAD, whose tests are independent programs that fill whichever worker is free. The files that take
# longest start first, so that no long one begins near the end; the rest keep their order.
SPREAD = ("test_bench_scripts.py",)
LONGEST_FIRST = ("test_docs.py", "test_sharding.py", "test_train.py", "test_train_faults.py", "test_quantize.py",
                 "test_serve.py", "test_install.py", "test_generate.py", "test_eval.py", "test_posttrain.py",
                 "test_prompt_cache.py", "test_heap.py", "test_train_watch.py", "test_multihost.py")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name not in SPREAD:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
