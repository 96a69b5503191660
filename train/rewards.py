"""Reward functions for GRPO: `reward(prompt, completion, answers) -> float`, chosen by name in a config.

    exact            1 if the completion (stripped, case-folded) equals one of the answers, else 0
    numeric          1 if the completion's first number equals one of the answers' numbers, else 0
    regex:PATTERN    1 if the completion matches PATTERN from its start (a format reward), else 0
    module:function  any importable function with that signature
"""

from __future__ import annotations

import importlib
import re
from typing import Callable, Sequence

Reward = Callable[[str, str, Sequence[str]], float]
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _norm(s: str) -> str:
    return " ".join(s.strip().lower().split()).rstrip(".")


def exact_match(prompt: str, completion: str, answers: Sequence[str]) -> float:
    return float(any(_norm(completion) == _norm(a) for a in answers))


def _number(s: str) -> float | None:
    m = _NUMBER.search(s.replace(",", ""))
    return None if m is None else float(m.group())


def numeric_match(prompt: str, completion: str, answers: Sequence[str]) -> float:
    got = _number(completion)
    return float(got is not None and any(_number(a) == got for a in answers))


def regex_format(pattern: str) -> Reward:
    compiled = re.compile(pattern, re.DOTALL)
    return lambda prompt, completion, answers: float(compiled.match(completion.strip()) is not None)


_BUILT_IN: dict[str, Reward] = {"exact": exact_match, "numeric": numeric_match}


def reward_function(name: str) -> Reward:
    """The reward a config names (see the module docstring); ValueError naming what is wrong."""
    if name in _BUILT_IN:
        return _BUILT_IN[name]
    if name.startswith("regex:"):
        try:
            return regex_format(name[len("regex:"):])
        except re.error as e:
            raise ValueError(f"reward '{name}': not a valid regular expression ({e})") from None
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"reward '{name}' is not exact, numeric, regex:PATTERN or module:function")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward '{name}': {e}") from None
    if not callable(fn):
        raise ValueError(f"reward '{name}' is not a function")
    return fn
