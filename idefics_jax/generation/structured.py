"""Structured output: a response format (a JSON schema, any JSON object, a regex, a fixed choice) compiled for a
tokenizer by llguidance, and each constrained request's grammar state, which tells the decode core which tokens the
request may produce next: one packed bitmask row (W = ceil(V / 32) int32 words, bit v of word v // 32 set when token
v is allowed).

    grammars = Grammars(tokenizer, vocab_size=V, eos=(eos_id,))     # Chat holds one (chat.grammars)
    grammar = grammars.compile({"type": "json_schema", "json_schema": {"schema": schema}})   # ValueError if bad
    c = grammar.start(max_tokens=256)        # one request's state
    c.fill(row_W, remaining=256)             # the tokens allowed next -> row_W
    c.advance(token)                         # the token the request produced

The grammar state lives on the host and advances as tokens come out; the decode core applies the rows' masks on
the device (`sampling.allow`). A request always finishes inside its grammar: the mask keeps room for the shortest
way to close the answer (close the string, add the required properties, close the brackets) and, when the tokens
left are only just enough, forces that closing, so an answer cut by `max_tokens` still parses and validates.
"""

from __future__ import annotations

import collections
import json
import re
import threading
from typing import Any, Sequence

import numpy as np

# Single-character tokens the closing tries first, in this order: end a string, close an object or array, the
# separators, the shortest number. Anything else: the lowest allowed token id.
_CLOSERS = ('"', "}", "]", ",", "0", ":")
# The longest closing searched for (tokens); a grammar state needing more is left unforced.
_MAX_CLOSING = 256
# Tokens of room kept beyond the closing: a free token may lengthen the closing (opening an object with required
# properties) by up to this much and still finish in time.
_SLACK = 16


def _one_line(message: str) -> str:
    """llguidance's error as one line: its first line, plus the detail line ("error: ...") of a regex error."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    if not lines:
        return "invalid grammar"
    detail = next((ln for ln in lines[1:] if ln.startswith("error:")), None)
    first = re.sub(r"^at \d+\(\d+\): ", "", lines[0]).rstrip(":")
    return f"{first}: {detail[len('error:'):].strip()}" if detail else first


def _source(response_format: dict) -> str:
    """A response format -> llguidance's grammar (a JSON string); ValueError naming what is wrong with it.

    The formats, as OpenAI and vLLM spell them: {"type": "json_schema", "json_schema": {"schema": {...}}},
    {"type": "json_object"} (any JSON object), {"type": "regex", "regex": "..."} and
    {"type": "choice", "choice": ["yes", "no"]} (exactly one of the strings). JSON comes compact (no whitespace
    between tokens)."""
    from llguidance import LLMatcher

    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise ValueError(f"response_format must be an object with a 'type'; got {response_format!r:.80}")
    kind = response_format["type"]
    compact = {"whitespace_flexible": False}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
        try:
            return LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=compact)
        except (TypeError, ValueError) as e:
            raise ValueError(f"response_format: invalid JSON schema: {_one_line(str(e))}") from None
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=compact)
    if kind == "regex":
        regex = response_format.get("regex")
        if not isinstance(regex, str) or not regex:
            raise ValueError("response_format regex needs {'regex': '<a non-empty pattern>'}")
        return LLMatcher.grammar_from_regex(regex)
    if kind == "choice":
        choice = response_format.get("choice")
        if not (isinstance(choice, (list, tuple)) and choice and all(isinstance(c, str) and c for c in choice)):
            raise ValueError("response_format choice needs {'choice': [<non-empty strings>]}")
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choice))
    raise ValueError(f"response_format type {kind!r} is not one of text, json_schema, json_object, regex, choice")


def grammar_source(response_format: dict) -> str:
    """A response format -> llguidance's grammar (a JSON string), checked (no tokenizer needed); ValueError naming
    what is wrong with it. See `_source` for the formats."""
    from llguidance import LLMatcher

    source = _source(response_format)
    error = LLMatcher.validate_grammar(source)
    if error:
        raise ValueError(f"response_format: invalid {what(response_format)}: {_one_line(error)}")
    return source


def from_request(body: dict) -> dict | None:
    """The response format a chat-completions body asks for: OpenAI's `response_format`, or vLLM's
    `structured_outputs` ({"json": schema} / {"regex": ...} / {"choice": [...]}) and older `guided_json`,
    `guided_regex`, `guided_choice`. ValueError when it asks for more than one."""
    found = []
    if body.get("response_format") is not None:
        found.append(body["response_format"])
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise ValueError("structured_outputs must be an object: {json: schema} | {regex: ...} | {choice: [...]}")
        body = {**{f"guided_{k}": v for k, v in so.items()}, **body}
    for key, make in (("guided_json", lambda v: {"type": "json_schema", "json_schema": {"schema": v}}),
                      ("guided_regex", lambda v: {"type": "regex", "regex": v}),
                      ("guided_choice", lambda v: {"type": "choice", "choice": v})):
        if body.get(key) is not None:
            v = body[key]
            found.append(make(json.loads(v) if key == "guided_json" and isinstance(v, str) else v))
    if len(found) > 1:
        raise ValueError("ask for one response format (response_format, structured_outputs or guided_*), not several")
    return found[0] if found else None


def what(response_format: dict) -> str:
    kind = response_format.get("type")
    return {"json_schema": "JSON schema", "json_object": "JSON object"}.get(kind, kind)


class Grammars:
    """Response formats compiled for one tokenizer (llguidance's view of it, built once: about a second for a
    50k vocabulary). `vocab_size`: the model's (its logits' width; at least the tokenizer's); `eos`: the ids that
    end an answer. The last `cache` compiled formats are kept."""

    def __init__(self, tokenizer, vocab_size: int, eos: Sequence[int], cache: int = 64):
        if not eos:
            raise ValueError("structured output needs an eos token id (the grammar ends the answer with it)")
        self.tokenizer, self.vocab_size, self.eos = tokenizer, int(vocab_size), tuple(int(e) for e in eos)
        self.words = (self.vocab_size + 31) // 32
        self._ll = None
        self._cache: collections.OrderedDict[str, Grammar] = collections.OrderedDict()
        self._size = cache
        self._lock = threading.Lock()  # requests are compiled on the threads that submit them

    @property
    def lltokenizer(self):
        if self._ll is None:
            n = max(self.vocab_size, len(self.tokenizer))
            self._ll = _lltokenizer(self.tokenizer, n, list(self.eos))
            # Special tokens other than the eos never write text (llguidance may offer <unk> where nothing fits).
            keep = np.ones(32 * ((n + 31) // 32), np.uint8)
            keep[[i for i in self.tokenizer.all_special_ids if i not in self.eos and i < n]] = 0
            self.keep_W = np.packbits(keep, bitorder="little").view(np.int32)
        return self._ll

    def compile(self, response_format: dict | None) -> "Grammar | None":
        """-> the compiled Grammar (None for None or {"type": "text"}); ValueError for a bad format."""
        if response_format is None or (isinstance(response_format, dict) and response_format.get("type") == "text"):
            return None
        source = grammar_source(response_format)
        with self._lock:
            return self._compile(source, response_format)

    def _compile(self, source: str, response_format: dict) -> "Grammar":
        if source in self._cache:
            self._cache.move_to_end(source)
            return self._cache[source]
        from llguidance import LLMatcher

        matcher = LLMatcher(self.lltokenizer, source, log_level=0)
        if matcher.is_error():
            raise ValueError(f"response_format: invalid {what(response_format)}: {_one_line(matcher.get_error())}")
        try:
            grammar = Grammar(self, matcher)
        except ValueError as e:
            raise ValueError(f"response_format: {what(response_format)}: {e}") from None
        self._cache[source] = grammar
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return grammar


class Grammar:
    """One compiled response format: a fresh matcher (copied: the lexer states it built are shared) per request."""

    def __init__(self, grammars: Grammars, matcher):
        self.grammars, self._matcher = grammars, matcher
        ll = grammars.lltokenizer
        self.closers = [ids[0] for ids in (ll.tokenize_str(s) for s in _CLOSERS) if len(ids) == 1]
        self.min_tokens = None  # the shortest answer's tokens, eos included (None: not found)
        first = Constraint(self, 1 << 30)
        if not first.m.is_accepting() and not np.any(first._allowed()):
            raise ValueError("this tokenizer has no token that can start such an answer")
        closing = first._closing()
        if closing is not None:
            self.min_tokens = len(closing) + 1

    def start(self, max_tokens: int) -> "Constraint":
        """A request's grammar state; ValueError when its shortest answer needs more than `max_tokens` tokens."""
        if self.min_tokens is not None and self.min_tokens > max_tokens:
            raise ValueError(f"max_tokens {max_tokens} is too small for this response_format: its shortest answer "
                             f"takes {self.min_tokens} tokens")
        return Constraint(self, max_tokens)


class Constraint:
    """One request's grammar state. `fill` writes the tokens it may produce next; `advance` takes the one it did."""

    def __init__(self, grammar: Grammar, max_tokens: int):
        self.grammar, self.max_tokens = grammar, max_tokens
        self.m = grammar._matcher.deep_copy()
        g = grammar.grammars
        self.eos, self.words = g.eos, g.words
        self.slack = _SLACK
        self._plan: list[int] | None = None  # the closing from the current state (None: not found)
        self._planned = False
        self._known = (grammar.min_tokens or 1) - 1  # the closing's length when last searched
        self._scratch = np.zeros((1, (g.lltokenizer.vocab_size + 31) // 32), np.int32)
        self.keep_W = g.keep_W

    @property
    def failed(self) -> str | None:
        return self.m.get_error() if self.m.is_error() else None

    def _allowed(self) -> np.ndarray:
        import llguidance.numpy as llnp

        llnp.fill_next_token_bitmask(self.m, self._scratch, 0)
        self._scratch &= self.keep_W
        return self._scratch[0]

    def _closing(self) -> list[int] | None:
        """The tokens of a short way to finish from here (the eos not included), or None if none is found within
        _MAX_CLOSING tokens: forced tokens, else single-character closers, else the lowest allowed id."""
        if not self._planned:
            self._plan, self._planned = self._search(), True
        return self._plan

    def _search(self) -> list[int] | None:
        m, out = self.m, []
        try:
            while not m.is_accepting():
                if len(out) >= _MAX_CLOSING:
                    return None
                t = next((c for c in self.grammar.closers if m.validate_tokens([c]) == 1), None)
                if t is None:
                    forced = m.compute_ff_tokens()  # what the grammar allows one way only (a key's rest), at once
                    if forced and all(m.consume_token(f) for f in forced):
                        out += forced
                        continue
                    if m.is_error():
                        return None
                    words = self._allowed().view(np.uint32).copy()
                    for e in self.eos:
                        words[e // 32] &= ~np.uint32(1 << (e % 32))
                    nonzero = np.flatnonzero(words)
                    if not len(nonzero):
                        return None
                    w = int(nonzero[0])
                    t = 32 * w + (int(words[w]) & -int(words[w])).bit_length() - 1  # its lowest allowed id
                if not m.consume_token(t):
                    return None
                out.append(t)
        finally:
            if out:
                m.rollback(len(out))
        return out

    def fill(self, row_W: np.ndarray, remaining: int) -> None:
        """Writes the tokens allowed next into `row_W` (int32 (W,)), with `remaining` tokens left for this answer
        (this one and the eos included): the grammar's, or only the closing's next token once the room left is
        about what closing takes. The closing is searched for only near the end (from 2 slacks before it)."""
        if remaining <= self._known + 2 * self.slack + 1:
            plan = self._closing()
            self._known = len(plan) if plan is not None else self._known
            if plan is not None and len(plan) + 1 + self.slack >= remaining:
                row_W[:] = 0
                t = plan[0] if plan else self.eos[0]
                row_W.view(np.uint32)[t // 32] = np.uint32(1) << np.uint32(t % 32)
                return
        row_W[:] = self._allowed()[:self.words]

    def advance(self, token: int) -> None:
        plan = self._plan if self._planned else None
        self._plan, self._planned = (plan[1:], True) if plan and plan[0] == token else (None, False)
        if int(token) in self.eos and not self.m.is_accepting():
            return  # an eos the grammar did not ask for (only when the caller forced it): nothing to track
        self.m.consume_token(int(token))


def _lltokenizer(tokenizer, n_vocab: int, eos: list[int]):
    """llguidance's tokenizer for an HF fast tokenizer: its own reading of byte-level and SentencePiece ones; for
    other decoders (the word- and character-level tokenizers built here), each token's text as its bytes."""
    import llguidance
    import llguidance.hf

    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=eos)
    except ValueError:
        pass
    inverse = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    tokens = [b"" if i not in inverse else inverse[i].encode() if i in special
              else tokenizer.convert_tokens_to_string([inverse[i]]).encode() for i in range(n_vocab)]
    wrapper = llguidance.TokenizerWrapper(_Plain(tokenizer, tokens, sorted(special)))
    return llguidance.LLTokenizer(wrapper, n_vocab=n_vocab, eos_token=eos)


class _Plain:
    """What llguidance's TokenizerWrapper reads of a tokenizer: token bytes, special ids, and encoding."""

    def __init__(self, tokenizer, tokens: list[bytes], special: list[int]):
        self.tok, self.tokens, self.special_token_ids = tokenizer, tokens, special
        self.eos_token_id, self.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id

    def __call__(self, s: Any) -> list[int]:
        text = s.decode("utf-8", "replace") if isinstance(s, bytes) else s
        return self.tok.encode(text, add_special_tokens=False)


class RowMasks:
    """The packed token masks (rows, W) of a batch's rows, on the host: a free row allows any token, a constrained
    row what its Constraint allows next. `masks` gives the array to send before a decode step (None when nothing
    changed), `advance` feeds each row the tokens it produced."""

    def __init__(self, rows: int, vocab_size: int):
        from idefics_jax.generation.sampling import mask_words

        self.allowed = np.full((rows, mask_words(vocab_size)), -1, np.int32)
        self.rows: dict[int, Constraint] = {}
        self._changed = False

    def __bool__(self) -> bool:
        return bool(self.rows)

    def set(self, row: int, constraint: Constraint | None) -> None:
        if constraint is None:
            self.clear(row)
        else:
            self.rows[row] = constraint

    def clear(self, row: int) -> None:
        if self.rows.pop(row, None) is not None:
            self.allowed[row] = -1
            self._changed = True

    def masks(self, produced: Sequence[int]) -> np.ndarray | None:
        """The masks for the next step, each constrained row having produced `produced[row]` tokens so far."""
        if not self.rows and not self._changed:
            return None
        for row, c in self.rows.items():
            c.fill(self.allowed[row], c.max_tokens - int(produced[row]))
        self._changed = False
        return self.allowed

    def advance(self, row: int, tokens) -> None:
        c = self.rows.get(row)
        if c is not None:
            for t in tokens:
                c.advance(int(t))
