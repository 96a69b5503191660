"""Whatever image file a user hands the chat helper or the CLI is converted and answered, or refused in one line
that names the file; and generation arguments that cannot be right are refused before any device work."""

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import idefics_jax
from idefics_jax import cli
from idefics_jax.generation.chat import Chat, load_image

RED = (200, 30, 40)


def _rgb(h=30, w=40):
    a = np.zeros((h, w, 3), np.uint8)
    a[:] = RED
    a[:, : w // 2] = (20, 90, 250)
    return Image.fromarray(a)


def _write(tmp_path, name, make):
    path = tmp_path / name
    make(path)
    return str(path)


# name -> (writer, the RGB value load_image must give at pixel (0, 0))
CONVERTIBLE = {
    "gray.png": (lambda p: _rgb().convert("L").save(p), None),
    "rgba.png": (lambda p: Image.new("RGBA", (40, 30), (200, 30, 40, 0)).save(p), (255, 255, 255)),
    "half_alpha.png": (lambda p: Image.new("RGBA", (40, 30), (0, 0, 0, 128)).save(p), (127, 127, 127)),
    "cmyk.jpg": (lambda p: _rgb().convert("CMYK").save(p, quality=100), None),
    "palette.png": (lambda p: _rgb().convert("P", palette=Image.ADAPTIVE, colors=4).save(p), (20, 90, 250)),
    "palette_transparent.gif": (lambda p: Image.new("P", (40, 30), 0).save(p, transparency=0), (255, 255, 255)),
    "gray16.png": (lambda p: Image.fromarray(np.full((30, 40), 32896, np.uint16)).save(p), (128, 128, 128)),
    "one_pixel.png": (lambda p: Image.new("RGB", (1, 1), RED).save(p), RED),
    "bilevel.png": (lambda p: Image.new("1", (40, 30), 1).save(p), (255, 255, 255)),
}


@pytest.fixture(scope="module")
def chat(lively_hf):
    return Chat.load(lively_hf)


@pytest.mark.parametrize("name", sorted(CONVERTIBLE))
def test_image_modes_are_converted_and_answered(chat, tmp_path, name):
    make, expected = CONVERTIBLE[name]
    path = _write(tmp_path, name, make)
    img = load_image(path)
    assert img.mode == "RGB"
    if expected is not None:
        assert np.abs(np.asarray(img, int)[0, 0] - expected).max() <= 2, np.asarray(img)[0, 0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    inputs = chat.inputs(messages, [path])
    ids = idefics_jax.generate(chat.model, **inputs, max_new_tokens=3, eos_token_id=[])
    assert ids.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert chat(messages, [path], max_new_tokens=3, eos_token_id=[]) == chat.processor.tokenizer.decode(
        ids[0, -3:].tolist(), skip_special_tokens=True)


def test_cmyk_and_gray_keep_their_colours(tmp_path):
    ref = np.asarray(_rgb(), int)
    gray = np.asarray(load_image(_write(tmp_path, "g.png", CONVERTIBLE["gray.png"][0])), int)
    assert np.abs(gray - np.asarray(_rgb().convert("L").convert("RGB"), int)).max() == 0
    cmyk = np.asarray(load_image(_write(tmp_path, "c.jpg", CONVERTIBLE["cmyk.jpg"][0])), int)
    assert np.abs(cmyk - ref).mean() < 8  # JPEG round trip through CMYK, not a colour inversion


def test_huge_image_is_answered(chat, tmp_path):
    path = str(tmp_path / "huge.png")
    Image.new("RGB", (10000, 10000), RED).save(path, compress_level=1)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    inputs = chat.inputs(messages, [path])
    assert inputs["pixel_values"].shape[-2:] == (32, 32)  # resized by the processor like any image
    assert isinstance(chat(messages, [path], max_new_tokens=2), str)


def _truncated_jpeg(p):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(buf, "JPEG")
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


BROKEN = {
    "truncated.jpg": (_truncated_jpeg, ValueError, r"truncated\.jpg: truncated or corrupt JPEG file"),
    "notes.txt": (lambda p: p.write_text("not an image at all\n"), ValueError, r"notes\.txt: not an image file"),
    "empty.png": (lambda p: p.write_bytes(b""), ValueError, r"empty\.png: not an image file"),
    "a_directory": (lambda p: p.mkdir(), ValueError, r"a_directory: is a directory"),
    "missing.png": (lambda p: None, FileNotFoundError, r"missing\.png: no such image file"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_image_files_are_refused_in_one_line(chat, tmp_path, capsys, lively_hf, name):
    make, error, message = BROKEN[name]
    path = _write(tmp_path, name, make)
    with pytest.raises(error, match=message):
        load_image(path)
    argv = ["generate", "--model", lively_hf, "--image", path, "--prompt", "What?", "--max-new-tokens", "2"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("idefics-jax generate: error: ") and name in err, err


def test_a_pil_image_of_any_mode_is_accepted():
    assert load_image(_rgb().convert("LA")).mode == "RGB"
    with pytest.raises(ValueError, match="PIL images, paths or URLs; got int"):
        load_image(3)


@pytest.fixture
def no_device_work(monkeypatch):
    """"Before any device work": the jitted prefill fails the test if it is reached."""
    from idefics_jax.generation import decode

    monkeypatch.setattr(decode, "prefill", lambda *a, **k: pytest.fail("prefill ran"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), "max_new_tokens must be a positive integer; got -1"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer; got 0"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be a positive integer; got 2.5"),
    (dict(max_new_tokens=2, min_new_tokens=-1), "min_new_tokens must be an integer >= 0"),
    (dict(max_new_tokens=2, do_sample=True, temperature=0.0), "temperature must be a finite number > 0"),
    (dict(max_new_tokens=2, do_sample=True, temperature=-1.0), "temperature must be a finite number > 0"),
    (dict(max_new_tokens=2, do_sample=True, temperature=float("nan")), "temperature must be a finite number > 0"),
    (dict(max_new_tokens=2, do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=2, do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=2, do_sample=True, top_k=0), "top_k must be an integer >= 1"),
    (dict(max_new_tokens=2, seed="x"), "seed must be an integer"),
])
def test_bad_generation_arguments(chat, cases, no_device_work, kwargs, message):
    with pytest.raises(ValueError, match=message):
        idefics_jax.generate(chat.model, **cases["text_only"], **kwargs)


def test_prompt_longer_than_the_positions(chat, no_device_work):
    ids = np.full((1, chat.model.config.text.max_position_embeddings + 1), 7, np.int32)
    with pytest.raises(ValueError, match=r"the prompt has 513 tokens but the model has 512 positions"):
        idefics_jax.generate(chat.model, ids, max_new_tokens=1)


def test_cli_refuses_a_negative_temperature(lively_hf, capsys):
    assert cli.main(["generate", "--model", lively_hf, "--prompt", "hi", "--temperature", "-1"]) == 1
    assert "temperature" in capsys.readouterr().err


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16"]


@st.composite
def image_files(draw):
    mode = draw(st.sampled_from(MODES))
    w, h = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**16))
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 4), np.uint8)
    img = Image.fromarray(a, "RGBA").convert("RGB" if mode in ("I;16", "CMYK") else mode)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257)
    return img, ("JPEG" if mode == "CMYK" else "PNG")


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(image_files(), min_size=1, max_size=3), split=st.booleans())
def test_any_image_files_give_consistent_model_inputs(chat, tmp_path, files, split):
    """Random sizes, modes and image counts through the chat path: one image-token run of image_seq_len per
    sub-image, pixel values finite, and the model's own input checks pass."""
    from idefics_jax.model.idefics import check_inputs

    paths = []
    for i, (img, fmt) in enumerate(files):
        paths.append(str(tmp_path / f"{i}.{fmt.lower()}"))
        img.save(paths[-1], fmt)
    c = Chat(chat.model, chat.processor, do_image_splitting=split)
    content = [{"type": "image"}] * len(paths) + [{"type": "text", "text": "Describe."}]
    inputs = c.inputs([{"role": "user", "content": content}], paths)
    check_inputs(chat.model.config, **inputs)
    pv = inputs["pixel_values"]
    real = pv.reshape(pv.shape[0], pv.shape[1], -1).any(axis=-1).sum()
    assert (inputs["input_ids"] == chat.model.config.image_token_id).sum() == real * chat.model.config.image_seq_len
    assert np.isfinite(pv).all() and (split or pv.shape[1] == len(paths))
