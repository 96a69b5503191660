"""SmolVLM2 video input: a generated clip whose frames differ, through Chat, generate and `idefics-jax generate
--video`; frames and their text as transformers' SmolVLM processor builds them; greedy tokens equal transformers'."""

from types import SimpleNamespace

import numpy as np
import pytest

import reference as testing

av = pytest.importorskip("av")
pytest.importorskip("num2words")

PROMPT = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]


def write_clip(path: str, n: int = 14, fps: int = 4) -> str:
    """A square crossing a white frame: every frame differs."""
    with av.open(path, "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            a = np.full((48, 64, 3), 255, np.uint8)
            a[8:32, 3 * i:3 * i + 16] = (200, 30, 30 + 15 * i)
            for packet in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


@pytest.fixture(scope="module")
def smolvlm(tmp_path_factory):
    """A random tiny SmolVLM (model_type smolvlm) HF checkpoint, weights large enough that answers depend on
    the input, and a clip."""
    d = tmp_path_factory.mktemp("smolvlm")
    path = testing.save_hf_checkpoint(str(d / "hf"), testing.tiny_config(model_type="smolvlm"), seed=2,
                                      weight_scale=8.0)
    return path, write_clip(str(d / "clip.mp4"))


@pytest.fixture(scope="module")
def chat(smolvlm):
    from idefics_jax.generation.chat import Chat

    return Chat.load(smolvlm[0], max_frames=4, fps=2.0)


def test_frames_and_text_are_transformers(chat, smolvlm):
    """The prompt is transformers' SmolVLM template with `<video>` expanded by its replace_video_token; the
    frames are the ones its sample_frames picks, each one tile, and they differ."""
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE, SmolVLMProcessor
    from transformers.video_utils import VideoMetadata

    from idefics_jax.generation import video

    clip = video.probe(smolvlm[1])
    assert (clip.total_frames, clip.fps) == (14, 4.0)
    indices = video.sample_indices(clip, 4, 2.0)
    assert list(indices) == [0, 4, 8, 13]
    inputs = chat.inputs(PROMPT, videos=[smolvlm[1]])
    p = chat.processor
    tok = p.tokenizer
    ns = SimpleNamespace(image_seq_len=p.image_seq_len, image_token="<image>",
                         fake_image_token="<fake_token_around_image>", global_image_token="<global-img>")
    meta = VideoMetadata(total_num_frames=14, fps=4.0, duration=3.5, frames_indices=indices)
    expanded = SmolVLMProcessor.replace_video_token(ns, {"pixel_values": np.zeros((1, 4)), "video_metadata": [meta]},
                                                    0)
    text = p.apply_chat_template(PROMPT, chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True)
    assert tok.decode(inputs["input_ids"][0]) == text.replace("<video>", expanded)
    px = inputs["pixel_values"][0]
    assert px.shape[0] == 4 and inputs["pixel_attention_mask"][0].all()  # 4 unsplit, unpadded tiles
    assert all(np.abs(px[i] - px[i + 1]).max() > 0.1 for i in range(3))


def test_video_greedy_tokens_equal_transformers(chat, smolvlm):
    import torch
    from transformers import AutoModelForImageTextToText

    from idefics_jax.generation.api import generate

    inputs = chat.inputs(PROMPT, videos=[smolvlm[1]])
    ours = generate(chat.model, **inputs, max_new_tokens=8)
    hf = AutoModelForImageTextToText.from_pretrained(smolvlm[0]).eval()
    assert type(hf).__name__ == "SmolVLMForConditionalGeneration"
    with torch.no_grad():
        theirs = hf.generate(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, do_sample=False,
                             max_new_tokens=8).numpy()
    assert ours.shape == theirs.shape and (ours == theirs).all()
    # The answer depends on the frames: the same question about the clip's first frame alone differs.
    still = chat.inputs([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What moves?"}]}],
                        images=[_first_frame(smolvlm[1])])
    assert not np.array_equal(generate(chat.model, **still, max_new_tokens=8)[0, -8:], ours[0, -8:])


def _first_frame(path):
    from idefics_jax.generation import video

    return video.read_frames(path, [0])[0]


def test_cli_generate_video(chat, smolvlm, capsys):
    from idefics_jax.cli import main

    assert main(["generate", "--model", smolvlm[0], "--video", smolvlm[1], "--prompt", "What moves?",
                 "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    # The CLI's Chat samples with the default 1 frame per second (3 frames here); the same through Python:
    from idefics_jax.generation.chat import Chat

    assert out.rstrip("\n") == Chat(chat.model, chat.processor)(PROMPT, videos=[smolvlm[1]], max_new_tokens=6)


def test_bad_video_is_one_line(smolvlm, tmp_path, capsys):
    from idefics_jax.cli import main

    (tmp_path / "x.mp4").write_bytes(b"not a video")
    for f, msg in ((str(tmp_path / "none.mp4"), "no such video file"), (str(tmp_path / "x.mp4"), "not a readable")):
        assert main(["generate", "--model", smolvlm[0], "--video", f, "--prompt", "q"]) == 1
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
