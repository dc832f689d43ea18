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
