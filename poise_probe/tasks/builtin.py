"""Built-in task families the tiny reasoner learns: chain arithmetic, boolean logic, program output.

Each family generates prompts with difficulty knobs and writes step-by-step reference traces in
the `<think>…</think><answer>…</answer>` format, optionally with one deliberate mistake (a wrong
step carried through to a wrong answer) so that a model pre-trained on them fails in the ways a
real reasoner does.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Union

from poise_probe.tasks import register_task
from poise_probe.tasks.base import Example, Task, exact_match, extract_answer


def format_trace(steps: list[str], answer: str) -> str:
    """The completion format every built-in family uses."""
    return f"<think>{';'.join(steps)}</think><answer>{answer}</answer>"


def _check_range(name: str, lo: int, hi: int, minimum: int) -> None:
    if not (minimum <= lo <= hi):
        raise ValueError(f"{name} must satisfy {minimum} <= min <= max; got ({lo}, {hi}).")


class TraceTask(Task):
    """A built-in family: exact-match scoring plus a reference-trace writer for pre-training."""

    def score(self, completion: str, example: Example) -> float:
        return exact_match(completion, example.ground_truth)

    def has_answer(self, completion: str, example: Example) -> bool:
        """`<answer>…</answer>` or `\\boxed{}` found: what `exact_match` compares."""
        return extract_answer(completion) is not None

    def reference(self, example: Example, rng: random.Random | None = None,
                  error_rate: float = 0.0) -> str:
        """A step-by-step solution; with probability `error_rate` one step is wrong."""
        steps, answer = self._solve(example, rng or random.Random(0),
                                    corrupt=rng is not None and rng.random() < error_rate)
        return format_trace(steps, answer)

    def _solve(self, example: Example, rng: random.Random,
               corrupt: bool) -> tuple[list[str], str]:  # pragma: no cover - abstract
        raise NotImplementedError


# --- math: chain arithmetic ----------------------------------------------------------------

@register_task("arith")
class ArithTask(TraceTask):
    """`Compute 7+5-3*2.` evaluated left to right, one partial result per step."""

    name = "arith"
    domain = "math"

    def __init__(self, min_terms: int = 2, max_terms: int = 4, max_operand: int = 12,
                 ops: str = "+-"):
        _check_range("arith terms", min_terms, max_terms, 2)
        if max_operand < 1:
            raise ValueError(f"arith max_operand must be >= 1; got {max_operand}.")
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"arith ops must be a non-empty subset of '+-*'; got {ops!r}.")
        self.min_terms, self.max_terms, self.max_operand, self.ops = (
            min_terms, max_terms, max_operand, ops)

    def _generate(self, rng: random.Random) -> Example:
        n = rng.randint(self.min_terms, self.max_terms)
        terms = [rng.randint(1, self.max_operand) for _ in range(n)]
        ops = [rng.choice(self.ops) for _ in range(n - 1)]
        expr = str(terms[0]) + "".join(o + str(t) for o, t in zip(ops, terms[1:]))
        value = terms[0]
        for o, t in zip(ops, terms[1:]):
            value = _apply(o, value, t)
        order = " left to right" if "*" in self.ops else ""  # +/- chains need no order note
        return Example(prompt=f"Compute {expr}{order}.", ground_truth=str(value),
                       domain=self.domain, data_source="poise/arith",
                       extra_info={"terms": terms, "ops": ops})

    def _solve(self, example, rng, corrupt):
        terms, ops = example.extra_info["terms"], example.extra_info["ops"]
        bad = rng.randrange(len(ops)) if corrupt else -1
        acc, steps = terms[0], []
        for i, (o, t) in enumerate(zip(ops, terms[1:])):
            new = _apply(o, acc, t) + (rng.choice([-2, -1, 1, 2, 10]) if i == bad else 0)
            steps.append(f"{acc}{o}{t}={new}")
            acc = new
        return steps, str(acc)


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


# --- logic: boolean formulas ---------------------------------------------------------------

Node = Union[bool, tuple]  # literal, ("!", child) or (op, left, right)


@register_task("boolean")
class BooleanTask(TraceTask):
    """`Evaluate (T&F)|!T.` rewritten one innermost operator at a time until one value is left."""

    name = "boolean"
    domain = "logic"

    def __init__(self, min_ops: int = 2, max_ops: int = 4, p_not: float = 0.25):
        _check_range("boolean ops", min_ops, max_ops, 1)
        if not 0.0 <= p_not < 1.0:
            raise ValueError(f"boolean p_not must be in [0, 1); got {p_not}.")
        self.min_ops, self.max_ops, self.p_not = min_ops, max_ops, p_not

    def _generate(self, rng: random.Random) -> Example:
        tree = _random_tree(rng, rng.randint(self.min_ops, self.max_ops), self.p_not)
        return Example(prompt=f"Evaluate {_show(tree, top=True)}.",
                       ground_truth=_lit(_eval(tree)), domain=self.domain,
                       data_source="poise/boolean", extra_info={"tree": json.dumps(tree)})

    def _solve(self, example, rng, corrupt):
        tree = _from_json(json.loads(example.extra_info["tree"]))
        n_ops = _count_ops(tree)
        # A wrong step must change the answer (else it teaches nothing about failing): try the
        # steps in random order; flipping the last step always changes it.
        order = rng.sample(range(n_ops), n_ops) if corrupt else [-1]
        for bad in order + [n_ops - 1]:
            steps, node = [], tree
            for i in range(n_ops):
                node = _reduce_once(node, flip=(i == bad))
                steps.append(_show(node, top=True))
            if not corrupt or node != _eval(tree):
                return steps, _lit(node)
        raise AssertionError("unreachable: flipping the last step changes the answer")


def _random_tree(rng: random.Random, n_ops: int, p_not: float) -> Node:
    if n_ops == 0:
        return rng.random() < 0.5
    if rng.random() < p_not:
        return ("!", _random_tree(rng, n_ops - 1, p_not))
    left = rng.randint(0, n_ops - 1)
    return (rng.choice("&|"), _random_tree(rng, left, p_not),
            _random_tree(rng, n_ops - 1 - left, p_not))


def _from_json(obj) -> Node:
    return obj if isinstance(obj, bool) else tuple(
        x if isinstance(x, str) else _from_json(x) for x in obj)


def _lit(v: bool) -> str:
    return "T" if v else "F"


def _show(node: Node, top: bool = False) -> str:
    if isinstance(node, bool):
        return _lit(node)
    if node[0] == "!":
        return "!" + _show(node[1])
    text = f"{_show(node[1])}{node[0]}{_show(node[2])}"
    return text if top else f"({text})"


def _eval(node: Node) -> bool:
    if isinstance(node, bool):
        return node
    if node[0] == "!":
        return not _eval(node[1])
    a, b = _eval(node[1]), _eval(node[2])
    return (a and b) if node[0] == "&" else (a or b)


def _count_ops(node: Node) -> int:
    return 0 if isinstance(node, bool) else 1 + sum(_count_ops(c) for c in node[1:])


def _reduce_once(node: Node, flip: bool) -> Node:
    """Replace the leftmost operator whose operands are all literals by its value."""
    if all(isinstance(c, bool) for c in node[1:]):
        return _eval(node) != flip
    children = list(node[1:])
    for k, child in enumerate(children):
        if not isinstance(child, bool):
            children[k] = _reduce_once(child, flip)
            break
    return (node[0], *children)


# --- code: output of a short generated program ---------------------------------------------

@dataclass
class _Line:
    code: str      # the Python statement
    var: str       # the variable it assigns
    expr: str      # the right-hand side, evaluable given earlier variables


@register_task("code_output")
class CodeOutputTask(TraceTask):
    """`What does this program print?` for straight-line integer code; truth from the sandbox."""

    name = "code_output"
    domain = "code"

    def __init__(self, min_lines: int = 2, max_lines: int = 4, p_cond: float = 0.25,
                 max_const: int = 9):
        _check_range("code_output lines", min_lines, max_lines, 1)
        if not 0.0 <= p_cond <= 1.0:
            raise ValueError(f"code_output p_cond must be in [0, 1]; got {p_cond}.")
        self.min_lines, self.max_lines, self.p_cond, self.max_const = (
            min_lines, max_lines, p_cond, max_const)

    def _generate(self, rng: random.Random) -> Example:
        while True:
            lines = self._program(rng)
            env: dict[str, int] = {}
            for ln in lines:
                env[ln.var] = eval(ln.expr, {}, dict(env))  # our own generated arithmetic
            if all(abs(v) < 100 for v in env.values()):
                break
        names = sorted(env)
        out = rng.choice([rng.choice(names), f"{rng.choice(names)}+{rng.choice(names)}"])
        program = "\n".join(ln.code for ln in lines) + f"\nprint({out})"
        return Example(prompt=f"What does this print?\n{program}", ground_truth="",
                       domain=self.domain, data_source="poise/code_output",
                       extra_info={"program": program,
                                   "lines": [[ln.var, ln.expr] for ln in lines], "out": out})

    def _program(self, rng: random.Random) -> list[_Line]:
        n = rng.randint(self.min_lines, self.max_lines)
        lines, defined = [], []
        for i in range(n):
            var = rng.choice("abc") if defined and rng.random() < 0.5 else "abc"[min(i, 2)]
            def operand():
                return rng.choice(defined) if defined and rng.random() < 0.6 else str(
                    rng.randint(0, self.max_const))
            expr = f"{operand()}{rng.choice('+-')}{operand()}" if defined else str(
                rng.randint(0, self.max_const))
            if defined and rng.random() < self.p_cond:
                c = rng.choice(defined)
                k = rng.randint(0, self.max_const)
                expr = f"{expr} if {c}>{k} else {operand()}"
            lines.append(_Line(code=f"{var}={expr}", var=var, expr=expr))
            if var not in defined:
                defined.append(var)
        return lines

    def _finalize(self, examples: list[Example]) -> list[Example]:
        """Ground truth is what the program prints when executed in the sandbox."""
        outputs = run_programs([e.extra_info["program"] for e in examples])
        return [Example(prompt=e.prompt, ground_truth=o, domain=e.domain,
                        data_source=e.data_source, extra_info=e.extra_info)
                for e, o in zip(examples, outputs)]

    def _solve(self, example, rng, corrupt):
        lines, out = example.extra_info["lines"], example.extra_info["out"]
        # A wrong step must reach the printed value: try lines in random order.
        order = rng.sample(range(len(lines)), len(lines)) if corrupt else []
        truth = self._trace(lines, out, -1, 0)
        for bad in order:
            steps, answer = self._trace(lines, out, bad, rng.choice([-2, -1, 1, 2]))
            if answer != truth[1]:
                return steps, answer
        return truth

    @staticmethod
    def _trace(lines, out: str, bad: int, delta: int) -> tuple[list[str], str]:
        env: dict[str, int] = {}
        steps = []
        for i, (var, expr) in enumerate(lines):
            env[var] = eval(expr, {}, dict(env)) + (delta if i == bad else 0)
            steps.append(f"{var}={env[var]}")
        answer = str(eval(out, {}, dict(env)))
        if out not in env:  # the printed expression is a sum: show it as a last step
            steps.append(f"{out}={answer}")
        return steps, answer


_BATCH_DRIVER = """
import contextlib, io, json, sys
programs = json.loads(sys.stdin.read())
outs = []
for src in programs:
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            exec(compile(src, "<program>", "exec"), {"__name__": "__main__"})
        outs.append(buf.getvalue().strip())
    except Exception as exc:  # a failing program's output is its exception name
        outs.append(type(exc).__name__)
print(json.dumps(outs))
"""


def run_programs(programs: list[str], chunk: int = 256) -> list[str]:
    """Execute generated programs in the sandbox (chunks in parallel) and return their stdout."""
    from poise_probe.sandbox import SandboxLimits, run_many

    chunks = [programs[i:i + chunk] for i in range(0, len(programs), chunk)]
    results = run_many([_BATCH_DRIVER] * len(chunks), stdins=[json.dumps(c) for c in chunks],
                       limits=SandboxLimits(wall_time_s=60, cpu_time_s=60,
                                            max_output_bytes=4_000_000))
    outputs: list[str] = []
    for res, ch in zip(results, chunks):
        if not res.passed:
            raise RuntimeError(f"sandbox failed to run {len(ch)} generated programs: "
                               f"status={res.status}, stderr={res.stderr[-500:]!r}")
        outputs.extend(json.loads(res.stdout))
    return outputs
