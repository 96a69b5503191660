"""Video input for SmolVLM2: a clip -> sampled frames and the text that introduces them, as transformers'
SmolVLM processor builds them.

    frames, text = video_frames("clip.mp4", max_frames=64, fps=1.0, size=512)

Frames are chosen by transformers' own `SmolVLMVideoProcessor.sample_frames` (up to `max_frames` at `fps`
frames per second, the first and last second skipped in long clips) and introduced by the text of
`SmolVLMProcessor.replace_video_token`: "You are provided the following series of {n} frames from a {H:MM:SS}
[H:MM:SS] video." then "\\nFrame from MM:SS:" before each frame. Each frame is then one unsplit image, squashed to
the model's square tile as the video processor does. transformers' video processor itself needs torchvision
(which has no CPU build for this torch on PyPI), so the frames are resized here with PIL (Lanczos, the video
processor's resampling); decoding is PyAV's (`pip install av`).
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta

import numpy as np

# SmolVLM2's video_processor defaults (preprocessor_config.json "video_sampling"): at most 64 frames, 1 per second.
MAX_FRAMES, FPS = 64, 1.0


@dataclasses.dataclass(frozen=True)
class Clip:
    total_frames: int
    fps: float

    @property
    def duration(self) -> float:
        return self.total_frames / self.fps


def probe(path: str) -> Clip:
    """Frame count and rate of the first video stream of `path` (a one-line error for anything else)."""
    av = _av()
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such video file")
    try:
        with av.open(path) as c:
            if not c.streams.video:
                raise ValueError(f"{path}: has no video stream")
            s = c.streams.video[0]
            fps = float(s.average_rate or s.guessed_rate or 0) or 24.0
            n = s.frames or sum(1 for _ in c.decode(s))
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: not a readable video ({e})") from None
    if n < 1:
        raise ValueError(f"{path}: the video has no frames")
    return Clip(int(n), fps)


def _av():
    try:
        import av
    except ImportError:
        raise ValueError("reading video files needs PyAV (a dependency of idefics-jax): pip install av") from None
    return av


def sample_indices(clip: Clip, max_frames: int = MAX_FRAMES, fps: float = FPS) -> np.ndarray:
    """The frame indices SmolVLM samples: transformers' SmolVLMVideoProcessor.sample_frames (a pure function of
    the clip's metadata; called unbound since the class needs torchvision to be built)."""
    from types import SimpleNamespace

    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
    from transformers.video_utils import VideoMetadata

    meta = VideoMetadata(total_num_frames=clip.total_frames, fps=clip.fps, duration=clip.duration)
    return SmolVLMVideoProcessor.sample_frames(SimpleNamespace(num_frames=max_frames, fps=fps), meta)


def read_frames(path: str, indices) -> list:
    """The frames at `indices` of `path` as RGB PIL images."""
    av = _av()
    wanted, out = set(int(i) for i in indices), {}
    with av.open(path) as c:
        for i, frame in enumerate(c.decode(c.streams.video[0])):
            if i in wanted:
                out[i] = frame.to_image().convert("RGB")
            if len(out) == len(wanted):
                break
    return [out[int(i)] for i in indices if int(i) in out]


def intro_and_stamps(n_frames: int, duration: float, timestamps) -> tuple[str, list[str], str]:
    """The text before the frames, the text before each frame, the text after them: transformers' SmolVLM
    processor's strings (DEFAULT_VIDEO_INTRO, FRAME_TIMESTAMP_MESSAGE, DEFAULT_MEDIA_OUTTRO)."""
    from num2words import num2words
    from transformers.models.smolvlm import processing_smolvlm as p

    intro = p.DEFAULT_VIDEO_INTRO.format(frame_count=num2words(n_frames),
                                         video_duration=str(timedelta(seconds=int(duration))))
    stamps = [p.FRAME_TIMESTAMP_MESSAGE.format(timestamp=f"{int(t // 60):02d}:{int(t % 60):02d}")
              for t in timestamps]
    return intro, stamps, p.DEFAULT_MEDIA_OUTTRO


def video_frames(path: str, *, size: int, max_frames: int = MAX_FRAMES, fps: float = FPS):
    """(frames as `size` x `size` RGB PIL images, chat content entries that stand for the video: its text and
    one image entry per frame)."""
    from PIL import Image

    clip = probe(path)
    indices = sample_indices(clip, max_frames, fps)
    frames = read_frames(path, indices)
    # The video processor squashes every frame to the square tile (aspect ratio not kept) before normalising.
    frames = [f.resize((size, size), Image.Resampling.LANCZOS) for f in frames]
    intro, stamps, outro = intro_and_stamps(len(frames), clip.duration, [i / clip.fps for i in indices])
    content = [{"type": "text", "text": intro}]
    for s in stamps:
        content += [{"type": "text", "text": s}, {"type": "image"}]
    content.append({"type": "text", "text": outro})
    return frames, content
