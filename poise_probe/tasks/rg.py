"""Reasoning-gym adapter: any of its procedural datasets as a Task, scored by its own verifier.

Domain mapping (from the reasoning-gym subpackage a dataset class lives in, `dataset.category`;
pass `domain=` to override):

- math: ``arithmetic``, ``algebra``, ``geometry``, ``probability``;
- code: ``code`` (``bf``, ``codeio``: reading and running programs);
- logic: everything else: ``logic``, ``games``, ``cognition``, ``induction``, ``arc``, ``graphs``
  (family relations, course schedules, paths: relational puzzles more than mathematics),
  ``algorithmic`` (string and list manipulation puzzles, not program writing).

A ``composite`` mix gives each example the domain of the dataset it was drawn from.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import logging
from collections import OrderedDict
from typing import Any

import reasoning_gym
from reasoning_gym.factory import DATASETS

from poise_probe.tasks.base import DOMAINS, Example, Task, check_split, extract_answer, is_heldout
from poise_probe.tasks.files import to_jsonable

logger = logging.getLogger(__name__)

#: reasoning-gym category (subpackage) -> domain; categories not listed map to "logic".
CATEGORY_DOMAINS: dict[str, str] = {
    "arithmetic": "math",
    "algebra": "math",
    "geometry": "math",
    "probability": "math",
    "code": "code",
}

#: Appended to every question so that `extract_answer` finds the model's final answer.
ANSWER_INSTRUCTION = "Give your final answer inside <answer></answer> tags."

# Chunk c of a split holds _FIRST_CHUNK * 2**c items (capped): sizes do not depend on n, so a
# smaller sample is a prefix of a larger one, and big samples need few dataset constructions.
_FIRST_CHUNK = 256
_MAX_CHUNK = 16384  # word_ladder refuses sizes above 20000
_ENTRY_CACHE = 8192


@contextlib.contextmanager
def _quiet():
    """Route what a generator prints (bf's compiler prints progress dots) to the debug log."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    if buf.getvalue():
        logger.debug("reasoning-gym printed: %s", buf.getvalue()[:500])


def list_datasets() -> list[str]:
    """Every reasoning-gym dataset name, sorted; use one as ``rg:<name>`` in `get_task`."""
    return sorted(DATASETS)


def dataset_category(name: str) -> str:
    """The reasoning-gym subpackage (``arithmetic``, ``logic``...) that defines dataset `name`."""
    _check_name(name)
    parts = DATASETS[name][0].__module__.split(".")
    return parts[1] if len(parts) >= 2 else "other"  # reasoning_gym.composite -> "composite"


def _check_name(name: str) -> None:
    if name not in DATASETS:
        close = difflib.get_close_matches(name, list(DATASETS), n=5, cutoff=0.5)
        hint = f"close names: {close}" if close else "no close names"
        raise KeyError(f"unknown reasoning-gym dataset {name!r} ({hint}); list them all with "
                       f"poise_probe.tasks.rg.list_datasets().")


class ReasoningGymTask(Task):
    """A reasoning-gym dataset as a Task: its questions, its `score_answer`, a held-out tenth.

    `config` goes to the dataset's config class (difficulty knobs such as ``min_terms``); `seed`
    and `size` are set by `sample`. Examples keep the generating entry in
    ``extra_info["entry"]`` (JSON-safe) plus ``dataset_seed``/``dataset_size``/``dataset_index``
    so that scoring can regenerate the exact entry.
    """

    def __init__(self, dataset_name: str, domain: str | None = None, **config: Any) -> None:
        _check_name(dataset_name)
        for key in ("seed", "size"):
            if key in config:
                raise ValueError(f"rg:{dataset_name}: config field {key!r} is set by "
                                 f"sample(n, seed, split); got {key}={config[key]!r}. Drop it.")
        self.dataset_name = dataset_name
        self.name = f"rg:{dataset_name}"
        self.category = dataset_category(dataset_name)
        self._fixed_domain = domain is not None
        if dataset_name == "composite" and isinstance(config.get("datasets"), list):
            # YAML configs give plain dicts; reasoning-gym wants DatasetSpec objects.
            from reasoning_gym.composite import DatasetSpec

            try:
                config["datasets"] = [DatasetSpec(**d) if isinstance(d, dict) else d
                                      for d in config["datasets"]]
            except TypeError as e:
                raise ValueError(f"rg:composite: config field 'datasets' has an entry that is "
                                 f"not a DatasetSpec ({e}); give each as {{name: ..., weight: "
                                 f"..., config: {{...}}}}.") from e
        if domain is None:
            domain = CATEGORY_DOMAINS.get(self.category, "logic")
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}; got {domain!r} for {self.name}.")
        self.domain = domain
        self.config = dict(config)
        self._datasets: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._entries: OrderedDict[tuple[int, int], dict[str, Any]] = OrderedDict()
        self._scorer = self._dataset(0, 1)  # validates the config here, at the boundary

    def _dataset(self, seed: int, size: int):
        """The dataset built with this task's config, `seed` and `size` (a few kept built)."""
        key = (seed, size)
        if key in self._datasets:
            self._datasets.move_to_end(key)
            return self._datasets[key]
        try:
            with _quiet():
                ds = reasoning_gym.create_dataset(self.dataset_name, seed=seed, size=size,
                                                  **self.config)
        except (TypeError, ValueError, AssertionError) as e:
            _, config_cls = DATASETS[self.dataset_name]
            fields = sorted(getattr(config_cls, "__dataclass_fields__", {}))
            raise ValueError(f"{self.name}: invalid config {self.config!r}: {e}. Config fields "
                             f"of {config_cls.__name__}: {fields}.") from e
        self._datasets[key] = ds
        if len(self._datasets) > 4:
            self._datasets.popitem(last=False)
        return ds

    def _chunk_seed(self, split: str, seed: int, chunk: int) -> int:
        # Train and test draw from different dataset seeds; the hash filter makes them disjoint.
        key = f"{self.name}|{split}|{seed}|{chunk}"
        return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)

    def sample(self, n: int, seed: int = 0, split: str = "train") -> list[Example]:
        """`n` distinct examples of `split`; test keeps only questions in the held-out tenth."""
        check_split(split)
        if n < 0:
            raise ValueError(f"n must be >= 0; got {n}.")
        out: list[Example] = []
        seen: set[str] = set()
        tried, chunk = 0, 0
        budget = 200 * n + 1000
        while len(out) < n:
            size = min(_FIRST_CHUNK * 2 ** chunk, _MAX_CHUNK)
            ds_seed = self._chunk_seed(split, seed, chunk)
            ds = self._dataset(ds_seed, size)
            for idx in range(size):
                if len(out) >= n:
                    break
                tried += 1
                if tried > budget:
                    raise RuntimeError(f"task {self.name!r} could only find {len(out)} distinct "
                                       f"{split} examples of {n} asked for; lower n or widen "
                                       f"the config {self.config!r}.")
                try:
                    with _quiet():
                        entry = ds[idx]
                except IndexError:  # some datasets shrink their size when they run out
                    break
                question = entry["question"]
                prompt = f"{question}\n\n{ANSWER_INSTRUCTION}"
                if question in seen or is_heldout(prompt) != (split == "test"):
                    continue
                seen.add(question)
                self._remember((ds_seed, idx), entry)
                out.append(self._example(entry, prompt, split, ds_seed, size, idx))
            chunk += 1
        return out

    def _example(self, entry: dict[str, Any], prompt: str, split: str, ds_seed: int, size: int,
                 idx: int) -> Example:
        domain = self.domain
        source = entry.get("metadata", {}).get("source_dataset")
        if self.category == "composite" and not self._fixed_domain and source in DATASETS:
            domain = CATEGORY_DOMAINS.get(dataset_category(source), "logic")
        answer = entry.get("answer")
        # Datasets that verify instead of comparing (propositional_logic, rush_hour...) have
        # answer None: an empty ground truth says "no single reference answer".
        return Example(prompt=prompt, ground_truth="" if answer is None else str(answer),
                       domain=domain, data_source=self.name,
                       extra_info={"split": split, "dataset_seed": ds_seed,
                                   "dataset_size": size, "dataset_index": idx,
                                   "entry": to_jsonable(entry)})

    def _remember(self, key: tuple[int, int], entry: dict[str, Any]) -> None:
        self._entries[key] = entry
        if len(self._entries) > _ENTRY_CACHE:
            self._entries.popitem(last=False)

    def entry(self, example: Example) -> dict[str, Any]:
        """The reasoning-gym entry behind `example`, as the dataset generated it.

        Cached entries and regenerated ones (same seed, size, index and question) keep their
        original types (ARC grids are tuples); otherwise the JSON copy in extra_info is used.
        """
        info = example.extra_info
        stored = info.get("entry")
        try:
            key = (int(info["dataset_seed"]), int(info["dataset_index"]))
            size = int(info["dataset_size"])
        except (KeyError, TypeError, ValueError):
            key = None
        if key is not None:
            if key in self._entries:
                return self._entries[key]
            try:
                with _quiet():
                    entry = self._dataset(key[0], size)[key[1]]
            except Exception:  # a foreign or stale example: fall back to the stored copy
                logger.debug("could not regenerate %s entry %s", self.name, key, exc_info=True)
                entry = None
            if entry is not None and (stored is None or entry["question"] == stored["question"]):
                self._remember(key, entry)
                return entry
        if not isinstance(stored, dict):
            raise ValueError(f"{self.name}: example {example.prompt_id} has no "
                             f"extra_info['entry']; score examples made by "
                             f"ReasoningGymTask.sample (or written from them by write_rows).")
        return stored

    def has_answer(self, completion: str, example: Example) -> bool:
        """`extract_answer` found an answer (otherwise `score` is 0 without asking the dataset)."""
        return extract_answer(completion) is not None

    def score(self, completion: str, example: Example) -> float:
        """The dataset's own `score_answer` on the extracted answer, clamped to [0, 1]."""
        answer = extract_answer(completion)
        if answer is None:
            return 0.0
        entry = self.entry(example)
        try:
            reward = float(self._scorer.score_answer(answer, entry))
        except Exception:  # a verifier crashing on odd model output is a wrong answer
            logger.debug("%s score_answer failed on %r", self.name, answer, exc_info=True)
            return 0.0
        if reward != reward:  # NaN
            return 0.0
        return min(1.0, max(0.0, reward))


__all__ = ["ANSWER_INSTRUCTION", "CATEGORY_DOMAINS", "ReasoningGymTask", "dataset_category",
           "list_datasets"]
