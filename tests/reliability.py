"""The hardening probes (issue 11): one row per probe, the single source of the README's reliability table.

A test that exercises a probe carries ``@pytest.mark.probe("<id>")``. ``tests/test_readme.py`` checks that
the README's table lists exactly these rows and that every probe has at least one test; running the suite
with ``RECURSIVEMAS_RELIABILITY=<file>`` writes the table with each probe's measured outcome (``make
reliability`` puts it into the README).
"""

from __future__ import annotations

CONTAINED = "contained"
CLEAR_ERROR = "clear error"

# id -> (what the probe does, the outcome the suite asserts)
PROBES: dict[str, tuple[str, str]] = {
    "sandbox-setsid": (
        "sandboxed program calls setsid() and keeps the output pipe open past the timeout",
        CONTAINED,
    ),
    "sandbox-fake-pass": (
        "program prints the end-of-run proof it found (argv, frames, gc) and exits 0 before a failing assert",
        CONTAINED,
    ),
    "sandbox-output-flood": ("program prints 200 MB on stdout or stderr", CONTAINED),
    "sandbox-escape": (
        "program writes outside its folder, kills its parent, leaves a daemon, forks without limit, "
        "opens a socket through _socket",
        CONTAINED,
    ),
    "cli-interrupt": ("Ctrl-C after the first answers of `recursivemas run`", CONTAINED),
    "cli-bad-row": ("an over-long question on line 3 of a run's input file", CLEAR_ERROR),
    "cli-numbers": ("`--rounds 1e23`, negative or huge `--latent-steps`/`--batch-size`", CLEAR_ERROR),
    "train-two-writers": ("two trainers on one `--output` folder", CLEAR_ERROR),
    "train-resume-finished": ("`--resume` of a finished run (or one whose final save failed)", CLEAR_ERROR),
    "train-data-changed": ("training data edited between a run and its `--resume`", CLEAR_ERROR),
    "train-bad-state": (
        "corrupt `state.json`, unwritable `--output` for train/gen-data, disk full in eval",
        CLEAR_ERROR,
    ),
    "ckpt-schema": (
        "`link_config.json` with wrong types, unknown keys, no weights hash, huge dims, non-UTF-8 bytes",
        CLEAR_ERROR,
    ),
    "release-paths": (
        "official-release config naming files outside its folder, wrong types, a failure part-way",
        CLEAR_ERROR,
    ),
    "ckpt-hub-id": (
        "a checkpoint naming a hub model id instead of a registry name or local folder",
        CLEAR_ERROR,
    ),
    "model-cache": (
        "model cache read during a rebuild, corrupted with the same size and mtime, edited manifest",
        CONTAINED,
    ),
}


def reliability_table(outcomes: dict[str, list[str]]) -> str:
    """The README's markdown table: each probe, what it does, and what the suite measured (its expected
    outcome when all of its tests passed, else how many failed or were skipped)."""
    rows = ["| probe | what it does | result |", "|---|---|---|"]
    for probe, (what, expected) in PROBES.items():
        seen = outcomes.get(probe, [])
        bad = [o for o in seen if o != "passed"]
        if not seen:
            result = "not run"
        elif bad:
            result = f"{len(bad)} of {len(seen)} tests {'/'.join(sorted(set(bad)))}"
        else:
            result = f"{expected} ({len(seen)} test{'s' if len(seen) > 1 else ''})"
        rows.append(f"| `{probe}` | {what} | {result} |")
    return "\n".join(rows) + "\n"


START, END = "<!-- reliability:start -->", "<!-- reliability:end -->"


def splice(table: str, readme: str) -> str:
    """``readme`` with the text between its reliability markers replaced by ``table``."""
    head, rest = readme.split(START, 1)
    return f"{head}{START}\n{table}{END}{rest.split(END, 1)[1]}"


if __name__ == "__main__":  # python tests/reliability.py TABLE README: put a measured table into the README
    import sys
    from pathlib import Path

    table_file, readme_file = (Path(a) for a in sys.argv[1:3])
    readme_file.write_text(splice(table_file.read_text(), readme_file.read_text()))
