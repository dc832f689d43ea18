"""Training configs and data: validation errors, both row formats, file types, disjoint splits."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recursivemas.cli import main
from recursivemas.errors import ConfigError, InputError
from recursivemas.eval.relay import NAMES, TRAIN_NAMES
from recursivemas.eval.tasks import load_task
from recursivemas.train.config import DataSection, HoldoutSpec, SourceSpec, TrainConfig
from recursivemas.train.data import build_splits, file_rows, hub_rows, parse_row

CONFIGS = Path(__file__).parents[2] / "configs"
ROWS = [
    {"question": "What is 1+1?", "answer": "2"},
    {"question": "What is 2+3?", "plan": "Add.", "refined_plan": "Add 2 and 3.", "answer": 5},
]


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.lrr"):
        TrainConfig.from_dict({"optim": {"lrr": 1e-3}})
    with pytest.raises(ConfigError, match=r"optim.max_steps"):
        TrainConfig.from_dict({"optim": {"max_steps": 0}})
    with pytest.raises(ConfigError, match="precompute"):
        TrainConfig.from_dict({"stage": "inner", "trainable": "full"})
    with pytest.raises(ConfigError, match="needs 'name'"):
        TrainConfig.from_dict({"data": {"sources": [{"kind": "reasoning-gym", "n": 3}]}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.load(tmp_path / "missing.yaml")


def test_config_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: inner\noptim: {max_steps: 50}\nobjective: {precompute: false}\n")
    cfg = TrainConfig.load(path, stage="outer", trainable="full", max_steps=3, output=str(tmp_path / "o"))
    assert (cfg.stage, cfg.trainable, cfg.optim.max_steps, cfg.run.output) == (
        "outer",
        "full",
        3,
        str(tmp_path / "o"),
    )


def test_both_row_formats_from_jsonl_and_parquet(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    parquet = tmp_path / "rows.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [{"plan": None, "refined_plan": None, **r, "answer": str(r["answer"])} for r in ROWS]
        ),
        parquet,
    )
    for path in (jsonl, parquet):
        rows = file_rows(SourceSpec(kind="file", path=str(path)))
        assert [r.answer for r in rows] == ["2", "5"]
        assert rows[0].texts == {}
        assert rows[1].field("refined_plan") == "Add 2 and 3."
        with pytest.raises(InputError, match="teacher-forced objective needs a 'plan'"):
            rows[0].field("plan")


def test_renamed_columns_and_bad_rows(tmp_path):
    row = parse_row({"problem": "Q?", "solution": "A"}, "r", {"question": "problem", "answer": "solution"})
    assert (row.question, row.answer) == ("Q?", "A")
    both = {"question": "Q?", "answer": "a long rationale ... 42", "final": "42"}
    assert parse_row(both, "r", {"answer": "final"}).answer == "42"  # the renamed column wins
    with pytest.raises(InputError, match="missing 'answer'"):
        parse_row({"question": "Q?"}, "row 3")
    with pytest.raises(InputError, match="'plan' must be a non-empty string"):
        parse_row({"question": "Q?", "answer": "1", "plan": ""}, "row 3")
    bad = tmp_path / "rows.csv"
    bad.write_text("question,answer\n")
    with pytest.raises(InputError, match=r"\.jsonl, \.json or \.parquet"):
        file_rows(SourceSpec(kind="file", path=str(bad)))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(InputError, match="cannot be read as Parquet"):
        file_rows(SourceSpec(kind="file", path=str(broken)))


def test_generated_splits_are_disjoint_seeded_and_refuse_gsm_symbolic():
    data = DataSection(
        sources=[
            SourceSpec(kind="reasoning-gym", name="basic_arithmetic", n=40),
            SourceSpec(kind="relay", level=1, n=40),
        ],
        validation=10,
    )
    splits = build_splits(data)
    assert len(splits.validation) == 10
    train_keys = {(r.question, tuple(r.context.items())) for r in splits.train}
    assert not train_keys & {(r.question, tuple(r.context.items())) for r in splits.validation}
    assert any(r.context for r in splits.train) and any(not r.context for r in splits.train)
    assert build_splits(data).train == splits.train  # seeded
    assert build_splits(data.model_copy(update={"seed": 1})).train != splits.train
    with pytest.raises(ConfigError, match="reserved for evaluation"):
        build_splits(DataSection(sources=[SourceSpec(kind="reasoning-gym", name="gsm_symbolic", n=5)]))


def test_gym_settings_and_holdout_keep_eval_questions_out_of_training():
    """A one-digit-sum rung has about 200 questions: without ``data.holdout`` its training rows repeat the
    evaluation's test questions; with it, none of them is trained on."""
    spec = "chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=1"
    data = DataSection(sources=[SourceSpec(kind="reasoning-gym", name=spec, n=200)], validation=0)
    test = {e.question for e in load_task(f"reasoning-gym:{spec}", 100).examples}
    plain = {r.question for r in build_splits(data).train}
    # the settings reached the generator: every question is "a op b ="
    assert all(len(q.split(":")[1].split("=")[0].split()) == 3 for q in plain)
    assert plain & test
    held = data.model_copy(update={"holdout": [HoldoutSpec(task=f"reasoning-gym:{spec}", limit=100)]})
    kept = {r.question for r in build_splits(held).train}
    assert kept and not kept & test and kept <= plain
    with pytest.raises(ConfigError, match="cannot build"):
        build_splits(DataSection(sources=[SourceSpec(kind="reasoning-gym", name="chain_sum:bogus=1", n=2)]))
    with pytest.raises(ConfigError, match=r"data\.holdout\.0\.limit"):
        TrainConfig.from_dict({"data": {"holdout": [{"task": "relay:1", "limit": 0}]}})


def test_answer_format_per_source(tmp_path):
    """A source's ``answer_format`` overrides ``data.answer_format`` for its rows only; formats without
    ``{answer}`` or with stray braces are refused."""
    path = tmp_path / "worked.jsonl"
    path.write_text(json.dumps({"question": "What is 2+2?", "answer": "2 + 2 = 4. \\boxed{4}"}) + "\n")
    data = DataSection(
        sources=[
            SourceSpec(kind="file", path=str(path), answer_format="{answer}"),
            SourceSpec(kind="relay", level=1, n=3),
        ],
        validation=0,
    )
    worked, *relay = build_splits(data).train
    assert worked.target_text(data.answer_format) == "2 + 2 = 4. \\boxed{4}"
    assert relay[0].target_text(data.answer_format) == f"\\boxed{{{relay[0].answer}}}"
    for bad in ("no answer here", "{answer} {other}", "{answer"):
        with pytest.raises(ConfigError, match="answer_format"):
            TrainConfig.from_dict({"data": {"sources": [{"kind": "relay", "n": 1, "answer_format": bad}]}})
        with pytest.raises(ConfigError, match="answer_format"):
            TrainConfig.from_dict({"data": {"answer_format": bad}})


def test_validation_shares_sum_to_the_request():
    data = DataSection(
        sources=[SourceSpec(kind="relay", level=1, n=5), SourceSpec(kind="relay", level=2, n=5)], validation=1
    )
    assert len(build_splits(data).validation) == 1


def test_disjoint_relay_names_never_use_the_evaluations_names():
    """Held-out level-2 evaluation rows cover all 26 evaluation names, so with ``data.holdout`` a shared
    pool leaves almost no name rows to train on; the disjoint pool trains names the evaluation never asks."""
    holdout = [HoldoutSpec(task="relay:2", limit=100)]
    shared = DataSection(sources=[SourceSpec(kind="relay", level=2, n=200)], validation=0, holdout=holdout)
    disjoint = shared.model_copy(
        update={"sources": [SourceSpec(kind="relay", level=2, n=200, names="disjoint")]}
    )

    def names(data: DataSection) -> list[str]:
        return [r.answer for r in build_splits(data).train if not r.answer.isdigit()]

    assert len(names(shared)) < 10
    trained = names(disjoint)
    assert len(trained) > 60 and set(trained) <= set(TRAIN_NAMES) and not set(trained) & set(NAMES)
    with pytest.raises(ConfigError, match="names"):
        TrainConfig.from_dict({"data": {"sources": [{"kind": "relay", "n": 1, "names": "mine"}]}})


def test_file_split_holds_out_the_tail(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(20)))
    splits = build_splits(DataSection(sources=[SourceSpec(kind="file", path=str(path))], validation=5))
    assert len(splits.train) == 15 and len(splits.validation) == 5
    assert not {r.question for r in splits.train} & {r.question for r in splits.validation}
    with pytest.raises(ConfigError, match="cannot hold out"):
        build_splits(DataSection(sources=[SourceSpec(kind="file", path=str(path))], validation=20))


def test_gen_data_command_writes_disjoint_files(tmp_path, capsys):
    out = tmp_path / "data"
    code = main(
        [
            "gen-data",
            "--source",
            "reasoning-gym:chain_sum:30",
            "--source",
            "relay:2:10",
            "--validation",
            "8",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (out / "validation.jsonl").read_text().splitlines()]
    assert len(val) == 8 and len(train) >= 30
    assert {"question", "answer"} <= set(train[0])
    assert not {json.dumps(r, sort_keys=True) for r in train} & {json.dumps(r, sort_keys=True) for r in val}
    assert main(["gen-data", "--source", "relay:x", "--output", str(out)]) == 2
    assert "bad --source" in capsys.readouterr().err


def test_hub_source_uses_datasets_and_renames_fields(monkeypatch):
    calls = []

    def load_dataset(path, subset, split):
        calls.append((path, subset, split))
        return [{"problem": "What is 6*7?", "solution": "42"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    spec = SourceSpec(
        kind="hub",
        path="org/rows",
        subset="main",
        split="train",
        fields={"question": "problem", "answer": "solution"},
    )
    rows = hub_rows(spec)
    assert calls == [("org/rows", "main", "train")]
    assert (rows[0].question, rows[0].answer) == ("What is 6*7?", "42")


def test_hub_source_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ConfigError, match="pip install datasets"):
        hub_rows(SourceSpec(kind="hub", path="org/rows"))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse_and_say_how_to_run_them(path):
    config = TrainConfig.load(path)
    pattern = path.name.split("-")[0]
    expected = {"pair": "smollm2-pair", "default": "smollm2-gemma3"}.get(pattern, f"smollm2-gemma3-{pattern}")
    assert config.system.preset == expected
    assert f"recursivemas train -c configs/{path.name}" in path.read_text().splitlines()[1]
