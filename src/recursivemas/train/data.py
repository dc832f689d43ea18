"""Training rows: files (JSONL/Parquet), hub datasets, reasoning-gym generators and relay rows.

Two row formats are accepted, checked per row:

* ``{question, answer}`` — enough for the inner loop and the paper's unrolled outer loop;
* ``{question, plan, refined_plan, answer}`` — also feeds the release's teacher-forced outer loop.

Any row may carry ``context``: agent name -> private text (the relay task uses it). Rows become
``TrainRow`` objects; ``build_splits`` returns disjoint train and validation lists, and ``data_digest``
fingerprints them (and each source file) so a resumed run can tell that its data changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from recursivemas.errors import ConfigError, InputError
from recursivemas.eval.relay import NAMES, SENDER, TRAIN_NAMES, relay_rows
from recursivemas.eval.tasks import BOXED_SUFFIX, gym_dataset, load_task, read_rows
from recursivemas.fileio import atomic_write, sha256_file
from recursivemas.train.config import DataSection, SourceSpec

TEXT_FIELDS = ("question", "answer", "plan", "refined_plan")
RESERVED_FOR_EVAL = frozenset({"gsm_symbolic"})
TRAIN_SEED_OFFSET = 1_000_003  # generated training rows never reuse the evaluation's seeds (0, 10000)
VALIDATION_SEED_OFFSET = 2_000_003


@dataclass(frozen=True)
class TrainRow:
    """One training example. ``texts`` holds plan/refined_plan when the row has them."""

    question: str
    answer: str
    texts: dict[str, str] = field(default_factory=dict)
    context: dict[str, str] = field(default_factory=dict)
    answer_format: str | None = None

    def target_text(self, default_format: str) -> str:
        """The answering agent's target: the row's ``answer`` in its source's ``answer_format``, else in
        ``default_format`` (``data.answer_format``)."""
        return (self.answer_format or default_format).format(answer=self.answer)

    def field(self, name: str) -> str:
        """``question``, ``answer`` or a teacher text; ``InputError`` if the row lacks it."""
        if name == "question":
            return self.question
        if name == "answer":
            return self.answer
        if name not in self.texts:
            raise InputError(
                f"the teacher-forced objective needs a {name!r} field, but a row lacks it "
                f"(question {self.question[:60]!r}); use rows {{question, plan, refined_plan, answer}} "
                f"or objective.outer: unrolled"
            )
        return self.texts[name]


def parse_row(raw: object, where: str, rename: dict[str, str] | None = None) -> TrainRow:
    """Validate one raw row (after renaming columns ``rename[ours] = theirs``)."""
    if not isinstance(raw, dict):
        raise InputError(f"{where}: a row must be an object with 'question' and 'answer'")
    rename = rename or {}
    # renamed columns win over columns that already carry our names (e.g. a long 'answer' rationale)
    row = {k: v for k, v in raw.items() if k not in rename} | {
        ours: raw.get(theirs) for ours, theirs in rename.items()
    }
    for key in ("question", "answer"):
        if key not in row or row[key] is None:
            raise InputError(f"{where}: missing {key!r} (rows need question and answer)")
    values = {}
    for key in TEXT_FIELDS:
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, int | float) and key == "answer":
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{where}: {key!r} must be a non-empty string")
        values[key] = value
    context = row.get("context") or {}
    if not isinstance(context, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in context.items()
    ):
        raise InputError(f"{where}: 'context' must map agent names to strings")
    teacher = {k: v for k, v in values.items() if k in ("plan", "refined_plan")}
    return TrainRow(values["question"], values["answer"], teacher, dict(context))


def read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
        raise InputError(f"{path} cannot be read as Parquet ({err})") from None


def file_rows(spec: SourceSpec) -> list[TrainRow]:
    path = Path(spec.path or "")
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    if path.suffix == ".parquet":
        raw = read_parquet(path)
    elif path.suffix in (".jsonl", ".json"):
        raw = read_rows(str(path))
    else:
        raise InputError(f"data file {path}: use a .jsonl, .json or .parquet file")
    return [parse_row(r, f"{path} row {i + 1}", spec.fields) for i, r in enumerate(raw)]


def hub_rows(spec: SourceSpec) -> list[TrainRow]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"data source {spec.path!r} is a hub dataset, which needs the `datasets` package: "
            f"pip install datasets (or download it and use kind: file)"
        ) from None
    try:
        raw = datasets.load_dataset(spec.path, spec.subset, split=spec.split)
    except Exception as err:  # offline, gated or renamed datasets raise many error types
        raise ConfigError(
            f"cannot load {spec.path} from the hub ({type(err).__name__}: {err}); "
            f"save the rows locally and use kind: file"
        ) from None
    return [parse_row(r, f"{spec.path} row {i + 1}", spec.fields) for i, r in enumerate(raw)]


def gym_rows(spec: str, n: int, seed: int) -> list[TrainRow]:
    """``n`` rows of the reasoning-gym task ``spec`` = ``name[:key=value,...]`` (generator settings, as
    in eval's task specs), questions suffixed as the evaluation does."""
    if spec.partition(":")[0] in RESERVED_FOR_EVAL:
        raise ConfigError(f"reasoning-gym task {spec!r} is reserved for evaluation; train on another task")
    return [TrainRow(e["question"] + BOXED_SUFFIX, str(e["answer"])) for e in gym_dataset(spec, n, seed)]


def relay_train_rows(
    n: int, seed: int, level: int, sender: str = SENDER, names: str = "shared"
) -> list[TrainRow]:
    """Relay rows as training rows; ``names="disjoint"`` draws level-2 names from ``TRAIN_NAMES``."""
    rows = relay_rows(n, seed, level, sender, TRAIN_NAMES if names == "disjoint" else NAMES)
    return [parse_row(r, f"relay row {i + 1}") for i, r in enumerate(rows)]


def source_rows(spec: SourceSpec, seed: int, n: int | None = None, sender: str = SENDER) -> list[TrainRow]:
    """Rows of one source; generated sources make ``n`` (default ``spec.n``) rows from ``seed``; relay
    facts go to ``spec.sender`` or else ``sender``."""
    count = spec.n if n is None else n
    if spec.kind == "file":
        rows = file_rows(spec)
    elif spec.kind == "hub":
        rows = hub_rows(spec)
    elif spec.kind == "reasoning-gym":
        rows = gym_rows(spec.name or "", count, seed)
    else:
        rows = relay_train_rows(count, seed, spec.level, spec.sender or sender, spec.names)
    if spec.answer_format is None:
        return rows
    return [dataclasses.replace(r, answer_format=spec.answer_format) for r in rows]


@dataclass
class Splits:
    train: list[TrainRow]
    validation: list[TrainRow]


def build_splits(data: DataSection, sender: str = SENDER) -> Splits:
    """Disjoint train and validation rows (relay facts go to agent ``sender`` unless a source names one).

    Generated sources draw validation rows from a separate seed (``data.validation`` rows shared in
    proportion to each source's size); file and hub rows are shuffled with ``data.seed`` and their tail
    is held out. Any training row whose question also appears in validation, or among the test questions
    of a ``data.holdout`` evaluation set, is dropped.
    """
    if not data.sources:
        raise ConfigError("data.sources is empty: list at least one source")
    loaded = [
        source_rows(s, TRAIN_SEED_OFFSET + data.seed) if s.kind in ("file", "hub") else []
        for s in data.sources
    ]
    sizes = [len(rows) if rows else s.n for s, rows in zip(data.sources, loaded, strict=True)]
    shares = _shares(data.validation, sizes)
    train: list[TrainRow] = []
    validation: list[TrainRow] = []
    for spec, rows, share in zip(data.sources, loaded, shares, strict=True):
        if spec.kind in ("file", "hub"):
            rows = list(rows)
            random.Random(f"split:{data.seed}").shuffle(rows)
            if share >= len(rows):
                raise ConfigError(
                    f"data source {spec.path}: {len(rows)} rows cannot hold out {share} for validation"
                )
            held, kept = rows[len(rows) - share :], rows[: len(rows) - share]
        else:
            kept = source_rows(spec, TRAIN_SEED_OFFSET + data.seed, sender=sender)
            held = source_rows(spec, VALIDATION_SEED_OFFSET + data.seed, share, sender) if share else []
        validation.extend(held)
        train.extend(kept * spec.weight)
    held = {_key(r.question, r.context) for r in validation} | holdout_keys(data, sender)
    train = [r for r in train if _key(r.question, r.context) not in held]
    if not train:
        raise ConfigError(
            "no training rows left after holding out validation and data.holdout; add rows or hold out fewer"
        )
    return Splits(train, validation)


def holdout_keys(data: DataSection, sender: str = SENDER) -> set[str]:
    """The (question, context) keys of every ``data.holdout`` evaluation set's test questions."""
    keys = set()
    for spec in data.holdout:
        task = load_task(spec.task, spec.limit, spec.data_seed, relay_sender=sender)
        keys.update(_key(e.question, e.context) for e in task.examples)
    return keys


def _key(question: str, context: dict[str, str]) -> str:
    return json.dumps([question, sorted(context.items())])


def _shares(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` validation rows over sources in proportion to ``sizes`` (largest remainders);
    the shares always sum to ``total``."""
    whole = sum(sizes)
    exact = [total * s / whole for s in sizes]
    shares = [int(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def data_digest(data: DataSection, splits: Splits) -> dict:
    """``{"rows": sha256 of every train and validation row, "files": {path: sha256}}`` of ``file``
    sources: what a resumed run compares to tell whether its data changed, and which file did."""
    digest = hashlib.sha256()
    for part in (splits.train, splits.validation):
        digest.update(b"\x00part")
        for row in part:
            fields = [row.question, row.answer, row.texts, row.context, row.answer_format]
            digest.update((json.dumps(fields, sort_keys=True) + "\n").encode())
    files = {s.path: sha256_file(Path(s.path)) for s in data.sources if s.kind == "file" and s.path}
    return {"rows": digest.hexdigest(), "files": files}


def write_jsonl(rows: Iterable[TrainRow], path: Path) -> None:
    """Write rows in the ``{question, answer[, plan, refined_plan][, context]}`` format, atomically (a
    failed write leaves the old file or none, never part of one)."""
    lines = []
    for r in rows:
        record: dict = {"question": r.question, "answer": r.answer, **r.texts}
        if r.context:
            record["context"] = r.context
        lines.append(json.dumps(record) + "\n")
    atomic_write(path, lambda p: p.write_text("".join(lines), encoding="utf-8"))
