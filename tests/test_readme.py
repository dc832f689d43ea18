"""The README's Python examples run as written (on tiny models)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from recursivemas.patterns import PATTERNS

README = (Path(__file__).parents[1] / "README.md").read_text()
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "tiny-random" in b]


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_examples_run(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples save checkpoints into the working folder
    try:
        exec(compile(block, "README.md", "exec"), {})
    finally:
        PATTERNS.pop("review", None)


def test_the_readme_names_every_pattern_and_preset():
    from recursivemas.presets import PRESETS

    for name in [*PATTERNS, *PRESETS]:
        assert f"`{name}`" in README, name


def test_the_reliability_table_lists_every_probe_and_each_probe_has_a_test():
    from tests.reliability import END, PROBES, START

    section = README.split(START)[1].split(END)[0].strip().splitlines()[2:]
    rows = {}
    for line in section:
        probe, what, result = (cell.strip() for cell in line.strip("|").split("|"))
        rows[probe.strip("`")] = (what, result)
    assert list(rows) == list(PROBES)
    for probe, (what, result) in rows.items():
        assert what == PROBES[probe][0] and result.startswith(PROBES[probe][1]), (probe, result)
    sources = "".join(p.read_text() for p in Path(__file__).parent.rglob("test_*.py"))
    untested = [p for p in PROBES if f'@pytest.mark.probe("{p}")' not in sources]
    assert not untested, f"probes without a test: {untested}"
