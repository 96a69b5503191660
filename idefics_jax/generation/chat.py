"""Chat: a model with its checkpoint's own processor and chat template; messages and images in, answer text out.

    chat = Chat.load("smolvlm-256m-orbax")
    print(chat("What is this?", images=["statue.jpg"]))  # a string: one user turn, the images before the text
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    print(chat(messages, images=["statue.jpg"], max_new_tokens=200))
    print(chat(messages + [{"role": "assistant", "content": "Let's look step by step:"}], images=["statue.jpg"]))
    # ^ a final assistant message is continued: its text starts the answer (the answer returned follows it)
    for piece in chat.stream(messages, images=["statue.jpg"]):
        print(piece, end="", flush=True)
    chat.answers([(user_turn("What is this?", 1), ["a.jpg"]), (user_turn("And this?", 1), ["b.jpg"])])
    chat([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
         videos=["clip.mp4"])  # SmolVLM2: sampled frames (idefics_jax.generation.video)
    chat.send("What is this?", images=["statue.jpg"])   # a conversation: each turn runs only its new tokens
    chat.send("Where could it be?")
    chat.reset()
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np

from idefics_jax.checkpoints.registry import resolve
from idefics_jax.checkpoints.load import load_pretrained
from idefics_jax.generation.api import generate, generate_stream
from idefics_jax.generation.cache import PromptCache
from idefics_jax.generation.images import load_image
from idefics_jax.generation.prompt import Tokens
from idefics_jax.generation.structured import Grammars
from idefics_jax.model.idefics import IdeficsModel
from idefics_jax.checkpoints.paths import local_side_files
from idefics_jax.generation.video import FPS, MAX_FRAMES, video_frames

# Content keys transformers' chat templates accept for an image given inline.
_IMAGE_KEYS = ("image", "url", "path")


def user_turn(text: str, n_images: int = 0) -> list[dict]:
    """One user message: `n_images` image entries, then `text`."""
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def _files(value, name: str, what: str, pil: bool) -> list | None:
    """`value` (None or a list of images / video files) as a list, or a one-line TypeError naming `name`."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, os.PathLike)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of {what}; got {type(value).__name__} (one goes in a list: [x])")
    import PIL.Image

    kinds = (str, os.PathLike, PIL.Image.Image) if pil else (str, os.PathLike)
    for i, item in enumerate(value):
        if not isinstance(item, kinds):
            raise TypeError(f"{name}[{i}] must be one of {what}; got {type(item).__name__}")
    return list(value)


def _messages(messages, name: str, n_images: int, n_videos: int) -> list[dict]:
    """`messages` as a list of message dicts whose content is a list of entries. A string is one user turn: a
    video entry per video, an image entry per image, then the text. A message's string content becomes one text
    entry (the chat templates iterate the content). Other types: a one-line TypeError naming `name`."""
    if isinstance(messages, str):
        return [{"role": "user", "content": [{"type": "video"}] * n_videos + [{"type": "image"}] * n_images
                 + [{"type": "text", "text": messages}]}]
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"{name} must be a string (one user turn) or a list of {{'role', 'content'}} dicts; "
                        f"got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise TypeError(f"{name}[{i}] must be a dict with a 'role' string and a 'content'; "
                            f"got {type(m).__name__ if not isinstance(m, dict) else sorted(m)}")
        content = m["content"]
        if isinstance(content, str):
            m = {**m, "content": [{"type": "text", "text": content}]}
        elif not isinstance(content, (list, tuple)):
            raise TypeError(f"{name}[{i}]['content'] must be a string or a list of entries; got "
                            f"{type(content).__name__}")
        else:
            for j, item in enumerate(content):
                if not isinstance(item, dict) or not isinstance(item.get("type"), str):
                    raise TypeError(f"{name}[{i}]['content'][{j}] must be a dict with a 'type' "
                                    f"('text', 'image' or 'video'); got {item!r:.80}")
            m = {**m, "content": list(content)}
        out.append(m)
    return out


def _conversation(messages, images, videos=None, name: str = "") -> tuple[list[dict], list | None, list | None]:
    """(messages, images, videos) as `Chat` takes them, checked and normalised (see `_messages`); `name` prefixes
    the argument names in errors (a batch's row)."""
    images = _files(images, f"{name}images", "images (PIL images, paths or URLs)", pil=True)
    videos = _files(videos, f"{name}videos", "video files (paths)", pil=False)
    messages = _messages(messages, f"{name}messages", len(images or ()), len(videos or ()))
    return messages, images, videos


def _image_slots(messages: list[dict], kind: str = "image") -> int:
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for item in m["content"] if item.get("type") == kind)


def _visual(messages: list[dict]) -> bool:
    return bool(_image_slots(messages) or _image_slots(messages, "video"))


def _conversations(conversations) -> list[tuple[list[dict], list | None, list | None]]:
    """Each (messages, images) or (messages, images, videos) row checked and normalised (`_conversation`)."""
    if isinstance(conversations, (str, dict)) or not isinstance(conversations, Sequence):
        raise TypeError(f"conversations must be a list of (messages, images) tuples; got "
                        f"{type(conversations).__name__}")
    out = []
    for i, row in enumerate(conversations):
        if not isinstance(row, (tuple, list)) or len(row) not in (2, 3):
            raise TypeError(f"conversations[{i}] must be a (messages, images) or (messages, images, videos) tuple; "
                            f"got {type(row).__name__}{f' of {len(row)}' if isinstance(row, (tuple, list)) else ''}")
        out.append(_conversation(*row, name=f"conversations[{i}]: "))
    return out


def _template_options(messages: list[dict], add_generation_prompt: bool | None,
                      continue_final_message: bool | None) -> dict[str, bool]:
    """apply_chat_template's two options for `messages`: by default a final assistant message is continued and
    anything else gets the generation prompt (see `Chat.batch_inputs`)."""
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
    if continue_final_message is None:
        continue_final_message = add_generation_prompt is None and bool(messages) and \
            messages[-1].get("role") == "assistant"
    if add_generation_prompt is None:
        add_generation_prompt = not continue_final_message
    return {"add_generation_prompt": bool(add_generation_prompt), "continue_final_message": continue_final_message}


class Chat:
    """`model` plus `processor` (the checkpoint's, with its chat template). Images are PIL images, paths or URLs,
    one per `{"type": "image"}` entry of `messages`, in order; they may also sit in those entries under "image",
    "url" or "path". `do_image_splitting` / `longest_edge` override the processor's image resizing.

    Videos (SmolVLM2) are files, one per `{"type": "video"}` entry (or under its "video" / "path" key): up to
    `max_frames` frames at `fps` per second (default: the processor's video settings, else SmolVLM2's 64 and 1),
    each an unsplit image; a conversation with a video has all its images unsplit, as transformers does."""

    def __init__(self, model: IdeficsModel, processor, *, do_image_splitting: bool | None = None,
                 longest_edge: int | None = None, max_frames: int | None = None, fps: float | None = None):
        self.model, self.processor = model, processor
        vp = getattr(processor, "video_processor", None)
        self.max_frames = max_frames or getattr(vp, "num_frames", None) or MAX_FRAMES
        self.fps = fps or getattr(vp, "fps", None) or FPS
        self.image_kwargs: dict[str, Any] = {}
        if do_image_splitting is not None:
            self.image_kwargs["do_image_splitting"] = do_image_splitting
        if longest_edge is not None:
            self.image_kwargs["size"] = {"longest_edge": int(longest_edge)}
        self._grammars: Grammars | None = None
        self.history: list[dict] = []  # the conversation `send` continues, and its images in order
        self.history_images: list = []
        self.cache: PromptCache | None = None  # made by the first `send`; yours if set before

    @property
    def grammars(self) -> Grammars:
        """Response formats compiled for this tokenizer (`generation.structured`), built on first use."""
        if self._grammars is None:
            self._grammars = Grammars(self.processor.tokenizer, self.model.config.text.vocab_size,
                                      Tokens.of(self.model).eos)
        return self._grammars

    def _format(self, kwargs: dict) -> dict:
        """`response_format` compiled (a ValueError names what is wrong with it), before anything runs."""
        if kwargs.get("response_format") is not None:
            kwargs = {**kwargs, "response_format": self.grammars.compile(kwargs["response_format"])}
        return kwargs

    @classmethod
    def load(cls, path: str, *, dtype=None, do_image_splitting: bool | None = None,
             longest_edge: int | None = None, max_frames: int | None = None, fps: float | None = None,
             quantize: str | None = None, group_size: int | None = None, attention: str | None = None,
             mesh=None) -> "Chat":
        """The model and processor of a checkpoint directory (an `idefics-jax convert` output or an HF one), a
        shipped model ("tiny-shapes"), a preset ("smolvlm-256m") or a hub id ("org/name[@revision]");
        `quantize` / `group_size` / `attention` as in `load_pretrained`. `mesh`: spread the model over all
        devices, a mesh shape (`sharding.parse_mesh`: "tensor", "data=2,tensor=4"; or a `MeshShape`) or a `Mesh`;
        None: one device."""
        from jax.sharding import Mesh
        from transformers import AutoProcessor

        from idefics_jax.model import sharding

        if isinstance(mesh, str):
            mesh = sharding.parse_mesh(mesh)
        if mesh is not None and not isinstance(mesh, Mesh):
            mesh = sharding.make_mesh(mesh)
        path = resolve(path)
        model = load_pretrained(path, dtype=dtype, quantize=quantize, group_size=group_size, attention=attention,
                                mesh=mesh)
        return cls(model, AutoProcessor.from_pretrained(local_side_files(path)), do_image_splitting=do_image_splitting,
                   longest_edge=longest_edge, max_frames=max_frames, fps=fps)

    def _images(self, messages: list[dict], images: Sequence[Any] | None) -> list:
        n_slots = _image_slots(messages)
        if images is None:
            images = [next(item[k] for k in _IMAGE_KEYS if k in item)
                      for m in messages if isinstance(m.get("content"), list)
                      for item in m["content"] if item.get("type") == "image" and any(k in item for k in _IMAGE_KEYS)]
        if len(images) != n_slots:
            raise ValueError(f"messages have {n_slots} image entries but {len(images)} images were given")
        return [load_image(i) for i in images]

    def _with_videos(self, messages: list[dict], images: list, videos: Sequence[str] | None) -> tuple[list, list]:
        """`messages` with each video entry replaced by its text and frame entries; the images in content order."""
        n = _image_slots(messages, "video")
        if videos is None:
            videos = [next(item[k] for k in ("video", "path", "url") if k in item)
                      for m in messages if isinstance(m.get("content"), list)
                      for item in m["content"] if item.get("type") == "video" and
                      any(k in item for k in ("video", "path", "url"))]
        if len(videos) != n:
            raise ValueError(f"messages have {n} video entries but {len(videos)} videos were given")
        if not n:
            return messages, images
        size = self.processor.image_processor.max_image_size["longest_edge"]
        it_img, it_vid, out_msgs, out_imgs = iter(images), iter(videos), [], []
        for m in messages:
            if not isinstance(m.get("content"), list):
                out_msgs.append(m)
                continue
            content = []
            for item in m["content"]:
                if item.get("type") == "video":
                    frames, entries = video_frames(str(next(it_vid)), size=size, max_frames=self.max_frames,
                                                   fps=self.fps)
                    content += entries
                    out_imgs += frames
                else:
                    content.append({"type": "image"} if item.get("type") == "image" else item)
                    if item.get("type") == "image":
                        out_imgs.append(next(it_img))
            out_msgs.append({**m, "content": content})
        return out_msgs, out_imgs

    def inputs(self, messages: str | list[dict], images: Sequence[Any] | None = None,
               videos: Sequence[str] | None = None, **template) -> dict[str, np.ndarray]:
        """The processor's numpy inputs for `messages` (a list of message dicts, or a string: one user turn with
        `images` and `videos` before its text), ready for the answer (see `batch_inputs`): input_ids (1, T),
        pixel_values (1, I, 3, H, W) and masks."""
        return self.batch_inputs([_conversation(messages, images, videos)], **template)

    def batch_inputs(self, conversations: Sequence[tuple], *, add_generation_prompt: bool | None = None,
                     continue_final_message: bool | None = None) -> dict[str, np.ndarray]:
        """One left-padded batch of (messages, images) or (messages, images, videos) conversations (messages as in
        `inputs`): input_ids (B, T), pixel_values (B, I, 3, H, W) and masks. Either every conversation has images
        (or videos) or none has.

        A conversation that ends with an assistant message is continued: its text is the start of the answer
        (transformers' `continue_final_message=True`); any other gets the generation prompt. The two options,
        as transformers and vLLM name them, override that for every conversation (`add_generation_prompt=True`
        closes a final assistant message and opens a new one)."""
        prompts, images, has_video = [], [], False
        for messages, imgs, videos in _conversations(conversations):
            has_video |= bool(_image_slots(messages, "video"))
            messages, loaded = self._with_videos(messages, self._images(messages, imgs), videos)
            images.append(loaded)
            prompts.append(self.processor.apply_chat_template(
                messages, **_template_options(messages, add_generation_prompt, continue_final_message)))
        if any(images) and not all(images):
            raise ValueError("batch_inputs: some conversations have images and some do not; batch them apart")
        kw = dict(images=images, **self.image_kwargs) if images[0] else {}
        if has_video:  # video frames are single tiles (transformers: "videos are always processed without splitting")
            kw["do_image_splitting"] = False
        return dict(self.processor(text=prompts, return_tensors="np", padding=True, padding_side="left", **kw))

    def answers(self, conversations: Sequence[tuple[list[dict], Sequence[Any] | None]], *, max_new_tokens: int = 256,
                batch_size: int = 32, **generate_kwargs) -> list[str]:
        """The answer to each (messages, images) conversation, generated `batch_size` at a time."""
        conversations = _conversations(conversations)
        generate_kwargs = self._format(generate_kwargs)
        out: list[str] = [""] * len(conversations)
        for start in range(0, len(conversations), batch_size):
            rows = range(start, min(start + batch_size, len(conversations)))
            # The processor takes a batch whose rows all have images or none.
            for group in ([i for i in rows if _visual(conversations[i][0])],
                          [i for i in rows if not _visual(conversations[i][0])]):
                if group:
                    inputs = self.batch_inputs([conversations[i] for i in group])
                    new = generate(self.model, **inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
                    for i, text in zip(group, self.decode(new[:, inputs["input_ids"].shape[1]:])):
                        out[i] = text
        return out

    def decode(self, tokens_BT) -> list[str]:
        """Generated token rows -> text, special tokens (end of utterance, padding) dropped, stripped."""
        return [self.processor.tokenizer.decode(np.asarray(row).tolist(), skip_special_tokens=True).strip()
                for row in tokens_BT]

    def stream(self, messages: str | list[dict], images: Sequence[Any] | None = None, *,
               videos: Sequence[str] | None = None, max_new_tokens: int = 256, **generate_kwargs) -> Iterator[str]:
        """Yields the answer text piece by piece as tokens are produced (special tokens dropped); `messages`,
        `images` and `videos` as in `inputs`. `response_format` (a JSON schema, any JSON object, a regex or a fixed
        choice, see `generation.structured`) constrains the answer, here and in `__call__` and `answers`."""
        generate_kwargs = self._format(generate_kwargs)
        tok = self.processor.tokenizer
        new: list[int] = []
        shown = ""
        for chunk in generate_stream(self.model, **self.inputs(messages, images, videos), max_new_tokens=max_new_tokens,
                                     **generate_kwargs):
            new.extend(int(t) for t in chunk[0])
            text = tok.decode(new, skip_special_tokens=True)
            # A character split over tokens decodes to U+FFFD until its last byte arrives: wait for it. Text
            # already shown is never taken back.
            if not text.endswith("\ufffd") and len(text) > len(shown) and text.startswith(shown):
                yield text[len(shown):]
                shown = text

    def send(self, message: str | list[dict], images: Sequence[Any] | None = None, *, max_new_tokens: int = 256,
             **generate_kwargs) -> str:
        """One turn of the conversation in `history`: `message` (a string: a user turn with `images` before its
        text; or message dicts) is added, the answer to the whole conversation generated, added and returned
        (stripped). The conversation's keys and values and its images' features stay in `cache` between turns
        (`generation.cache.PromptCache`; by default up to one conversation of the model's positions, at most
        1 GiB, and 0.25 GiB of image features), so a turn runs only its new tokens: the answer is the one
        `chat(history)` gives from scratch. `reset()` starts a new conversation."""
        messages, images, videos = _conversation(message, images)
        if videos or _image_slots(messages, "video"):
            raise ValueError("send takes images, not videos; use chat(messages, videos=...)")
        images = self.history_images + self._images(messages, images)
        messages = self.history + messages
        if self.cache is None:
            self.cache = PromptCache(self.model, prefix_cache_gb=PromptCache.conversation_gb(self.model),
                                     image_cache_gb=0.25)
        new = np.concatenate(list(generate_stream(
            self.model, **self.inputs(messages, images or None), max_new_tokens=max_new_tokens,
            chunk_size=max_new_tokens, cache=self.cache, **generate_kwargs)), axis=1)
        text = self.processor.tokenizer.decode(new[0].tolist(), skip_special_tokens=True).strip()
        self.history = messages + [{"role": "assistant", "content": [{"type": "text", "text": text}]}]
        self.history_images = images
        return text

    def reset(self) -> None:
        """Starts a new conversation for `send` (the cache stays: a new one may share its prefixes)."""
        self.history, self.history_images = [], []

    def __call__(self, messages: str | list[dict], images: Sequence[Any] | None = None, *,
                 videos: Sequence[str] | None = None, max_new_tokens: int = 256, **generate_kwargs) -> str:
        """The answer text to `messages` (a string: one user turn with `images` and `videos` before its text; or a
        list of message dicts)."""
        generate_kwargs = self._format(generate_kwargs)
        new = np.concatenate(list(generate_stream(
            self.model, **self.inputs(messages, images, videos), max_new_tokens=max_new_tokens,
            chunk_size=max_new_tokens, **generate_kwargs)), axis=1)
        return self.processor.tokenizer.decode(new[0].tolist(), skip_special_tokens=True)
