"""Tasks from files of verl-format rows (JSONL, JSON, Parquet), and writing examples back.

A row is ``{"data_source": str, "prompt": chat list or str, "ability": str,
"reward_model": {"style": "rule", "ground_truth": str | number}, "extra_info": dict}``.

Domain of a row: the `domain=` argument, else ``extra_info.domain``, else mapped from
``ability``: "math" -> math; "code", "coding", "programming" -> code; anything else
("logic", "reasoning", missing...) -> logic. Scoring follows the domain: math rows use
math-verify, code rows whose ground truth is a test program (it contains ``assert`` or
``def check``) run completion plus tests in `poise_probe.sandbox`, all else is exact match.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from poise_probe.tasks.base import (DOMAINS, Example, Task, check_split, exact_match,
                                    extract_answer, is_heldout)

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".parquet")

#: ability (lower-cased) -> domain; other abilities map to "logic".
ABILITY_DOMAINS: dict[str, str] = {
    "math": "math",
    "code": "code",
    "coding": "code",
    "programming": "code",
}

#: extra_info.split values -> split; verl files often say "validation" for held-out rows.
SPLIT_NAMES: dict[str, str] = {"train": "train", "test": "test", "val": "test",
                               "valid": "test", "validation": "test"}

_CHECK_CALL_RE = re.compile(r"^check\(", re.MULTILINE)


def to_jsonable(value: Any) -> Any:
    """A JSON-serialisable copy: tuples and sets become lists, dict keys strings, others str.

    Numpy scalars and arrays become numbers and lists, dataclasses dicts, NaN and inf stay
    floats (json writes them as NaN/Infinity, which json reads back).
    """
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, str):  # numpy.str_ and other subclasses
        return str(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, (int, float)):
        return int(value) if isinstance(value, int) else float(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [to_jsonable(v) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=repr)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return to_jsonable(value.tolist())
    if hasattr(value, "item") and callable(value.item):
        try:
            return to_jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def domain_of_ability(ability: Any) -> str:
    """verl's `ability` string mapped to math, code or logic (see the module docstring)."""
    if not isinstance(ability, str):
        return "logic"
    return ABILITY_DOMAINS.get(ability.strip().lower(), "logic")


def is_test_program(ground_truth: str) -> bool:
    """True if a code ground truth is a program to run rather than an expected output."""
    return "assert" in ground_truth or "def check" in ground_truth


# --- reading ---------------------------------------------------------------------------

def _read_raw(path: Path) -> list[tuple[str, Any]]:
    """(location, row) pairs; the location names the 1-based line or the row index."""
    if not path.exists():
        raise FileNotFoundError(f"task file {str(path)!r} does not exist; check the path.")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        # surrogateescape: a byte that is not UTF-8 is reported with its line, not as a bare
        # UnicodeDecodeError; utf-8-sig accepts the byte-order mark some editors write.
        # newline="\n": JSON Lines ends lines with \n only; a \r inside a line is whitespace
        with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="\n") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {lineno}"
                _check_utf8(line, where)
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    cut = ("" if line.endswith("\n") else " The last line has no newline at its "
                           "end, so the file looks cut off (an interrupted write or copy): "
                           "restore the whole file or delete that partial line.")
                    raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); "
                                     f"each line must be one JSON object.{cut}") from e
                except (ValueError, RecursionError) as e:  # a 5000-digit number, deep nesting
                    raise ValueError(f"{where}: JSON this reader refuses ({type(e).__name__}: "
                                     f"{str(e)[:120]}); each line must be one plain JSON "
                                     f"object.") from None
                _check_strings(row, where)
                rows.append((f"line {lineno}", row))
        return rows
    if suffix == ".json":
        text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
        _check_utf8(text, str(path))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column "
                             f"{e.colno}); a .json task file holds one list of rows.") from e
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path}: JSON this reader refuses ({type(e).__name__}: "
                             f"{str(e)[:120]}); a .json task file holds one list of rows.") from None
        _check_strings(data, str(path))
        if not isinstance(data, list):
            raise ValueError(f"{path}: top level is a {type(data).__name__}; a .json task file "
                             f"holds a list of row objects (use .jsonl for one row per line).")
        return [(f"row {i}", row) for i, row in enumerate(data)]
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: not a readable Parquet file ({str(e).strip()}); it is "
                             f"truncated, corrupt or not Parquet: write it again (write_rows, "
                             f"or pandas DataFrame.to_parquet) or copy it anew.") from e
        return [(f"row {i}", _from_parquet(row)) for i, row in enumerate(rows)]
    raise ValueError(f"task file {str(path)!r} has unsupported extension {path.suffix!r}; use "
                     f"one of {SUFFIXES}.")


def _check_strings(value: Any, where: str) -> None:
    """ValueError when a string decoded from JSON holds an unpaired surrogate (an escape such as
    \\ud800 with no partner): it is no text, and would fail later where it is encoded."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: a string holds an unpaired surrogate escape "
                         f"(\\u{ord(e.object[e.start]):04x}), which is not text; write the "
                         f"character itself or a valid escape pair.") from None


def _check_utf8(text: str, where: str) -> None:
    """ValueError naming the first byte of `text` (read with surrogateescape) that is not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(text[e.start]) - 0xDC00  # surrogateescape maps byte b to U+DC00 + b
        raise ValueError(f"{where}: not UTF-8 text (byte 0x{byte:02x} at character "
                         f"{e.start + 1}); save the task file as UTF-8.") from None


def _drop_none(info: Any) -> Any:
    return {k: v for k, v in info.items() if v is not None} if isinstance(info, dict) else info


def _from_parquet(row: dict[str, Any]) -> dict[str, Any]:
    """Undo Parquet's struct union: keys absent from a row's extra_info read back as None."""
    if isinstance(row.get("extra_info"), dict):
        row["extra_info"] = _drop_none(row["extra_info"])
    return row


def _check_prompt(prompt: Any, where: str) -> str | list[dict[str, str]]:
    fix = ("prompt must be a string or a chat list of {'role': ..., 'content': ...} objects "
           "with string values")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}: field 'prompt' is {_short(prompt)}, a blank string; "
                             f"each row needs the question for the model to answer.")
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"{where}: field 'prompt' is a {type(prompt).__name__} "
                         f"({_short(prompt)}); {fix}.")
    out = []
    for i, msg in enumerate(prompt):
        if (not isinstance(msg, dict) or not isinstance(msg.get("role"), str)
                or not isinstance(msg.get("content"), str)):
            raise ValueError(f"{where}: field 'prompt[{i}]' is {_short(msg)}; {fix}.")
        out.append({"role": msg["role"], "content": msg["content"]})
    if not any(m["content"].strip() for m in out):
        raise ValueError(f"{where}: field 'prompt' is {_short(prompt)}: every message's content "
                         f"is empty; each row needs the question for the model to answer.")
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _row_to_example(row: Any, where: str, domain: str | None) -> tuple[Example, str | None]:
    """Validate one verl row; the Example and its explicit split (None if it has none)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: row is a {type(row).__name__} ({_short(row)}); each row "
                         f"must be a JSON object with data_source, prompt and reward_model.")
    source = row.get("data_source")
    if not isinstance(source, str) or not source:
        state = "is missing" if source is None else f"is {_short(source)}"
        raise ValueError(f"{where}: field 'data_source' {state}; each row needs a non-empty "
                         f"data_source string naming where it comes from.")
    if "prompt" not in row or row["prompt"] is None:
        raise ValueError(f"{where}: field 'prompt' is missing; each row needs a prompt (a "
                         f"string or a chat list of {{role, content}} objects).")
    prompt = _check_prompt(row["prompt"], where)
    reward = row.get("reward_model")
    if not isinstance(reward, dict):
        state = "is missing" if reward is None else f"is a {type(reward).__name__}"
        raise ValueError(f"{where}: field 'reward_model' {state}; each row needs "
                         f"reward_model: {{style: 'rule', ground_truth: ...}}.")
    truth = reward.get("ground_truth")
    if truth is None:
        raise ValueError(f"{where}: field 'reward_model.ground_truth' is missing; each row needs "
                         f"reward_model: {{ground_truth: ...}}.")
    if isinstance(truth, bool) or not isinstance(truth, (str, int, float)) or (
            isinstance(truth, float) and not math.isfinite(truth)):
        raise ValueError(f"{where}: field 'reward_model.ground_truth' is {_short(truth)}; it "
                         f"must be a string or a finite number.")
    info = row.get("extra_info")
    if info is None:
        info = {}
    elif isinstance(info, str):  # write_rows stores irregular extra_info as JSON text
        try:
            info = json.loads(info)
        except json.JSONDecodeError:
            info = None
    if not isinstance(info, dict):
        raise ValueError(f"{where}: field 'extra_info' is {_short(row.get('extra_info'))}; it "
                         f"must be an object (or left out).")
    row_domain = domain or info.get("domain") or domain_of_ability(row.get("ability"))
    if row_domain not in DOMAINS:
        raise ValueError(f"{where}: field 'extra_info.domain' is {row_domain!r}; it must be one "
                         f"of {DOMAINS} (or left out to map from 'ability').")
    split = info.get("split")
    if split is not None:
        if not isinstance(split, str) or split.lower() not in SPLIT_NAMES:
            raise ValueError(f"{where}: field 'extra_info.split' is {_short(split)}; it must be "
                             f"one of {sorted(SPLIT_NAMES)} (or left out to split by hash).")
        split = SPLIT_NAMES[split.lower()]
    if (row_domain == "code" and isinstance(truth, str) and "def check" in truth
            and not _CHECK_CALL_RE.search(truth) and not isinstance(info.get("entry_point"), str)):
        raise ValueError(f"{where}: field 'extra_info.entry_point' is missing; a test program "
                         f"defining check(candidate) needs the name of the function to check.")
    example = Example(prompt=prompt, ground_truth=str(truth), domain=row_domain,
                      data_source=source, extra_info=info)
    return example, split


class FileTask(Task):
    """Rows of a verl-format JSONL/JSON/Parquet file as a Task, loaded and checked up front.

    `domain` forces every row's domain; `name` defaults to ``file:<file name>``. The task's own
    `domain` is the most common row domain (each Example carries its own).
    """

    def __init__(self, path: str | Path, domain: str | None = None,
                 name: str | None = None) -> None:
        self.path = Path(path)
        if domain is not None and domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS} or None; got {domain!r}.")
        if self.path.suffix.lower() not in SUFFIXES:
            raise ValueError(f"task file {str(self.path)!r} has unsupported extension "
                             f"{self.path.suffix!r}; use one of {SUFFIXES}.")
        self.name = name or f"file:{self.path.name}"
        raw = _read_raw(self.path)
        if not raw:
            raise ValueError(f"task file {str(self.path)!r} has no rows; add verl-format rows "
                             f"(data_source, prompt, reward_model.ground_truth).")
        self.examples: list[Example] = []
        self.splits: list[str] = []
        for loc, row in raw:
            ex, split = _row_to_example(row, f"{self.path} {loc}", domain)
            if split is None:
                key = ex.prompt if isinstance(ex.prompt, str) else repr(ex.prompt)
                split = "test" if is_heldout(key) else "train"
            self.examples.append(ex)
            self.splits.append(split)
        counts = Counter(ex.domain for ex in self.examples)
        self.domain = domain or min(counts, key=lambda d: (-counts[d], d))

    def __len__(self) -> int:
        return len(self.examples)

    def sample(self, n: int, seed: int = 0, split: str = "train") -> list[Example]:
        """`n` rows of `split`, shuffled by `seed`; ``extra_info.split`` wins over the hash."""
        check_split(split)
        if n < 0:
            raise ValueError(f"n must be >= 0; got {n}.")
        pool = [ex for ex, s in zip(self.examples, self.splits) if s == split]
        if n > len(pool):
            raise ValueError(f"{self.name}: asked for n={n} {split} examples but {self.path} has "
                             f"only {len(pool)} {split} rows (of {len(self.examples)}); lower n.")
        random.Random(f"{self.name}|{split}|{seed}").shuffle(pool)
        return pool[:n]

    def score(self, completion: str, example: Example) -> float:
        """math-verify for math, the sandbox for code test programs, exact match otherwise."""
        if example.domain == "math":
            from poise_probe.tasks.mathverify import score_math

            return score_math(completion, example.ground_truth)
        if example.domain == "code" and is_test_program(example.ground_truth):
            from poise_probe.sandbox import ran_to_the_end, run_python, with_end_marker

            program, marker = with_end_marker(test_program(completion, example))
            return float(ran_to_the_end(run_python(program), marker))
        return exact_match(completion, example.ground_truth)

    def has_answer(self, completion: str, example: Example) -> bool:
        """`<answer>…</answer>` or `\\boxed{}` found. A math answer that math-verify finds only
        as bare text or `$…$` does not count here (a rewarded one is valid anyway, see
        `score_rollouts`); code rows run as test programs cannot tell, so they count as valid."""
        if example.domain == "code" and is_test_program(example.ground_truth):
            return True
        return extract_answer(completion) is not None

    def score_many(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """Like `score`, with all code test programs run together by `sandbox.run_many`."""
        from poise_probe.sandbox import with_end_marker

        if len(completions) != len(examples):
            raise ValueError(f"score_many needs as many completions as examples; got "
                             f"{len(completions)} and {len(examples)}.")
        scores: list[float | None] = [None] * len(examples)
        programs, where = [], []
        for i, (c, ex) in enumerate(zip(completions, examples)):
            if ex.domain == "code" and is_test_program(ex.ground_truth):
                programs.append(with_end_marker(test_program(c, ex)))
                where.append(i)
            else:
                scores[i] = self.score(c, ex)
        if programs:
            from poise_probe.sandbox import ran_to_the_end, run_many

            results = run_many([p for p, _ in programs])
            for i, res, (_, marker) in zip(where, results, programs):
                scores[i] = float(ran_to_the_end(res, marker))
        return [float(s) for s in scores]


def test_program(completion: str, example: Example) -> str:
    """The program to run: completion code, then the row's tests, then ``check(entry_point)``.

    Rows with ``extra_info.prompt`` and ``entry_point`` (HumanEval exported by `write_rows`) are
    built exactly as `humaneval.build_program` does: the function stub first, so that a
    body-only completion continues it.
    """
    from poise_probe.tasks.humaneval import build_program, extract_code

    tests = example.ground_truth
    info = example.extra_info
    entry_point = info.get("entry_point")
    if isinstance(info.get("prompt"), str) and isinstance(entry_point, str):
        program = build_program(completion, example) + "\n"
    else:
        program = f"{extract_code(completion)}\n\n{tests}\n"
    if "def check" in tests and not _CHECK_CALL_RE.search(tests) and entry_point:
        program += f"\ncheck({entry_point})\n"
    return program


test_program.__test__ = False  # not a pytest test, despite the name


# --- writing ---------------------------------------------------------------------------

def _to_row(ex: Example, chat: bool) -> dict[str, Any]:
    prompt = ex.messages if chat else ex.prompt
    return {"data_source": ex.data_source, "prompt": prompt, "ability": ex.domain,
            "reward_model": {"style": "rule", "ground_truth": ex.ground_truth},
            "extra_info": to_jsonable(ex.extra_info)}


def write_rows(path: str | Path, examples: Iterable[Example]) -> Path:
    """Write examples as verl-format rows (.jsonl, .json or .parquet, by suffix); returns path.

    `ability` is the example's domain, so reading the file back gives the same domains. In
    Parquet, prompts are all chat lists unless all are strings, and extra_info is a struct
    column unless the rows' extra_info do not fit one schema; then it is JSON text, which
    `FileTask` decodes.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"write_rows: path {str(path)!r} has unsupported extension "
                         f"{path.suffix!r}; use one of {SUFFIXES}.")
    examples = list(examples)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if suffix in (".jsonl", ".json"):
        rows = [_to_row(ex, chat=False) for ex in examples]
        with tmp.open("w", encoding="utf-8") as f:
            if suffix == ".json":
                json.dump(rows, f, ensure_ascii=False)
            else:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        _write_parquet(tmp, examples)
    tmp.replace(path)  # written whole, then renamed into place
    return path


def _write_parquet(path: Path, examples: list[Example]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = not all(isinstance(ex.prompt, str) for ex in examples)
    rows = [_to_row(ex, chat=chat) for ex in examples]
    infos = [row.pop("extra_info") for row in rows]
    table = pa.Table.from_pylist(rows) if rows else pa.table({
        "data_source": pa.array([], pa.string()), "prompt": pa.array([], pa.string())})
    if any(infos):
        try:
            column = pa.array(infos)
            # A struct column fills keys a row lacks with None, also in nested objects: keep
            # it only when it reads back unchanged.
            if (not pa.types.is_struct(column.type)
                    or [_drop_none(i) for i in column.to_pylist()] != infos):
                raise pa.ArrowInvalid("extra_info does not fit one struct schema")
            pq.write_table(table.append_column("extra_info", column), path)
            return
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            column = pa.array([json.dumps(i) for i in infos], pa.string())
        table = table.append_column("extra_info", column)
    pq.write_table(table, path)


__all__ = ["ABILITY_DOMAINS", "FileTask", "SPLIT_NAMES", "domain_of_ability", "is_test_program",
           "test_program", "to_jsonable", "write_rows"]
