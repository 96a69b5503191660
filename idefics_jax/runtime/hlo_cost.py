"""The collectives and loops of a compiled program, read from its HLO text.

`compiled.cost_analysis()` gives the compiler's flops, bytes accessed and (TPU) `optimal_seconds` for a program,
but counts the body of a `while` loop once and names no collective. This reads the compiled HLO text: each
collective (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute; TPU's async forms included)
with its operand bytes, and each loop's trip count (the `known_trip_count` the compiler records, else the loop's
`i < N` condition and its start), by which the collectives inside are multiplied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from typing import Callable

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9](?:fn|fnuz|b11fnuz)?)?)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) \(.*\) -> .* \{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = ")
_CALLED = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def _dtype_bytes(dtype: str) -> float:
    if dtype.startswith("f8"):
        return 1
    return _DTYPE_BYTES.get(dtype, 0)  # token[], opaque: nothing


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape string (an array or a tuple of them; layouts ignored)."""
    return sum(_dtype_bytes(d) * math.prod(int(x) for x in dims.split(",") if x) for d, dims in _ARRAY.findall(shape))


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # result shape text
    op: str
    operands: list[str]  # operand instruction names
    attrs: str  # everything after the operand list
    literal: str = ""  # a constant's value


def _balanced(s: str, i: int) -> int:
    """Index just past the bracket group opening at s[i]."""
    depth = 0
    for j in range(i, len(s)):
        c = s[j]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(s)


def _parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):  # a tuple shape
        end = _balanced(rest, 0)
    else:
        end = rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    op_m = re.match(r"([\w\-]+)\(", rest)
    if not op_m:
        return None
    op = op_m.group(1)
    close = _balanced(rest, op_m.end() - 1)
    inside, attrs = rest[op_m.end():close - 1], rest[close:]
    literal = inside if op in ("constant", "parameter") else ""
    return Instr(m.group(1), shape, op, re.findall(r"%([\w.\-]+)", inside), attrs, literal)


@dataclasses.dataclass
class Computation:
    name: str
    instrs: dict[str, Instr]
    root: str
    params: dict[int, str]  # parameter number -> instruction name


def parse_module(text: str) -> tuple[dict[str, Computation], str]:
    """-> (computations by name, the entry computation's name) of an HLO module's text."""
    comps: dict[str, Computation] = {}
    entry, current = "", None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h:
            current = Computation(h.group(2), {}, "", {})
            comps[current.name] = current
            if h.group(1):
                entry = current.name
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        ins = _parse_instr(line)
        if ins is None:
            continue
        current.instrs[ins.name] = ins
        if line.lstrip().startswith("ROOT "):
            current.root = ins.name
        if ins.op == "parameter":
            current.params[int(ins.literal)] = ins.name
    return comps, entry


def _called(ins: Instr) -> list[tuple[str, str]]:
    out = [(k, v) for k, v in _CALLED.findall(ins.attrs)]
    b = _BRANCHES.search(ins.attrs)
    if b:
        out += [("branch", n.strip().lstrip("%")) for n in b.group(1).split(",") if n.strip()]
    return out


def trip_count(ins: Instr, comp: Computation, comps: dict[str, Computation]) -> int | None:
    """A while loop's iterations: the compiler's `known_trip_count`, else read off an `i < N` condition on a
    tuple element whose start is a constant (0 when not found). None when neither says."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.attrs)
    if m:
        return int(m.group(1))
    cond = comps.get(dict(_called(ins)).get("condition", ""))
    if cond is None or not cond.root:
        return None
    root = cond.instrs[cond.root]
    if root.op != "compare" or "direction=LT" not in root.attrs or len(root.operands) != 2:
        return None
    lhs, rhs = (cond.instrs.get(o) for o in root.operands)
    if lhs is None or rhs is None or lhs.op != "get-tuple-element" or rhs.op != "constant":
        return None
    try:
        limit = int(rhs.literal)
    except ValueError:
        return None
    index = int(re.search(r"index=(\d+)", lhs.attrs).group(1))
    start = 0
    init = comp.instrs.get(ins.operands[0]) if ins.operands else None
    if init is not None and init.op == "tuple" and index < len(init.operands):
        first = comp.instrs.get(init.operands[index])
        if first is not None and first.op == "constant":
            try:
                start = int(first.literal)
            except ValueError:
                pass
    return max(limit - start, 0)


def _collective_kind(op: str) -> str | None:
    base = op.removesuffix("-start")
    return base if base in COLLECTIVES else None


@dataclasses.dataclass
class Collectives:
    """Collective instructions of a program by kind: their count and operand bytes, each loop iteration counted."""

    count: dict = dataclasses.field(default_factory=dict)
    bytes: dict = dataclasses.field(default_factory=dict)

    def add(self, other: "Collectives", times: float = 1.0) -> None:
        for k, v in other.count.items():
            self.count[k] = self.count.get(k, 0) + times * v
        for k, v in other.bytes.items():
            self.bytes[k] = self.bytes.get(k, 0) + times * v


@dataclasses.dataclass
class Loop:
    body: str
    trips: int | None  # None: the compiler does not know it (a data-dependent loop); counted once


def _walk(name: str, comps: dict[str, Computation], memo: dict, loops: list) -> Collectives:
    """The collectives of one pass of computation `name`, what it calls included (loop bodies per iteration)."""
    if name in memo:
        return memo[name]
    out = Collectives()
    comp = comps.get(name)
    for ins in (comp.instrs.values() if comp is not None else ()):
        kind = _collective_kind(ins.op)
        if kind is not None:
            b = sum(shape_bytes(comp.instrs[o].shape) for o in ins.operands if o in comp.instrs)
            out.add(Collectives({kind: 1}, {kind: b}))
        called = dict(_called(ins))
        if ins.op == "while":
            n = trip_count(ins, comp, comps)
            loops.append(Loop(called["body"], n))
            out.add(_walk(called["body"], comps, memo, loops), n or 1)
            continue
        for _, c in _called(ins):  # fusions (TPU's async collectives are fusions), calls, branches, reducers
            out.add(_walk(c, comps, memo, loops))
    memo[name] = out
    return out


def collectives(text: str) -> tuple[Collectives, list[Loop]]:
    """-> (the collectives of an HLO module's text, loop iterations counted; its while loops)."""
    comps, entry = parse_module(text)
    loops: list[Loop] = []
    return _walk(entry, comps, {}, loops), loops


def xla_cost_analysis(compiled) -> dict:
    """`compiled.cost_analysis()` as one dict (flops, bytes accessed, on TPU optimal_seconds): the compiler's
    estimate, with each loop body counted once."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older jax: one dict per program
        ca = ca[0] if ca else {}
    return dict(ca or {})


@dataclasses.dataclass
class Cost:
    """Per-device figures of a program by the compiler's cost model: flops, HBM bytes, estimated seconds (TPU's
    `optimal_seconds`; None off TPU) and collective operand bytes and counts by kind."""

    flops: float = 0.0
    bytes: float = 0.0
    seconds: float | None = 0.0
    collective_bytes: dict = dataclasses.field(default_factory=dict)
    collective_count: dict = dataclasses.field(default_factory=dict)

    def collectives_text(self, size: Callable[[float], str]) -> str:
        """'all-gather 1.2 GiB, all-reduce 4.0 MiB' (bytes as `size` writes them), or 'none'."""
        return ", ".join(f"{k} {size(v)}" for k, v in sorted(self.collective_bytes.items()) if v) or "none"

    def plus(self, other: "Cost", times: float = 1.0) -> "Cost":
        merge = lambda a, b: {k: a.get(k, 0) + times * b.get(k, 0) for k in {*a, *b}}  # noqa: E731
        seconds = None if self.seconds is None or other.seconds is None else self.seconds + times * other.seconds
        return Cost(self.flops + times * other.flops, self.bytes + times * other.bytes, seconds,
                    merge(self.collective_bytes, other.collective_bytes),
                    merge(self.collective_count, other.collective_count))


def program_cost(compiled) -> Cost:
    """The compiler's cost analysis of `compiled` and its collectives."""
    ca = xla_cost_analysis(compiled)
    coll, _ = collectives(compiled.as_text())
    seconds = ca.get("optimal_seconds")
    if seconds is not None and seconds < 0:
        # libtpu adds -1 s for each instruction it cannot time (seen: -2.99917 s for a program whose bytes over
        # the HBM bandwidth are 0.83 ms): the fraction is its estimate of the rest.
        seconds -= math.floor(seconds)
    return Cost(ca.get("flops", 0.0), ca.get("bytes accessed", 0.0), seconds, coll.bytes, coll.count)


@contextlib.contextmanager
def unrolled_scans():
    """Every `lax.scan` traced inside runs unrolled (no while loop), so that the cost analysis counts each
    iteration."""
    import jax

    scan = jax.lax.scan
    jax.lax.scan = functools.partial(scan, unroll=True)
    try:
        yield
    finally:
        jax.lax.scan = scan


def by_depth(cost_at: Callable[[int, int], Cost], text_layers: int, vision_layers: int = 0) -> Cost:
    """The cost of a program whose loops run over `text_layers` decoder layers (and `vision_layers` vision ones; 0:
    no vision tower), from `cost_at(text, vision)`, the cost of the program built with that many layers and its
    scans unrolled: the analysis counts a loop body once, so the cost is taken at 1 and 2 layers of each stack and
    extrapolated linearly to the model's depth."""
    base = cost_at(1, 1)
    total = base.plus(cost_at(2, 1).plus(base, -1), text_layers - 1)
    if vision_layers:
        total = total.plus(cost_at(1, 2).plus(base, -1), vision_layers - 1)
    return total
