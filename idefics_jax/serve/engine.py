"""The continuous-batching engine (a library, no HTTP): requests in, streamed text out, many decoding at once.

One background thread owns the device and drives a `SlotDecoder`: every round it prefills waiting requests into
free slots, then decodes every active slot a few steps together; a slot whose request ended (eos, max tokens, a
stop string, a cancel) is refilled from the queue at once. Callers on any thread talk to it through thread-safe
queues:

    engine = Engine(model, processor, slots=8, max_len=1024)    # or Engine(model, chat) with a Chat
    with engine:                                                 # starts the thread; stops it (draining) at exit
        h = engine.submit(Request(user_turn("What is this?", 1), images=["a.png"], max_tokens=64))
        for piece in h:                                          # text as it is produced
            print(piece, end="", flush=True)
        r = h.result()   # Result: text, tokens, finish_reason ("stop" / "length" / "cancelled"), usage, times
        texts = engine.answer_all([(user_turn("Shape?", 1), ["a.png"]), ...], max_tokens=32)   # greedy, in order

Greedy answers are `generate`'s for each request alone (the same tokens). With `prefix_cache_gb` /
`image_cache_gb` (`generation.cache`), a prompt reuses the keys and values of the longest prefix that an earlier
or running request computed (images included, by their content) and the features of images seen before;
`Result.cached_tokens` says how many prompt tokens came from the cache. `submit` checks a request (its images
decode, its prompt and max tokens fit) and raises ValueError naming the problem, or `QueueFull` when `max_queue`
requests wait already; nothing reaches the device thread unchecked.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import numbers
import queue
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from idefics_jax.generation.cache import PromptCache
from idefics_jax.generation.chat import Chat
from idefics_jax.generation.sampling import SamplingParams
from idefics_jax.generation.structured import Constraint
from idefics_jax.model.idefics import IdeficsModel
from idefics_jax.serve.slots import SlotDecoder, prompt_columns


class QueueFull(RuntimeError):
    """The bounded queue of waiting requests is full: try again later."""


class EngineStopped(RuntimeError):
    """The engine is stopping or stopped and takes no new requests."""


@dataclasses.dataclass
class Request:
    """One chat request: `messages` in the chat-template format, `images` one per {"type": "image"} entry (PIL
    images, paths or URLs; or inline in the entries, as `Chat` takes them). temperature 0 is greedy; `stop`:
    strings that end the answer (not included)."""

    messages: list[dict]
    images: Sequence[Any] | None = None
    max_tokens: int | None = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[str] = ()
    ignore_eos: bool = False  # only max_tokens (or a stop string) ends the answer
    # The chat template's options, as `Chat.batch_inputs` takes them (default: a final assistant message is
    # continued, anything else gets the generation prompt).
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    # A JSON schema, any JSON object, a regex or a fixed choice the answer follows (`generation.structured`):
    # {"type": "json_schema", "json_schema": {"schema": {...}}}, {"type": "json_object"},
    # {"type": "regex", "regex": "..."}, {"type": "choice", "choice": [...]}.
    response_format: dict | None = None


@dataclasses.dataclass
class Result:
    text: str
    tokens: list[int]  # the new tokens (the final eos included)
    finish_reason: str  # "stop" (eos or a stop string), "length" (max_tokens) or "cancelled"
    prompt_tokens: int
    t_submit: float  # time.perf_counter() stamps
    t_first: float | None
    t_done: float
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


class Handle:
    """A submitted request. Iterate for its text pieces, `result()` for the whole answer, `cancel()` to stop it
    (its slot is freed). With `on_event`, events go to that callback instead (called on the engine's thread with
    ("text", str), ("done", Result) or ("error", Exception)); iteration and `result()` still work."""

    def __init__(self, request: Request, on_event: Callable[[tuple], None] | None = None):
        self.request = request
        self._events: queue.Queue = queue.Queue()
        self._on_event = on_event
        self._done = threading.Event()
        self._result: Result | None = None
        self._error: Exception | None = None
        self.cancelled = False
        self._engine: Engine | None = None
        # Engine-thread state.
        self.tokens: list[int] = []
        self.shown = ""
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None

    def _emit(self, event: tuple) -> None:
        if event[0] == "done":
            self._result = event[1]
        elif event[0] == "error":
            self._error = event[1]
        if event[0] != "text":
            self._done.set()
        (self._on_event or self._events.put)(event)

    def __iter__(self) -> Iterator[str]:
        if self._on_event is not None:
            raise RuntimeError("this handle reports to its on_event callback; use result()")
        while True:
            kind, value = self._events.get()
            if kind == "text":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    def result(self, timeout: float | None = None) -> Result:
        if not self._done.wait(timeout):
            raise TimeoutError("the request is still running")
        if self._error is not None:
            raise self._error
        return self._result

    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stops the request (a no-op once it is done); it finishes with finish_reason "cancelled"."""
        if self._engine is not None and not self._done.is_set():
            self._engine._cancel(self)


def _positive_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1


class Engine:
    """Continuous batching of chat requests over `slots` decode slots with `max_len` cache positions each (prompt
    bucket + max_tokens must fit; default: the model's positions, at most 2048). `steps` decode steps run per round
    between admissions (1: a freed slot is refilled at once, more: less host work per token). `max_queue`
    bounds the waiting requests. `prefix_cache_gb` / `image_cache_gb`: device memory for the prefix cache's keys
    and values and the image cache's features (0: off). The prompts' attention backend is the model's. See the
    module docstring."""

    def __init__(self, model: IdeficsModel, processor_or_chat, *, slots: int = 8, max_len: int | None = None,
                 steps: int = 4, max_queue: int = 64, prefix_cache_gb: float = 0.0, image_cache_gb: float = 0.0):
        self.chat = processor_or_chat if isinstance(processor_or_chat, Chat) else Chat(model, processor_or_chat)
        self.model = model
        if max_len is None:
            max_len = min(model.config.text.max_position_embeddings, 2048)
        if not _positive_int(steps):
            raise ValueError(f"steps must be a positive integer; got {steps!r}")
        if not _positive_int(max_queue):
            raise ValueError(f"max_queue must be a positive integer; got {max_queue!r}")
        cache = PromptCache(model, prefix_cache_gb=prefix_cache_gb, image_cache_gb=image_cache_gb) \
            if prefix_cache_gb or image_cache_gb else None
        self.decoder = SlotDecoder(model, slots=slots, max_len=max_len, cache=cache)
        self.slots, self.max_len, self.steps, self.max_queue = slots, max_len, steps, max_queue
        self._cv = threading.Condition()
        self._waiting: collections.deque[tuple[Handle, dict]] = collections.deque()
        self._cancels: list[Handle] = []
        self._active: dict[int, Handle] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._deadline = math.inf
        self.stats = collections.Counter()  # submitted, finished, cancelled, failed, tokens

    # ---- caller side -------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="idefics-jax-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Takes no new requests, lets the running and waiting ones finish for up to `timeout` seconds, cancels
        the rest, and ends the thread."""
        with self._cv:
            self._stopping = True
            self._deadline = time.monotonic() + timeout
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def load(self) -> dict[str, int]:
        """Active and waiting request counts (and, with a prefix cache, the blocks requests hold pinned)."""
        with self._cv:
            out = {"active": len(self._active), "waiting": len(self._waiting)}
        cache = self.decoder.cache
        if cache is not None:
            out["pinned_blocks"] = cache.pinned
        return out

    def update_weights(self, model: IdeficsModel) -> None:
        """Answers with `model`'s weights from now on: the same architecture and shapes (a training step's new
        parameters, as GRPO samples its rollouts from the policy it trains); nothing is copied or recompiled.
        Only while no request runs or waits (RuntimeError otherwise)."""
        with self._cv:
            if self._active or self._waiting:
                raise RuntimeError("update_weights: requests are running or waiting; call it between batches")
            self.decoder.update_weights(model)
            self.model = self.chat.model = model

    def _prepare(self, request: Request) -> tuple[dict, SamplingParams, Constraint | None]:
        """The request's model inputs, sampling and grammar state, or ValueError naming what is wrong with it."""
        r = request
        try:
            # No max_tokens: as many as fit, known once the prompt is (below).
            sampling = SamplingParams.from_temperature(
                r.temperature, r.top_p, max_new_tokens=1 if r.max_tokens is None else r.max_tokens, seed=r.seed,
                ignore_eos=r.ignore_eos)
        except ValueError as e:  # the request's own field names
            raise ValueError(str(e).replace("max_new_tokens", "max_tokens")) from None
        if isinstance(r.stop, str) or not all(isinstance(s, str) and s for s in r.stop):
            raise ValueError("stop must be a list of non-empty strings")
        grammar = self.chat.grammars.compile(r.response_format) if r.response_format is not None else None
        if grammar is not None and r.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with response_format (the grammar ends the answer)")
        inputs = self.chat.inputs(r.messages, r.images, add_generation_prompt=r.add_generation_prompt,
                                  continue_final_message=r.continue_final_message)
        T = inputs["input_ids"].shape[1]
        limit = self.model.config.text.max_position_embeddings
        if T > limit:
            raise ValueError(f"the prompt has {T} tokens but the model has {limit} positions; shorten it or use "
                             "fewer / smaller images")
        room = self.max_len - prompt_columns(T)
        if room < 1:
            raise ValueError(f"the prompt has {T} tokens: too long for the {self.max_len} positions per slot")
        if r.max_tokens is not None and r.max_tokens > room:
            raise ValueError(f"max_tokens {r.max_tokens} is too large: the prompt has {T} tokens and at most "
                             f"{room} new tokens fit (max_len {self.max_len})")
        sampling = dataclasses.replace(sampling, max_new_tokens=room if r.max_tokens is None else r.max_tokens)
        return inputs, sampling, grammar.start(sampling.max_new_tokens) if grammar is not None else None

    def submit(self, request: Request, *, on_event: Callable[[tuple], None] | None = None,
               wait: bool = False) -> Handle:
        """Queues `request` -> its Handle. Raises ValueError for a bad request, QueueFull when `max_queue`
        requests wait (with wait=True: blocks until there is room), EngineStopped when stopping."""
        return self._enqueue([(request, on_event)], wait)[0]

    def submit_all(self, requests: Sequence[Request], *, wait: bool = True) -> list[Handle]:
        """Queues `requests` in one go -> their Handles: all are checked before any is queued, and the engine
        admits them together (their prompts prefill as batches, the same batches whenever they are queued while
        the engine is idle)."""
        return self._enqueue([(r, None) for r in requests], wait)

    def _enqueue(self, requests: Sequence[tuple[Request, Callable | None]], wait: bool) -> list[Handle]:
        """Checks every request, then queues them in one go (as far as the queue has room), so that the engine
        thread admits them together: their prompts prefill as one batch rather than as they trickle in."""
        prepared = []
        for request, on_event in requests:
            inputs, sampling, constraint = self._prepare(request)
            h = Handle(request, on_event)
            h._engine = self
            h.prompt_tokens = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else \
                int(inputs["input_ids"].shape[1])
            prepared.append((h, (inputs, sampling, constraint)))
        with self._cv:
            for item in prepared:
                while True:
                    if self._stopping or self._thread is None:
                        raise EngineStopped("the engine is not running (stopped, stopping or never started)")
                    if len(self._waiting) < self.max_queue:
                        break
                    if not wait:
                        raise QueueFull(f"{len(self._waiting)} requests are waiting already "
                                        f"(max_queue {self.max_queue})")
                    self._cv.notify_all()  # the engine thread takes what is queued, making room
                    self._cv.wait()
                self._waiting.append(item)
                self.stats["submitted"] += 1
            self._cv.notify_all()
        return [h for h, _ in prepared]

    def answer_all(self, conversations: Sequence[Request | tuple], **request_kwargs) -> list[str]:
        """The answer to each request, in order, as `Chat.answers` gives them (stripped): Requests, or
        (messages, images) pairs made into Requests with `request_kwargs` (max_tokens, temperature, ...).
        Blocks; the engine must be started. All are checked before any is queued (a bad one raises ValueError and
        none runs), then queued together."""
        requests = [c if isinstance(c, Request) else Request(c[0], c[1], **request_kwargs) for c in conversations]
        return [h.result().text.strip() for h in self.submit_all(requests)]

    def _cancel(self, h: Handle) -> None:
        with self._cv:
            h.cancelled = True
            self._cancels.append(h)
            self._cv.notify_all()

    # ---- engine thread -----------------------------------------------------------------------------------------
    def _finish(self, h: Handle, reason: str, slot: int | None = None) -> None:
        if slot is not None:
            self.decoder.retire(slot, h.tokens)
            with self._cv:
                self._active.pop(slot, None)
        self._emit_text(h, final=True)
        text = h.shown
        self.stats["finished" if reason != "cancelled" else "cancelled"] += 1
        self.stats["tokens"] += len(h.tokens)
        h._emit(("done", Result(text, list(h.tokens), reason, h.prompt_tokens, h.t_submit, h.t_first,
                                time.perf_counter(), h.cached_tokens)))

    def _emit_text(self, h: Handle, final: bool = False) -> bool:
        """Streams the new text; True when a stop string ended it (the text is cut before it)."""
        text = self.chat.processor.tokenizer.decode(h.tokens, skip_special_tokens=True)
        stops = list(h.request.stop)
        hit = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if hit >= 0:
            text, final = text[:hit], True
        # Until the end, hold back what could be the start of a stop string, and a character split over tokens
        # (it decodes to U+FFFD until its last byte arrives). Text already shown is never taken back.
        show = text if final else text[:len(text) - max((len(s) - 1 for s in stops), default=0)]
        if not final and show.endswith("\ufffd"):
            return False
        if len(show) > len(h.shown) and show.startswith(h.shown):
            h._emit(("text", show[len(h.shown):]))
            h.shown = show
        return hit >= 0

    def _take(self, h: Handle, tokens) -> bool:
        """Adds new tokens to a request; True when a stop string ended it."""
        if not len(tokens):
            return False
        if h.t_first is None:
            h.t_first = time.perf_counter()
        h.tokens.extend(int(t) for t in tokens)
        return self._emit_text(h)

    def _admit(self, admitted: list[tuple[Handle, dict, int]]) -> None:
        """Prefills the requests given slots this round (together where `SlotDecoder.prefill_many` can) and puts
        each into its slot."""
        ready = []
        for h, (inputs, sampling, constraint), slot in admitted:
            try:
                ready.append((h, slot, self.decoder.prepare(**inputs, sampling=sampling, constraint=constraint)))
            except Exception as e:  # checked at submit; anything left fails this request only
                self._fail(h, e)
        if not ready:
            return
        try:
            prefilled = self.decoder.prefill_many([p for _, _, p in ready])
        except Exception:  # find the request that fails, alone; the others go on
            prefilled = []
            for h, _, p in ready:
                try:
                    prefilled.append(self.decoder.prefill_many([p])[0])
                except Exception as e:
                    self._fail(h, e)
                    prefilled.append(None)
        self._count_cache_hits()
        for (h, slot, _), pre in zip(ready, prefilled):
            if pre is None:
                continue
            h.cached_tokens = pre.cached_tokens
            stopped = self._take(h, [pre.first])
            if pre.done or stopped:
                eos = pre.first in self.decoder.eos_ids and not h.request.ignore_eos
                self._finish(h, "stop" if (stopped or eos) else "length")
                continue
            self.decoder.insert(pre, slot)
            with self._cv:
                self._active[slot] = h

    def _count_cache_hits(self) -> None:
        """The caches' look-ups and hits as `serve.metrics` reads them: prompt tokens, images."""
        cache = self.decoder.cache
        if cache is None:
            return
        c = cache.stats
        self.stats["prefix_cache_queries"] = c["prompt_tokens"]
        self.stats["prefix_cache_hits"] = c["cached_tokens"]
        self.stats["image_cache_queries"] = c["image_hits"] + c["image_misses"]
        self.stats["image_cache_hits"] = c["image_hits"]

    def _fail(self, h: Handle, e: Exception) -> None:
        self.stats["failed"] += 1
        h._emit(("error", e))

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # the device failed: fail every request rather than hang its caller
            with self._cv:
                pending = [h for h, _ in self._waiting] + list(self._active.values())
                self._waiting.clear()
                self._active.clear()
                self._stopping = True
            for h in pending:
                h._emit(("error", RuntimeError(f"the engine stopped: {type(e).__name__}: {e}")))
            raise

    def _loop(self) -> None:
        while True:
            with self._cv:
                gone = {id(h) for h in self._cancels}
                self._waiting = collections.deque((w, i) for w, i in self._waiting if id(w) not in gone)
                cancels, self._cancels = self._cancels, []
                if self._stopping and time.monotonic() > self._deadline:
                    cancels += [h for h, _ in self._waiting] + list(self._active.values())
                    self._waiting.clear()
                if self._stopping and not self._active and not self._waiting and not cancels:
                    return
                if not self._active and not self._waiting and not cancels:
                    self._cv.wait(timeout=1.0)
                    continue
                free = [s for s in range(self.slots) if s not in self._active]
                admitted = [(self._waiting.popleft(), s) for s in free[:len(self._waiting)]]
                self._cv.notify_all()  # room in the queue for blocked submitters
            for h in cancels:
                slot = next((s for s, a in self._active.items() if a is h), None)
                if slot is not None:
                    self.decoder.release(slot)
                if not h.done():
                    self._finish(h, "cancelled", slot)
            for (h, _), _ in admitted:
                if h.cancelled:
                    self._finish(h, "cancelled")
            self._admit([(h, inputs, slot) for (h, inputs), slot in admitted if not h.cancelled])
            if not self._active:
                continue
            tokens, counts, done = self.decoder.decode(self.steps, stop_on_finish=bool(self._waiting))
            for slot, h in list(self._active.items()):
                new = tokens[slot, :counts[slot]]
                stopped = self._take(h, new)
                if stopped:
                    self.decoder.release(slot)
                    self._finish(h, "stop", slot)
                elif done[slot]:
                    eos = len(new) and int(new[-1]) in self.decoder.eos_ids and not h.request.ignore_eos
                    self._finish(h, "stop" if eos else "length", slot)
