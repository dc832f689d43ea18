"""link_config.json against its schema: every bad value is a CheckpointError naming the field, found
before any model is loaded or link built; the integrity hash covers the prompts and link configs."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from recursivemas import RecursiveMAS, build_preset
from recursivemas.checkpoint import (
    CONFIG_NAME,
    MAX_JSON_BYTES,
    AgentRecord,
    LinkRecord,
    config_digest,
    read_config,
)
from recursivemas.errors import CheckpointError
from recursivemas.presets import WEIGHTS_DIR

Edit = Callable[[dict], None]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny-random checkpoint saved once; tests edit copies of it."""
    folder = tmp_path_factory.mktemp("saved")
    build_preset("tiny-random", rounds=2, latent_steps=4).save_pretrained(str(folder))
    return folder


@pytest.fixture
def checkpoint(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


def _config(folder: Path) -> dict:
    return json.loads((folder / CONFIG_NAME).read_text())


def _write(folder: Path, config: dict, rehash: bool = False) -> None:
    """Write ``config``; with ``rehash``, first make its config_sha256 fit its (edited) content."""
    if rehash:
        agents = [AgentRecord.model_validate(a) for a in config["agents"]]
        config["config_sha256"] = config_digest(
            agents, [LinkRecord.model_validate(x) for x in config["links"]]
        )
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def _set(*path: str | int, value: object) -> Edit:
    """An edit setting ``config[path[0]][path[1]]... = value``."""

    def edit(config: dict) -> None:
        node = config
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


def _drop(*path: str | int) -> Edit:
    def edit(config: dict) -> None:
        node = config
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return edit


BAD_VALUES = {
    "format_version-true": (
        _set("format_version", value=True),
        r"format_version: must be an integer from 1 to 2, got True",
    ),
    "format_version-string": (
        _set("format_version", value="2"),
        r"format_version: must be an integer from 1 to 2, got '2'",
    ),
    "format_version-zero": (
        _set("format_version", value=0),
        r"format_version: must be an integer from 1 to 2, got 0",
    ),
    "unknown-top-level-key": (_set("comment", value="hi"), r"comment: unknown key: remove it"),
    "unknown-graph-key": (_set("graph", "colour", value="blue"), r"graph\.colour: unknown key"),
    "unknown-agent-key": (
        _set("agents", 0, "temperature", value=0.7),
        r"agents\[0\]\.temperature: unknown key",
    ),
    "unknown-link-key": (_set("links", 0, "bias", value=True), r"links\[0\]\.bias: unknown key"),
    "rounds-true": (
        _set("graph", "rounds", value=True),
        r"graph\.rounds: must be an integer from 1 to 32, got True",
    ),
    "rounds-1e23-float": (
        _set("graph", "rounds", value=1e23),
        r"graph\.rounds: must be an integer from 1 to 32, got 1e\+23",
    ),
    "rounds-10**23": (
        _set("graph", "rounds", value=10**23),
        r"graph\.rounds: must be an integer from 1 to 32, got 1000",
    ),
    "rounds-33": (
        _set("graph", "rounds", value=33),
        r"graph\.rounds: must be an integer from 1 to 32, got 33",
    ),
    "rounds-zero": (
        _set("graph", "rounds", value=0),
        r"graph\.rounds: must be an integer from 1 to 32, got 0",
    ),
    "latent_steps-huge": (
        _set("graph", "latent_steps", value=10**9),
        r"graph\.latent_steps: must be an integer from 1 to 32768, got 1000000000",
    ),
    "latent_steps-negative": (
        _set("graph", "latent_steps", value=-3),
        r"graph\.latent_steps: must be an integer from 1 to 32768, got -3",
    ),
    "agent_latent_steps-huge": (
        _set("graph", "agent_latent_steps", value={"planner": 10**9}),
        r"graph\.agent_latent_steps\.planner: must be an integer from 1 to 32768",
    ),
    "max_tool_calls-huge": (
        _set("graph", "max_tool_calls", value=10**9),
        r"graph\.max_tool_calls: must be an integer from 1 to 100",
    ),
    "unknown-tool": (
        _set("graph", "tools", value={"solver": ["shell"]}),
        r"graph\.tools: unknown tools \['shell'\]",
    ),
    "graph-answerer-elsewhere": (
        _set("graph", "answerer", value="judge"),
        r"graph: answerer 'judge' is not in",
    ),
    "order-other-agents": (
        _set("graph", "order", value=["planner", "critic", "solver", "judge"]),
        r"graph\.order \[.*'judge'\] must list exactly the agents \['critic', 'planner', 'solver'\]",
    ),
    "edge-slot-not-in-template": (
        _set("graph", "edges", 0, "slot", value="gossip"),
        r"graph\.edges\[0\]: unknown slot 'gossip' for agent 'critic'; its template has slots: planner",
    ),
    "rescale_norm-big": (
        _set("links", 0, "rescale_norm", value="big"),
        r"links\[0\]\.rescale_norm: .*valid number",
    ),
    "rescale_norm-negative": (
        _set("links", 0, "rescale_norm", value=-1.0),
        r"links\[0\]\.rescale_norm: .*greater",
    ),
    "residual_proj-int": (
        _set("links", 0, "residual_proj", value=1),
        r"links\[0\]\.residual_proj: .*valid boolean",
    ),
    "variant-unknown": (_set("links", 0, "variant", value="turbo"), r"links\[0\]\.variant: Input should be"),
    "src_dim-60000": (
        _set("links", 0, "src_dim", value=60000),
        r"links\[0\] \('planner'\) is kind 'inner', 60000->64; .* make it 'inner', 64->64",
    ),
    "src_dim-string": (
        _set("links", 0, "src_dim", value="wide"),
        r"links\[0\]\.src_dim: must be an integer from 1 to 65536, got 'wide'",
    ),
    "link-missing": (lambda c: c["links"].pop(), r"links are .* but the agents and graph edges need"),
    "hidden_size-huge": (
        _set("agents", 0, "hidden_size", value=10**7),
        r"agents\[0\]\.hidden_size: must be an integer from 1 to 65536",
    ),
    "agent-name-not-identifier": (
        _set("agents", 0, "name", value="bad name"),
        r"must be a Python identifier",
    ),
    "agents-duplicated": (lambda c: c["agents"].append(c["agents"][0]), r"agents: names must be unique"),
    "chat_template_kwargs-list": (
        _set("agents", 0, "chat_template_kwargs", value=[]),
        r"agents\[0\]\.chat_template_kwargs: Input should be a valid dictionary",
    ),
    "chat_template_kwargs-reserved": (
        _set("agents", 0, "chat_template_kwargs", value={"tokenize": True}),
        r"agents\[0\]\.chat_template_kwargs: keys \['tokenize'\] are set by recursivemas",
    ),
    "template-without-question": (
        _set("agents", 0, "template", "user", value="Plan."),
        r"agents\[0\]\.template: .*must contain \{question\}",
    ),
    "template-system-int": (
        _set("agents", 0, "template", "system", value=5),
        r"agents\[0\]\.template\.system",
    ),
    "model-int": (_set("agents", 0, "model", value=7), r"agents\[0\]\.model"),
    "fingerprint-not-hex": (_set("agents", 0, "fingerprint", value="zz"), r"agents\[0\]\.fingerprint"),
    "weights_sha256-missing": (_drop("weights_sha256"), r"weights_sha256: missing: add it, or re-save"),
    "weights_sha256-not-a-hash": (
        _set("weights_sha256", value="abc"),
        r"weights_sha256: String should match",
    ),
    "config_sha256-missing": (_drop("config_sha256"), r"config_sha256: missing \(format 2 requires it\)"),
    "agents-string": (_set("agents", value="planner"), r"agents: Input should be a valid list"),
    "library-int": (_set("library", value=5), r"library: Input should be a valid dictionary"),
}


@pytest.mark.probe("ckpt-schema")
@pytest.mark.parametrize("edit, match", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_are_named_before_anything_loads(checkpoint, monkeypatch, edit, match):
    config = _config(checkpoint)
    edit(config)
    _write(checkpoint, config)
    monkeypatch.setattr("recursivemas.checkpoint.load_model", _must_not_run)
    monkeypatch.setattr("recursivemas.checkpoint.build_link", _must_not_run)
    with pytest.raises(CheckpointError, match=match):
        RecursiveMAS.from_pretrained(str(checkpoint))


def _must_not_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("called before the config was checked")


BAD_BYTES = {
    "not-utf8": (b'\xff\xfe{"format_version": 2}', r"is not UTF-8 text \(bad byte at offset 0\)"),
    "not-json": (b"{format_version: 2", r"is not valid JSON"),
    "nan": (b'{"format_version": NaN}', r"is not valid JSON \(NaN is not a JSON value\)"),
    "deep-nesting": (b"[" * 100_000, r"is not valid JSON"),
    "not-an-object": (b"[1, 2]", r"must hold a JSON object, not list"),
}


@pytest.mark.probe("ckpt-schema")
@pytest.mark.parametrize("content, match", BAD_BYTES.values(), ids=BAD_BYTES.keys())
def test_unreadable_config_bytes(checkpoint, content, match):
    (checkpoint / CONFIG_NAME).write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        read_config(checkpoint)


@pytest.mark.probe("ckpt-schema")
def test_oversized_config_is_not_read(checkpoint):
    with (checkpoint / CONFIG_NAME).open("r+b") as f:
        f.truncate(MAX_JSON_BYTES + 1)  # sparse: no 16 MB written
    with pytest.raises(CheckpointError, match="a config file here is at most"):
        read_config(checkpoint)


@pytest.mark.probe("ckpt-schema")
def test_links_sized_for_other_models_are_refused_before_building(checkpoint, monkeypatch):
    """A config that is self-consistent at hidden size 60000 (links of 14 GB) is checked against the
    loaded models before any link is allocated."""
    config = _config(checkpoint)
    config["agents"][0]["hidden_size"] = 60000
    for link in config["links"]:
        ends = link["name"].split("->")
        if ends[0] == "planner":
            link["src_dim"] = 60000
        if ends[-1] == "planner":
            link["dst_dim"] = 60000
    _write(checkpoint, config, rehash=True)
    monkeypatch.setattr("recursivemas.checkpoint.build_link", _must_not_run)
    with pytest.raises(CheckpointError, match="agent 'planner' has hidden size 64, checkpoint expects 60000"):
        RecursiveMAS.from_pretrained(str(checkpoint))


HASHED_EDITS = {
    "template-user": _set(
        "agents", 1, "template", "user", value="Question: {question}\nReview {slot:planner}"
    ),
    "template-system": _set("agents", 0, "template", "system", value="You are a pirate."),
    "response_prefix": _set("agents", 2, "template", "response_prefix", value="The answer is 7."),
    "chat_template_kwargs": _set("agents", 0, "chat_template_kwargs", value={"enable_thinking": True}),
    "rescale_norm": _set("links", 0, "rescale_norm", value=50.0),
    "residual_proj": _set("links", 1, "residual_proj", value=False),
}


@pytest.mark.probe("ckpt-schema")
@pytest.mark.parametrize("edit", HASHED_EDITS.values(), ids=HASHED_EDITS.keys())
def test_edited_prompts_and_link_configs_are_detected(checkpoint, edit):
    config = _config(checkpoint)
    edit(config)
    _write(checkpoint, config)
    with pytest.raises(CheckpointError, match=r"config_sha256 does not match .* edited after saving"):
        read_config(checkpoint)


def test_run_settings_stay_editable(checkpoint):
    """Rounds and latent steps are run-time choices, not covered by the hash."""
    config = _config(checkpoint)
    config["graph"].update(rounds=5, latent_steps=3)
    _write(checkpoint, config)
    loaded = RecursiveMAS.from_pretrained(str(checkpoint))
    assert (loaded.config.rounds, loaded.config.latent_steps) == (5, 3)


def test_format_1_without_config_hash_still_loads(checkpoint):
    config = _config(checkpoint)
    config["format_version"] = 1
    del config["config_sha256"]
    _write(checkpoint, config)
    assert read_config(checkpoint).config_sha256 is None
    assert RecursiveMAS.from_pretrained(str(checkpoint)).config.rounds == 2


@pytest.mark.parametrize("name", sorted(p.parent.name for p in WEIGHTS_DIR.glob(f"*/{CONFIG_NAME}")))
def test_shipped_checkpoints_pass_the_schema(name):
    config = read_config(WEIGHTS_DIR / name)
    assert config.format_version == 2 and config.config_sha256 and len(config.links) >= 4
