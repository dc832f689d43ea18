"""Link checkpoints: round trips, mismatches, corruption, and the official release's files."""

import dataclasses
import json
import os
import re

import pytest
import torch

from recursivemas import GenerationConfig, RecursiveMAS, build_preset
from recursivemas.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AgentRecord,
    LinkRecord,
    config_digest,
    load_release,
)
from recursivemas.errors import CheckpointError
from recursivemas.links import InnerLink, LinkConfig, OuterLink, init_default, widen
from recursivemas.loading import load_system
from recursivemas.models import load_model

from .conftest import QUESTIONS

GEN = GenerationConfig(max_new_tokens=8)


def _perturbed_system():
    system = build_preset("tiny-random", rounds=2, latent_steps=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in system.links.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return system


def test_save_load_is_bit_identical(tmp_path):
    system = _perturbed_system()
    system.save_pretrained(str(tmp_path), command="pytest")
    loaded = RecursiveMAS.from_pretrained(str(tmp_path))
    for (k, a), (k2, b) in zip(
        system.links.state_dict().items(), loaded.links.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b)
    assert loaded.config.to_dict() == system.config.to_dict()
    a = system.run(QUESTIONS[:3], generation=GEN)
    b = loaded.run(QUESTIONS[:3], generation=GEN)
    assert [r.text for r in a] == [r.text for r in b]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["README.md", CONFIG_NAME, WEIGHTS_NAME]  # no temporary files left behind
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["agents"][1] == {
        **config["agents"][1],
        "name": "critic",
        "model": "tiny-random:gemma3",
        "hidden_size": 96,
    }
    assert set(config["library"]) == {"recursivemas", "torch", "transformers"}
    assert "pytest" in (tmp_path / "README.md").read_text()


def test_loading_into_other_agents_fails_clearly(tmp_path, tiny_system):
    _perturbed_system().save_pretrained(str(tmp_path))
    agents = list(tiny_system.agents.values())
    swapped = [agents[2], agents[1], agents[0]]  # names fine, models swapped
    swapped = [dataclasses.replace(a, name=b.name) for a, b in zip(swapped, agents, strict=True)]
    with pytest.raises(CheckpointError, match="hidden size 80, checkpoint expects 64"):
        RecursiveMAS.from_pretrained(str(tmp_path), agents=swapped)


def test_fingerprint_detects_other_weights(tmp_path, tiny_system):
    saved = _perturbed_system()
    saved.save_pretrained(str(tmp_path))
    agents = list(tiny_system.agents.values())
    other = dataclasses.replace(agents[0], model=type(agents[0].model)(agents[0].model.config))
    with pytest.raises(CheckpointError, match="not the model the links were trained on"):
        RecursiveMAS.from_pretrained(str(tmp_path), agents=[other, *agents[1:]])
    loaded = RecursiveMAS.from_pretrained(
        str(tmp_path), agents=[other, *agents[1:]], check_fingerprints=False
    )
    assert loaded.agents["planner"].model is other.model  # the given model, deliberately accepted
    expected = saved.links.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.links.state_dict().items())


def test_fingerprint_is_dtype_stable(tiny_system):
    agent = tiny_system.agents["planner"]
    bf16 = dataclasses.replace(agent, model=type(agent.model)(agent.model.config))
    bf16.model.load_state_dict(agent.model.state_dict())
    fp = agent.fingerprint()
    bf16.model.to(torch.bfloat16)
    assert bf16.fingerprint() == fp


def test_corrupt_or_missing_files(tmp_path):
    _perturbed_system().save_pretrained(str(tmp_path))
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt file or interrupted save"):
        RecursiveMAS.from_pretrained(str(tmp_path))
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        RecursiveMAS.from_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"link_config\.json is missing"):
        RecursiveMAS.from_pretrained(str(tmp_path / "nowhere"))


def test_future_format_version_is_refused(tmp_path):
    _perturbed_system().save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["format_version"] = 99
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="upgrade recursivemas"):
        RecursiveMAS.from_pretrained(str(tmp_path))


def _write_release(root, system, task="math"):
    """Files shaped like the official release: per-agent adapter(task).pt, outer links by role."""
    torch.manual_seed(3)
    inner_dirs = {}
    for name, agent in system.agents.items():
        d = agent.hidden_size
        link = InnerLink(LinkConfig(name, "inner", d, d, "release"))
        init_default(link)
        folder = root / f"{name}-model"
        folder.mkdir()
        torch.save(link.state_dict(), folder / f"adapter({task}).pt")
        (folder / "innerlink_config.json").write_text(
            json.dumps({"tasks": {task: {"adapter.pt": f"adapter({task}).pt"}}})
        )
        inner_dirs[name] = folder
    outer = root / "outerlinks"
    outer.mkdir()
    entries = []
    for i, (src, dst) in enumerate([("planner", "critic"), ("critic", "solver"), ("solver", "planner")]):
        link = OuterLink(
            LinkConfig(
                f"{src}->{dst}",
                "outer",
                system.agents[src].hidden_size,
                system.agents[dst].hidden_size,
                "release",
            )
        )
        init_default(link)
        filename = f"{src.title()}-{dst.title()}-Outerlink({task}).pt"
        torch.save({k: v.to(torch.bfloat16) for k, v in link.state_dict().items()}, outer / filename)
        entries.append(
            {
                "legacy_key": f"outer_{i}",
                "filename": filename,
                "source_role": src.title(),
                "target_role": dst.title(),
                "adapter_type": "outer_ln_res_adapter",
            }
        )
    (outer / "outerlink_config.json").write_text(
        json.dumps({"format_version": 1, "tasks": {task: {"adapters": entries}}})
    )
    return inner_dirs, outer


def test_official_release_files_load(tmp_path):
    system = build_preset("tiny-random", rounds=2, latent_steps=4, init="identity")
    inner_dirs, outer = _write_release(tmp_path, system)
    load_release(system, inner_dirs, outer, task="math")
    expected = torch.load(inner_dirs["critic"] / "adapter(math).pt")
    assert torch.equal(system.inner("critic").proj1.weight, expected["proj1.weight"])
    assert system.inner("critic").config.variant == "release"
    link = system.links["outer"]["solver->planner"]
    assert link.config.variant == "release" and link.proj1.weight.dtype == torch.float32
    results = system.run(QUESTIONS[:2], generation=GEN)
    assert all(r.usage["decoded_tokens"] > 0 for r in results)
    load_release(system, inner_dirs, outer, task="math", link_dtype="checkpoint")
    assert system.links["outer"]["solver->planner"].proj1.weight.dtype == torch.bfloat16
    assert all(r.usage["decoded_tokens"] > 0 for r in system.run(QUESTIONS[:2], generation=GEN))


def test_release_files_with_wrong_shapes_or_roles(tmp_path):
    system = build_preset("tiny-random", rounds=2, latent_steps=4, init="identity")
    inner_dirs, outer = _write_release(tmp_path, system)
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_release(system, {"planner": inner_dirs["critic"]})
    config = json.loads((outer / "outerlink_config.json").read_text())
    config["tasks"]["math"]["adapters"][0]["target_role"] = "Judge"
    (outer / "outerlink_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="matches no edge"):
        load_release(system, outer_dir=outer)
    with pytest.raises(CheckpointError, match="no adapters for task 'code'"):
        load_release(system, outer_dir=outer, task="code")


def test_release_manifests_without_roles_and_release_role_names(tmp_path):
    """Entries resolved by filename or legacy_key, with the release's role names (refiner = critic,
    expert_<i> = the i-th mixture specialist)."""
    system = build_preset("tiny-random", rounds=1, latent_steps=2, init="identity")
    (tmp_path / "seq").mkdir()
    _, outer = _write_release(tmp_path / "seq", system)
    config = json.loads((outer / "outerlink_config.json").read_text())
    for entry in config["tasks"]["math"]["adapters"]:
        del entry["source_role"], entry["target_role"]
        renamed = entry["filename"].replace("Critic", "Refiner")
        (outer / entry["filename"]).rename(outer / renamed)
        entry["filename"] = renamed
    (outer / "outerlink_config.json").write_text(json.dumps(config))
    load_release(system, outer_dir=outer)
    assert system.links["outer"]["planner->critic"].config.variant == "release"
    mixture = build_preset("tiny-random-mixture", rounds=1, latent_steps=2, init="identity")
    folder = tmp_path / "mixture"
    folder.mkdir()
    entries = []
    for edge in mixture.config.edges:
        i = mixture.config.order.index(edge.src if edge.dst == "summarizer" else edge.dst)
        key = f"expert_{i}->summarizer" if edge.dst == "summarizer" else f"summarizer->expert_{i}"
        link = OuterLink(
            LinkConfig(
                key,
                "outer",
                mixture.agents[edge.src].hidden_size,
                mixture.agents[edge.dst].hidden_size,
                "release",
            )
        )
        init_default(link)
        torch.save(link.state_dict(), folder / f"outer{len(entries)}.pt")
        entries.append({"legacy_key": key, "filename": f"outer{len(entries)}.pt"})
    (folder / "outerlink_config.json").write_text(json.dumps({"adapters": entries}))
    load_release(mixture, outer_dir=folder, task=None)
    loaded = mixture.links["outer"]["code->summarizer"]
    assert torch.equal(loaded.proj1.weight, torch.load(folder / "outer1.pt")["proj1.weight"])  # expert_1


def test_files_get_normal_permissions(tmp_path):
    _perturbed_system().save_pretrained(str(tmp_path))
    umask = os.umask(0)
    os.umask(umask)
    for path in tmp_path.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_weights_from_another_save_are_refused(tmp_path):
    _perturbed_system().save_pretrained(str(tmp_path / "a"))
    build_preset("tiny-random", rounds=2, latent_steps=4).save_pretrained(str(tmp_path / "b"))
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes((tmp_path / "b" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(CheckpointError, match=r"does not match link_config\.json"):
        RecursiveMAS.from_pretrained(str(tmp_path / "a"))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: [c], "must hold a JSON object, not list"),
        (
            lambda c: {**c, "agents": [{k: v for k, v in a.items() if k != "model"} for a in c["agents"]]},
            r"agents\[0\]\.model: missing",
        ),
        (lambda c: {**c, "agents": [{**a, "model": None} for a in c["agents"]]}, "records no model"),
        (lambda c: {**c, "graph": {**c["graph"], "colour": "blue"}}, r"graph\.colour: unknown key"),
        (lambda c: {**c, "links": [{**c["links"][0], "src_dim": "wide"}]}, r"links\[0\]\.src_dim"),
    ],
    ids=["list", "model-key-missing", "model-null", "unknown-graph-key", "src_dim-string"],
)
def test_malformed_configs_give_checkpoint_errors(tmp_path, edit, match):
    _perturbed_system().save_pretrained(str(tmp_path))
    path = tmp_path / CONFIG_NAME
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(CheckpointError, match=match):
        RecursiveMAS.from_pretrained(str(tmp_path))


def _record_model(directory, agent: str, model: str) -> None:
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text())
    next(a for a in config["agents"] if a["name"] == agent)["model"] = model
    path.write_text(json.dumps(config))


def _no_download(spec, *args, **kwargs):
    raise AssertionError(f"load_model({spec!r}) was called")


@pytest.mark.probe("ckpt-hub-id")
@pytest.mark.parametrize(
    "model",
    ["org/model", "gpt2", "./no-such-folder"],
    ids=["org-slash-model", "bare-hub-name", "missing-folder"],
)
def test_hub_model_ids_need_an_opt_in(tmp_path, monkeypatch, model):
    _perturbed_system().save_pretrained(str(tmp_path))
    _record_model(tmp_path, "planner", model)
    monkeypatch.setattr("recursivemas.checkpoint.load_model", _no_download)  # nothing loads before the check
    with pytest.raises(CheckpointError, match=rf"planner: '{re.escape(model)}'.*allow_hub=True"):
        RecursiveMAS.from_pretrained(str(tmp_path))


@pytest.mark.probe("ckpt-hub-id")
def test_hub_model_ids_load_with_the_opt_in(tmp_path, monkeypatch):
    saved = _perturbed_system()
    saved.save_pretrained(str(tmp_path))
    _record_model(tmp_path, "planner", "org/model")
    asked = []

    def from_hub(spec, dtype, device):  # stands in for the download
        asked.append(spec)
        return load_model("tiny-random:llama" if spec == "org/model" else spec, dtype, device)

    monkeypatch.setattr("recursivemas.checkpoint.load_model", from_hub)
    loaded = RecursiveMAS.from_pretrained(str(tmp_path), allow_hub=True)
    assert loaded.agents["planner"].model_id == "org/model"
    assert load_system(None, str(tmp_path), "float32", "cpu", allow_hub=True).agents["planner"].model_id == (
        "org/model"
    )
    assert asked.count("org/model") == 2
    with pytest.raises(CheckpointError, match="allow_hub=True"):
        load_system(None, str(tmp_path), "float32", "cpu")


def test_local_model_folders_load_without_the_opt_in(tmp_path):
    folder = tmp_path / "planner-model"
    model, tokenizer = load_model("tiny-random:llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _perturbed_system().save_pretrained(str(tmp_path / "ckpt"))
    _record_model(tmp_path / "ckpt", "planner", str(folder))
    loaded = RecursiveMAS.from_pretrained(str(tmp_path / "ckpt"))  # fingerprint checked: same weights
    assert loaded.agents["planner"].model_id == str(folder)


def test_windowed_links_round_trip_and_window_one_keeps_old_digests(tmp_path):
    system = _perturbed_system()
    system.save_pretrained(str(tmp_path / "plain"))
    plain = json.loads((tmp_path / "plain" / CONFIG_NAME).read_text())
    before = plain["config_sha256"]
    agents = [AgentRecord(**a) for a in plain["agents"]]
    no_window_key = [LinkRecord(**{k: v for k, v in x.items() if k != "window"}) for x in plain["links"]]
    assert config_digest(agents, no_window_key) == before  # checkpoints saved before windows existed
    system.set_link(widen(system.links["outer"]["critic->solver"], 3))
    with torch.no_grad():
        system.links["outer"]["critic->solver"].window_proj.weight.normal_(0, 0.01)
    system.save_pretrained(str(tmp_path / "wide"))
    config = json.loads((tmp_path / "wide" / CONFIG_NAME).read_text())
    assert {link["name"]: link["window"] for link in config["links"]}["critic->solver"] == 3
    assert config["config_sha256"] != before  # the window is part of what the weights mean
    loaded = RecursiveMAS.from_pretrained(str(tmp_path / "wide"))
    assert loaded.links["outer"]["critic->solver"].config.window == 3
    for (k, a), (k2, b) in zip(
        system.links.state_dict().items(), loaded.links.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b)
    assert [r.text for r in loaded.run(QUESTIONS[:2], generation=GEN)] == [
        r.text for r in system.run(QUESTIONS[:2], generation=GEN)
    ]
