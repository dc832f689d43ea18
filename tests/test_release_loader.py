"""The official-release loader: file names stay inside their folder, manifests of the wrong shape give
CheckpointErrors, and a failure part-way leaves the system's links as they were."""

import json
import os
from pathlib import Path

import pytest
import torch

from recursivemas import build_preset
from recursivemas.checkpoint import INNER_MANIFEST, OUTER_MANIFEST, load_release
from recursivemas.errors import CheckpointError

from .test_checkpoint import _write_release


@pytest.fixture
def system():
    return build_preset("tiny-random", rounds=1, latent_steps=2, init="identity")


@pytest.fixture
def release(tmp_path, system) -> tuple[dict[str, Path], Path]:
    return _write_release(tmp_path, system)


def _snapshot(system) -> dict[str, object]:
    """The link modules and their tensors, to check that nothing was replaced."""
    modules = {f"{kind}.{name}": link for kind, group in system.links.items() for name, link in group.items()}
    return {"modules": modules, "state": {k: v.clone() for k, v in system.links.state_dict().items()}}


def _assert_unchanged(system, before: dict[str, object]) -> None:
    after = _snapshot(system)
    assert after["modules"].keys() == before["modules"].keys()
    assert all(after["modules"][k] is m for k, m in before["modules"].items())
    assert all(torch.equal(v, before["state"][k]) for k, v in after["state"].items())


def _outside_names(root: Path) -> dict[str, str]:
    """Names that point out of a release folder (an existing file is there, to be sure it is not read)."""
    outside = root / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "x.pt").write_bytes(b"")
    return {
        "dot-dot": "../outside/x.pt",
        "dot-dot-inside": "sub/../../outside/x.pt",
        "absolute": str(outside / "x.pt"),
        "backslashes": "..\\outside\\x.pt",
        "empty": "",
    }


ESCAPES = ["dot-dot", "dot-dot-inside", "absolute", "backslashes", "empty"]


@pytest.mark.probe("release-paths")
@pytest.mark.parametrize("case", ESCAPES)
def test_inner_file_names_must_stay_in_the_folder(tmp_path, system, release, case):
    inner_dirs, _ = release
    name = _outside_names(tmp_path)[case]
    (inner_dirs["planner"] / INNER_MANIFEST).write_text(json.dumps({"tasks": {"math": {"adapter.pt": name}}}))
    with pytest.raises(
        CheckpointError, match=r"tasks\.math\.adapter\.pt: .* is not a file name inside the release"
    ):
        load_release(system, {"planner": inner_dirs["planner"]})


@pytest.mark.probe("release-paths")
@pytest.mark.parametrize("case", ESCAPES)
def test_outer_file_names_must_stay_in_the_folder(tmp_path, system, release, case):
    _, outer = release
    config = json.loads((outer / OUTER_MANIFEST).read_text())
    config["tasks"]["math"]["adapters"][1]["filename"] = _outside_names(tmp_path)[case]
    (outer / OUTER_MANIFEST).write_text(json.dumps(config))
    before = _snapshot(system)
    with pytest.raises(CheckpointError, match=r"adapters\[1\]\.filename: .* is not a file name inside"):
        load_release(system, outer_dir=outer)
    _assert_unchanged(system, before)


def test_linked_files_inside_the_folder_still_load(tmp_path, system, release):
    """A Hugging Face snapshot holds links into its blob store: names are checked, not link targets."""
    inner_dirs, _ = release
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    adapter = inner_dirs["planner"] / "adapter(math).pt"
    os.replace(adapter, blobs / "0123abcd")
    adapter.symlink_to(blobs / "0123abcd")
    load_release(system, {"planner": inner_dirs["planner"]})
    assert torch.equal(system.inner("planner").proj1.weight, torch.load(blobs / "0123abcd")["proj1.weight"])


BAD_INNER = {
    "int": (5, "must hold a JSON object, not int"),
    "string": ("adapter.pt", "must hold a JSON object, not str"),
    "tasks-int": ({"tasks": 5}, r"tasks: Input should be a valid dictionary"),
    "task-string": ({"tasks": {"math": "adapter.pt"}}, r"tasks\.math: Input should be a valid dictionary"),
    "file-int": (
        {"tasks": {"math": {"adapter.pt": 7}}},
        r"tasks\.math\.adapter\.pt: Input should be a valid string",
    ),
    "not-utf8": (b"\xff{}", "is not UTF-8 text"),
}


@pytest.mark.probe("release-paths")
@pytest.mark.parametrize("content, match", BAD_INNER.values(), ids=BAD_INNER.keys())
def test_inner_manifest_of_the_wrong_shape(system, release, content, match):
    inner_dirs, _ = release
    path = inner_dirs["planner"] / INNER_MANIFEST
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    with pytest.raises(CheckpointError, match=match):
        load_release(system, {"planner": inner_dirs["planner"]})


BAD_OUTER = {
    "int": (lambda c: 5, "must hold a JSON object, not int"),
    "adapters-int": (lambda c: {"adapters": 5}, r"adapters: Input should be a valid list"),
    "entry-string": (lambda c: {"adapters": ["a.pt"]}, r"adapters\[0\]: Input should be a valid dictionary"),
    "task-int": (lambda c: {"tasks": {"math": 3}}, r"tasks\.math: Input should be a valid dictionary"),
    "task-without-adapters": (lambda c: {"tasks": {"math": {}}}, r"tasks\.math\.adapters: missing"),
    "filename-int": (
        lambda c: {"adapters": [{**c["tasks"]["math"]["adapters"][0], "filename": 7}]},
        r"adapters\[0\]\.filename: Input should be a valid string",
    ),
    "role-int": (
        lambda c: {"adapters": [{**c["tasks"]["math"]["adapters"][0], "source_role": 1}]},
        r"adapters\[0\]\.source_role: Input should be a valid string",
    ),
    "edge-twice": (
        lambda c: {"adapters": [c["tasks"]["math"]["adapters"][0]] * 2},
        "lists two files for edge planner->critic",
    ),
}


@pytest.mark.probe("release-paths")
@pytest.mark.parametrize("edit, match", BAD_OUTER.values(), ids=BAD_OUTER.keys())
def test_outer_manifest_of_the_wrong_shape(system, release, edit, match):
    _, outer = release
    path = outer / OUTER_MANIFEST
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(CheckpointError, match=match):
        load_release(system, outer_dir=outer, task=None)


FAILURES = ["inner-shapes", "inner-missing", "outer-corrupt", "outer-no-edge"]


@pytest.mark.probe("release-paths")
@pytest.mark.parametrize("failure", FAILURES)
def test_a_failure_part_way_leaves_every_link_in_place(system, release, failure):
    """The first links load fine; a later file fails: no link of the system has been replaced."""
    inner_dirs, outer = release
    inner_dirs = dict(inner_dirs)
    config = json.loads((outer / OUTER_MANIFEST).read_text())
    entries = config["tasks"]["math"]["adapters"]
    if failure == "inner-shapes":
        inner_dirs["solver"] = inner_dirs["critic"]
    elif failure == "inner-missing":
        (inner_dirs["solver"] / "adapter(math).pt").unlink()
    elif failure == "outer-corrupt":
        (outer / entries[-1]["filename"]).write_bytes(b"not a state dict")
    else:
        entries[-1]["target_role"] = "Judge"
        (outer / OUTER_MANIFEST).write_text(json.dumps(config))
    before = _snapshot(system)
    with pytest.raises(CheckpointError):
        load_release(system, inner_dirs, outer)
    _assert_unchanged(system, before)
