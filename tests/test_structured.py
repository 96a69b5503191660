"""Structured output: response formats compiled for our tokenizers, their masks applied in the decode core, and the
answers of `generate`, `Chat` and the engine parsing and validating, also when max tokens cut them short."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from idefics_jax import cli
from idefics_jax.convert.hf_files import char_tokenizer
from idefics_jax.generation.api import generate
from idefics_jax.generation.chat import Chat, user_turn
from idefics_jax.generation.sampling import allow, mask_words
from idefics_jax.generation.structured import Grammars, RowMasks, from_request
from idefics_jax.serve.engine import Engine, Request

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                        "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "address"], "additionalProperties": False}
SCHEMAS = [PERSON, {"type": "array", "items": {"type": "number"}, "minItems": 2},
           {"anyOf": [{"type": "boolean"}, {"type": "object", "properties": {"x": {"type": "null"}}}]}]


def json_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def walk(grammar, max_tokens: int, rng, V: int) -> list[int]:
    """A random model: uniform among the tokens the masks allow -> its tokens (the eos included if produced)."""
    masks = RowMasks(1, V)
    masks.set(0, grammar.start(max_tokens))
    out = []
    while len(out) < max_tokens:
        bits = np.unpackbits(masks.masks([len(out)])[0].view(np.uint8), bitorder="little")[:V]
        t = int(rng.choice(np.flatnonzero(bits)))
        out.append(t)
        masks.advance(0, [t])
        if t in grammar.grammars.eos:
            break
    return out


@pytest.fixture(scope="module")
def chars():
    tok = char_tokenizer()
    return tok, Grammars(tok, 160, [tok.eos_token_id])


def test_random_walks_always_finish_valid(chars):
    """Uniformly random tokens among the allowed ones, with budgets from the shortest answer up: every answer ends
    with the eos inside the budget and parses and validates (regex: matches; choice: is one of them)."""
    tok, grammars = chars
    rng = np.random.default_rng(0)
    formats = [(json_format(s), lambda t, s=s: jsonschema.validate(json.loads(t), s)) for s in SCHEMAS]
    formats += [({"type": "json_object"}, lambda t: isinstance(json.loads(t), dict) or pytest.fail(t)),
                ({"type": "regex", "regex": r"[a-z]{2,8}@example\.(com|org)"},
                 lambda t: re.fullmatch(r"[a-z]{2,8}@example\.(com|org)", t) or pytest.fail(t)),
                ({"type": "choice", "choice": ["yes", "no", "maybe so"]},
                 lambda t: t in ("yes", "no", "maybe so") or pytest.fail(t))]
    for fmt, check in formats:
        g = grammars.compile(fmt)
        assert g is grammars.compile(fmt)  # compiled once
        for budget in [g.min_tokens, g.min_tokens + 3, g.min_tokens + 25, 150]:
            for _ in range(4):
                out = walk(g, budget, rng, 160)
                assert out[-1] == tok.eos_token_id and len(out) <= budget
                check(tok.decode(out, skip_special_tokens=True))


def test_bad_formats_get_one_line_errors(chars):
    _, grammars = chars
    cases = [
        (json_format({"type": "strin"}), "response_format: invalid JSON schema: Invalid type: strin"),
        ({"type": "regex", "regex": "[a-"}, "response_format: invalid regex: invalid regex \"[a-\" (in regex): "
                                            "regex parse error: unclosed character class"),
        ({"type": "choice", "choice": []}, "response_format choice needs {'choice': [<non-empty strings>]}"),
        ({"type": "json_schema"}, "response_format json_schema needs {'json_schema': {'schema': {...}}}"),
        ({"type": "xml"}, "response_format type 'xml' is not one of text, json_schema, json_object, regex, choice"),
        ("json", "response_format must be an object with a 'type'; got 'json'"),
    ]
    for fmt, message in cases:
        with pytest.raises(ValueError) as e:
            grammars.compile(fmt)
        assert str(e.value) == message
    assert grammars.compile(None) is None and grammars.compile({"type": "text"}) is None
    with pytest.raises(ValueError, match="max_tokens 3 is too small for this response_format: its shortest answer "
                                         "takes 56 tokens"):
        grammars.compile(json_format(PERSON)).start(3)


def test_a_tokenizer_that_cannot_write_it():
    """tiny-shapes' word vocabulary has no brace: a JSON answer is refused; a choice of its words works."""
    from idefics_jax.shapes.model import tokenizer

    tok = tokenizer()
    grammars = Grammars(tok, len(tok), [tok.eos_token_id])
    with pytest.raises(ValueError, match="^response_format: JSON object: this tokenizer has no token that can start"):
        grammars.compile({"type": "json_object"})
    out = walk(grammars.compile({"type": "choice", "choice": ["red", "green"]}), 5, np.random.default_rng(0),
               len(tok))
    assert tok.decode(out, skip_special_tokens=True) in ("red", "green")


def test_request_fields():
    schema = {"type": "object"}
    assert from_request({"response_format": {"type": "json_object"}}) == {"type": "json_object"}
    assert from_request({"guided_json": json.dumps(schema)}) == json_format(schema) | {
        "json_schema": {"schema": schema}}
    assert from_request({"structured_outputs": {"regex": "a+"}}) == {"type": "regex", "regex": "a+"}
    assert from_request({"guided_choice": ["a", "b"]}) == {"type": "choice", "choice": ["a", "b"]}
    assert from_request({"messages": []}) is None
    with pytest.raises(ValueError, match="ask for one response format"):
        from_request({"response_format": {"type": "json_object"}, "guided_regex": "a"})


def test_allow_masks_logits_per_row():
    V = 70
    logits = jnp.arange(2 * V, dtype=jnp.float32).reshape(2, V)
    masks = RowMasks(2, V)
    masks.allowed[1] = 0
    masks.allowed[1, 1] = 1 << 3  # token 35 only
    out = np.asarray(allow(logits, jnp.asarray(masks.allowed)))
    assert mask_words(V) == 3 and np.array_equal(out[0], np.asarray(logits[0]))
    assert np.argmax(out[1]) == 35 and np.isinf(out[1]).sum() == V - 1


@pytest.fixture(scope="module")
def lively_chat(lively_hf):
    return Chat.load(lively_hf)


def test_chat_and_generate_answers_validate(lively_chat):
    """Greedy and sampled, one call and streamed, batched rows with their own seeds: every answer validates, the
    stream is the call, and a budget cut short still closes the JSON."""
    chat = lively_chat
    fmt = json_format(PERSON)
    for kw in [{}, {"do_sample": True, "seed": 3, "top_p": 0.9}]:
        text = chat("what is this", max_new_tokens=90, response_format=fmt, **kw)
        jsonschema.validate(json.loads(text), PERSON)
        assert "".join(chat.stream("what is this", max_new_tokens=90, response_format=fmt, **kw)) == text
    short = chat("what is this", max_new_tokens=60, response_format=fmt, do_sample=True, seed=1)
    jsonschema.validate(json.loads(short), PERSON)
    inputs = chat.batch_inputs([(user_turn("why the dots"), None), (user_turn("tree and sky, blue"), None)])
    new = generate(chat.model, **inputs, max_new_tokens=40, do_sample=True, seed=5, tokenizer=chat.processor.tokenizer,
                   response_format={"type": "regex", "regex": r"\d{3}-[a-z]{2,9}"})[:, inputs["input_ids"].shape[1]:]
    for text in chat.decode(new):
        assert re.fullmatch(r"\d{3}-[a-z]{2,9}", text), text
    with pytest.raises(ValueError, match="response_format needs the tokenizer"):
        generate(chat.model, **inputs, max_new_tokens=4, response_format={"type": "json_object"})


def test_engine_mixes_constrained_and_free_rows(lively_chat):
    """Constrained requests of several formats and free ones decode together in one engine: the constrained ones
    validate, the free ones are `generate`'s answers alone (greedy), token for token."""
    chat = lively_chat
    formats = [json_format(PERSON), None, {"type": "choice", "choice": ["left", "right"]}, json_format(SCHEMAS[1]),
               None, {"type": "json_object"}]
    with Engine(chat.model, chat, slots=4, max_len=256, steps=4) as engine:
        handles = [engine.submit(Request(user_turn(q), max_tokens=60 + 7 * i, response_format=f))
                   for i, (q, f) in enumerate(zip(["what is this", "why the dots", "show the red", "many kinds of",
                                                   "blue or what", "tree and sky"], formats))]
        results = [h.result(timeout=600) for h in handles]
        with pytest.raises(ValueError, match="^response_format: invalid regex"):
            engine.submit(Request(user_turn("x"), response_format={"type": "regex", "regex": "(("}))
        with pytest.raises(ValueError, match="ignore_eos cannot be combined with response_format"):
            engine.submit(Request(user_turn("x"), ignore_eos=True, response_format={"type": "json_object"}))
    for (fmt, r), q in zip(zip(formats, results), ["what is this", "why the dots"] * 3):
        assert r.finish_reason == "stop" or fmt is None
    jsonschema.validate(json.loads(results[0].text), PERSON)
    assert results[2].text in ("left", "right")
    jsonschema.validate(json.loads(results[3].text), SCHEMAS[1])
    assert isinstance(json.loads(results[5].text), dict)
    for i in (1, 4):
        inputs = chat.inputs(user_turn(["why the dots", "blue or what"][i == 4]))
        new = generate(chat.model, **inputs, max_new_tokens=60 + 7 * i)[0, inputs["input_ids"].shape[1]:].tolist()
        eos = chat.model.generation_defaults.eos_token_ids
        end = next((k + 1 for k, t in enumerate(new) if t in eos), len(new))
        assert results[i].tokens == new[:end]


def test_cli_json_schema(tmp_path, capsys, tiny_hf):
    """--json-schema FILE prints JSON that validates; a bad schema, regex or a file that is not JSON fails in
    one line before the model loads."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    good = tmp_path / "schema.json"
    good.write_text(json.dumps(schema))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "objec"}))
    notjson = tmp_path / "x.json"
    notjson.write_text("{nope")
    for args, message in [(["--json-schema", str(bad)], "response_format: invalid JSON schema: Invalid type: objec"),
                          (["--json-schema", str(notjson)], f"--json-schema {notjson}: not JSON (Expecting"),
                          (["--regex", "[z-a]"], "response_format: invalid regex:"),
                          (["--regex", "a", "--choice", "b"], "give one of --regex, --choice, not several")]:
        assert cli.main(["generate", "--model", "no/such/model", "--prompt", "hi", *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"idefics-jax generate: error: {message}") and err.count("\n") == 1, err
    assert cli.main(["generate", "--model", tiny_hf, "--prompt", "hi", "--json-schema", str(good),
                     "--max-new-tokens", "30"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), schema)
    assert cli.main(["generate", "--model", tiny_hf, "--prompt", "hi", "--choice", "yes", "--choice", "no",
                     "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out in ("yes\n", "no\n")
