"""The one progress line of conversion, export and training: in place on a terminal, bounded lines elsewhere."""

from __future__ import annotations

import io

from idefics_jax.runtime import progress as progress_lib
from idefics_jax.runtime.progress import Progress, bytes_progress


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(monkeypatch, tty: bool, steps: int = 100, dt: float = 1.0, **kw) -> str:
    clock = Clock()
    monkeypatch.setattr(progress_lib.time, "perf_counter", clock)
    out = Stream(tty)
    p = Progress("training", steps, unit="steps", rate=False, file=out, **kw)
    for i in range(1, steps + 1):
        clock.now += dt
        p.set(i, f"loss {1 / i:.4f}")
    p.close()
    return out.getvalue()


def test_terminal_rewrites_one_line_in_place(monkeypatch):
    text = run(monkeypatch, tty=True)
    assert text.count("\r") == 100 and text.count("\n") == 1 and text.endswith("\n")
    assert text.rsplit("\r", 1)[1] == "training: 100% (100 / 100 steps) loss 0.0100\n"


def test_a_log_gets_whole_lines_at_a_bounded_rate(monkeypatch):
    text = run(monkeypatch, tty=False, interval=10.0)  # 100 updates one second apart
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 11  # the first, one every 10 s, the last
    assert lines[0] == "training:   1% (1 / 100 steps) loss 1.0000"
    assert lines[-1] == "training: 100% (100 / 100 steps) loss 0.0100"
    # Fast updates: the first and the last only, however many there are.
    assert len(run(monkeypatch, tty=False, steps=10_000, dt=1e-4).splitlines()) == 2


def test_close_ends_an_interrupted_terminal_line(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress_lib.time, "perf_counter", clock)
    out = Stream(tty=True)
    p = Progress("training", 10, file=out)
    p.set(3)
    p.close()
    p.close()  # once
    assert out.getvalue().endswith("\n") and out.getvalue().count("\n") == 1


def test_bytes_and_disabled(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress_lib.time, "perf_counter", clock)
    out = Stream(tty=False)
    p = bytes_progress("converting", 3 * 2**20)
    p.file, p.tty = out, False
    clock.now = 2.0
    p.update(3 * 2**20)
    assert out.getvalue() == "converting: 100% (3.0 / 3.0 MiB, 1.5 MiB/s)\n"  # two digits below 10 / s
    fast = Progress("evaluating", 400, unit="samples", file=Stream(tty=False))
    clock.now = 4.0
    fast.set(400)
    assert fast.file.getvalue() == "evaluating: 100% (400 / 400 samples, 200 samples/s)\n"  # whole numbers above
    quiet = Progress("x", 5, enabled=False, file=out)
    quiet.update(5)
    assert quiet.done == 5 and out.getvalue().count("\n") == 1
