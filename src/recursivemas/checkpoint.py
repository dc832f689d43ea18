"""Link checkpoints: our format (JSON config + safetensors + model card) and the official release's.

Our format, one directory::

    link_config.json        format_version; library, torch and transformers versions; agents (name, role,
                            model id/path, fingerprint, hidden size, prompt template); links (LinkConfig);
                            graph (SystemConfig)
    link_model.safetensors  flat keys ``links.inner.<agent>.proj1.weight``, ``links.outer.<src->dst>...``
    README.md               a short model card

Files are written to temporary names and moved into place, so an interrupted save never leaves a
half-written checkpoint under the real names.

The official release stores, per agent, a pickled state dict (``adapter.pt`` or ``adapter(<task>).pt``,
named by ``innerlink_config.json``) and, per style, ``outerlink_config.json`` listing one ``.pt`` per
outer link with its source and target roles. ``load_release`` reads those into a system.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import transformers

from recursivemas._version import __version__
from recursivemas.agent import Agent
from recursivemas.errors import CheckpointError, RecursiveMASError
from recursivemas.fileio import atomic_write, sha256_file
from recursivemas.links import InnerLink, LinkConfig, OuterLink, build_link, count_parameters
from recursivemas.models import load_model
from recursivemas.prompts import PromptTemplate
from recursivemas.system import RecursiveMAS, SystemConfig

FORMAT_VERSION = 1
CONFIG_NAME = "link_config.json"
WEIGHTS_NAME = "link_model.safetensors"
CARD_NAME = "README.md"
logger = logging.getLogger(__name__)


@contextmanager
def _malformed(path: Any) -> Iterator[None]:
    """Turn the errors a malformed file causes while being parsed into a ``CheckpointError``."""
    try:
        yield
    except RecursiveMASError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:
        raise CheckpointError(
            f"{path} is malformed ({type(err).__name__}: {err}); re-save or re-download it"
        ) from None


def _library_versions() -> dict[str, str]:
    return {"recursivemas": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def save_pretrained(
    system: RecursiveMAS,
    directory: str | os.PathLike,
    command: str | None = None,
    dtype: torch.dtype | None = None,
    card: str | None = None,
) -> Path:
    """Write ``system``'s links and graph to ``directory`` (created if needed). Returns the directory.

    ``dtype`` stores the weights in another dtype (e.g. ``torch.bfloat16`` to halve the file; links are
    loaded back into float32). ``card`` is extra Markdown appended to the model card (README.md).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for agent in system.agents.values():
        if not agent.model_id:
            logger.warning(
                "agent %r has no model_id: the checkpoint can only be loaded with agents=[...]", agent.name
            )
    config = {
        "format_version": FORMAT_VERSION,
        "library": _library_versions(),
        "agents": [
            {
                "name": a.name,
                "role": a.role,
                "model": a.model_id,
                "fingerprint": a.fingerprint(),
                "hidden_size": a.hidden_size,
                "template": None if a.template is None else dataclasses.asdict(a.template),
                "chat_template_kwargs": a.chat_template_kwargs,
            }
            for a in system.agents.values()
        ],
        "links": [c.to_dict() for c in system.link_configs()],
        "graph": system.config.to_dict(),
    }
    tensors = {
        f"links.{k}": v.detach().to(device="cpu", dtype=dtype or v.dtype).contiguous()
        for k, v in system.links.state_dict().items()
    }
    atomic_write(
        out / WEIGHTS_NAME, lambda p: safetensors.torch.save_file(tensors, p, metadata={"format": "pt"})
    )
    config["weights_sha256"] = sha256_file(out / WEIGHTS_NAME)  # ties the config to these weights
    atomic_write(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    text = _model_card(system, config, command) + (f"\n{card.strip()}\n" if card else "")
    atomic_write(out / CARD_NAME, lambda p: p.write_text(text))
    return out


def _model_card(system: RecursiveMAS, config: dict, command: str | None) -> str:
    lines = [
        "# RecursiveMAS link checkpoint",
        "",
        f"Pattern: {system.config.pattern}; rounds {system.config.rounds}; "
        f"latent steps {system.config.latent_steps}.",
        "",
        "| agent | role | model | hidden | fingerprint |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {a['name']} | {a['role']} | {a['model']} | {a['hidden_size']} | {a['fingerprint']} |"
        for a in config["agents"]
    ]
    n_params = count_parameters(system.links)
    lines += [
        "",
        f"Links: {len(config['links'])}, {n_params:,} parameters. "
        f"Written by recursivemas {config['library']['recursivemas']}.",
        "",
    ]
    if command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    lines += [
        "Load with `recursivemas.checkpoint.from_pretrained(DIR)` or `recursivemas run --checkpoint DIR`.",
        "",
    ]
    return "\n".join(lines)


def read_config(directory: str | os.PathLike) -> dict:
    """Parse and check ``link_config.json``; raise ``CheckpointError`` saying what is wrong."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a recursivemas checkpoint: {CONFIG_NAME} is missing")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(config).__name__}")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version!r}; this recursivemas reads up to "
            f"{FORMAT_VERSION}: upgrade recursivemas"
        )
    for key in ("agents", "links", "graph"):
        if key not in config:
            raise CheckpointError(f"{path} lacks the {key!r} entry")
    return config


def from_pretrained(
    directory: str | os.PathLike,
    agents: list[Agent] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    check_fingerprints: bool = True,
) -> RecursiveMAS:
    """Load a system from a checkpoint directory.

    Without ``agents`` the recorded models are loaded (registry name, HF id or path). With ``agents``,
    they must match the recorded ones by name and hidden size, and by fingerprint unless
    ``check_fingerprints=False``; otherwise ``CheckpointError`` lists every mismatch.
    """
    config = read_config(directory)
    with _malformed(Path(directory) / CONFIG_NAME):
        if agents is None:
            agents = [_load_recorded_agent(r, dtype, device) for r in config["agents"]]
        links = _read_links(directory, config, agents, check_fingerprints)
        system = RecursiveMAS(agents, SystemConfig(**config["graph"]))
    for link in links:
        system.set_link(link)
    return system


def load_links(system: RecursiveMAS, directory: str | os.PathLike) -> RecursiveMAS:
    """Replace ``system``'s links by those saved in ``directory`` for the same agents (checked as in
    ``from_pretrained``); the system keeps its own rounds and latent steps. Returns ``system``."""
    config = read_config(directory)
    with _malformed(Path(directory) / CONFIG_NAME):
        links = _read_links(directory, config, list(system.agents.values()), True)
    for link in links:
        system.set_link(link)
    return system


def _read_links(
    directory: str | os.PathLike, config: dict, agents: list[Agent], check_fingerprints: bool
) -> list[InnerLink | OuterLink]:
    """The checkpoint's links with their weights, after checking the weights file and that ``agents``
    are the recorded ones."""
    weights_path = Path(directory) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS_NAME} is missing")
    expected = config.get("weights_sha256")
    if expected is not None and sha256_file(weights_path) != expected:
        raise CheckpointError(
            f"{weights_path} does not match {CONFIG_NAME} (corrupt file or interrupted save)"
        )
    _check_agents(agents, {r["name"]: r for r in config["agents"]}, directory, check_fingerprints)
    links = [build_link(LinkConfig.from_dict(data)) for data in config["links"]]
    groups = torch.nn.ModuleDict(
        {
            kind: torch.nn.ModuleDict({x.name: x for x in links if x.config.kind == kind})
            for kind in ("inner", "outer")
        }
    )
    try:
        tensors = safetensors.torch.load_file(weights_path)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(
            f"{weights_path} cannot be read ({err}); the file is corrupt or truncated"
        ) from None
    _load_state(groups, {k.removeprefix("links."): v for k, v in tensors.items()}, str(weights_path))
    return links


def _load_recorded_agent(record: dict, dtype: torch.dtype, device: str) -> Agent:
    if not record.get("model"):
        raise CheckpointError(
            f"the checkpoint records no model for agent {record.get('name')!r} (it was saved from an agent "
            "without model_id); load it with from_pretrained(DIR, agents=[...])"
        )
    model, tokenizer = load_model(record["model"], dtype, device)
    tpl = record.get("template")
    template = PromptTemplate(**tpl) if tpl else None
    return Agent(
        name=record["name"],
        model=model,
        tokenizer=tokenizer,
        template=template,
        role=record["role"],
        model_id=record["model"],
        chat_template_kwargs=record.get("chat_template_kwargs") or {},
    )


def _check_agents(agents: list[Agent], records: dict, directory: Any, check_fingerprints: bool) -> None:
    given = {a.name: a for a in agents}
    problems = []
    if set(given) != set(records):
        problems.append(f"agents {sorted(given)} but the checkpoint has {sorted(records)}")
    for name in sorted(set(given) & set(records)):
        agent, record = given[name], records[name]
        if agent.hidden_size != record["hidden_size"]:
            problems.append(
                f"agent {name!r} has hidden size {agent.hidden_size}, checkpoint expects "
                f"{record['hidden_size']} (model {record['model']})"
            )
        elif check_fingerprints and agent.fingerprint() != record["fingerprint"]:
            problems.append(
                f"agent {name!r} is not the model the links were trained on "
                f"({record['model']}, fingerprint {record['fingerprint']})"
            )
        if agent.template is None and record.get("template"):
            agent.template = PromptTemplate(**record["template"])
    if problems:
        raise CheckpointError(
            f"checkpoint {directory} does not fit these agents: "
            + "; ".join(problems)
            + ". Load it with the agents it records, or pass check_fingerprints=False "
            "to accept same-shaped models deliberately"
        )


def _load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = [
            f"missing {missing[:5]}" if missing else "",
            f"unexpected {unexpected[:5]}" if unexpected else "",
            f"wrong shapes {wrong[:5]}" if wrong else "",
        ]
        raise CheckpointError(f"{source} does not match the links: " + ", ".join(d for d in detail if d))
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


# --- the official release -----------------------------------------------------------------------


def _in_dtype(link: torch.nn.Module, state: dict[str, torch.Tensor], link_dtype: str) -> torch.nn.Module:
    """``link`` as loaded (float32), or cast to the file's floating dtype for ``"checkpoint"``."""
    if link_dtype != "checkpoint":
        return link
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    return link.to(dtypes.pop()) if len(dtypes) == 1 else link


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle and zip errors differ across torch versions
        raise CheckpointError(f"{path} cannot be read as a PyTorch state dict ({err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a flat state dict of tensors")
    return state


def _inner_file(directory: Path, task: str | None) -> Path:
    config_path = directory / "innerlink_config.json"
    candidates = []
    if config_path.is_file() and task:
        with _malformed(config_path):
            tasks = json.loads(config_path.read_text()).get("tasks", {})
            if task in tasks:
                candidates.append(tasks[task].get("adapter.pt", "adapter.pt"))
    if task:
        candidates.append(f"adapter({task}).pt")
    candidates.append("adapter.pt")
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"no inner-link weights in {directory}: looked for {', '.join(candidates)}")


def _outer_entries(directory: Path, task: str | None) -> list[dict]:
    path = directory / "outerlink_config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no outerlink_config.json")
    with _malformed(path):
        data = json.loads(path.read_text())
        if "adapters" in data:
            return list(data["adapters"])
        tasks = data.get("tasks", {})
        if task in tasks:
            return list(tasks[task]["adapters"])
    raise CheckpointError(f"{path} has no adapters for task {task!r}; it has tasks {sorted(tasks)}")


RELEASE_ROLES = {"refiner": "critic", "tool_caller": "toolcaller", "tool-caller": "toolcaller"}
_EXPERT_RE = re.compile(r"expert_?(\d+)")
_KEY_RES = (
    re.compile(r"^(.+?)(?:->|_to_|-to-)(.+)$"),  # "planner->refiner", "expert_0_to_summarizer"
    re.compile(r"^([A-Za-z0-9_]+)-([A-Za-z0-9_]+)-outerlink", re.I),  # "Planner-Refiner-Outerlink(math)"
)


def _entry_ends(entry: dict) -> tuple[str, str] | None:
    """(source role, target role) of a release manifest entry, from whichever fields it has."""
    if entry.get("source_role") and entry.get("target_role"):
        return str(entry["source_role"]), str(entry["target_role"])
    for text in (entry.get("legacy_key"), Path(str(entry.get("filename", ""))).stem):
        for pattern in _KEY_RES:
            match = pattern.match(str(text or ""))
            if match:
                return match.group(1), match.group(2)
    return None


def _resolve_role(system: RecursiveMAS, role: str) -> str | None:
    """The agent a release role names: by agent name, by role, by release alias, or ``expert_<i>`` as
    the i-th mixture specialist."""
    role = role.strip().lower()
    names = {n.lower(): n for n in system.agents}
    roles = {a.role.lower(): a.name for a in system.agents.values()}
    for candidate in (role, RELEASE_ROLES.get(role, role)):
        if candidate in names:
            return names[candidate]
        if candidate in roles:
            return roles[candidate]
    match = _EXPERT_RE.fullmatch(role)
    if match and system.config.pattern == "mixture":
        specialists = [n for n in system.config.order if n != system.config.answerer]
        index = int(match.group(1))
        return specialists[index] if index < len(specialists) else None
    return None


def load_release(
    system: RecursiveMAS,
    inner_dirs: dict[str, str | os.PathLike] | None = None,
    outer_dir: str | os.PathLike | None = None,
    task: str | None = "math",
    link_dtype: str = "float32",
) -> RecursiveMAS:
    """Load official-release link weights into ``system`` (release form, strict key and shape checks).

    Args:
        inner_dirs: agent name -> the folder holding its ``adapter*.pt`` (and ``innerlink_config.json``).
        outer_dir: the folder with ``outerlink_config.json`` and its ``.pt`` files; each entry is matched
            to an edge by its ``source_role``/``target_role``, else its ``legacy_key`` (``"a->b"``), else
            its ``filename`` (``a->b.pt``, ``a_to_b.pt``); a role is an agent's name or role, or a
            release name (``RELEASE_ROLES``: ``refiner`` is the critic, ``expert_<i>`` the i-th mixture
            specialist, ``tool_caller`` the tool-caller).
        task: the release's task key (``"math"``, ``"code"``), or ``None`` for task-less releases.
        link_dtype: ``"float32"`` (default: links compute in float32 whatever the files hold) or
            ``"checkpoint"`` (links keep the files' dtype, e.g. bfloat16, for exact parity with the
            release's own code).
    """
    if link_dtype not in ("float32", "checkpoint"):
        raise CheckpointError(f"link_dtype must be 'float32' or 'checkpoint', got {link_dtype!r}")
    for name, folder in (inner_dirs or {}).items():
        if name not in system.agents:
            raise CheckpointError(f"no agent {name!r} in this system; agents are {list(system.agents)}")
        path = _inner_file(Path(folder), task)
        state = _torch_load(path)
        d = system.agents[name].hidden_size
        link = InnerLink(LinkConfig(name, "inner", d, d, "release"))
        _load_state(link, state, str(path))
        system.set_link(_in_dtype(link, state, link_dtype))
    if outer_dir is not None:
        for entry in _outer_entries(Path(outer_dir), task):
            ends = _entry_ends(entry)
            src, dst = (_resolve_role(system, r) for r in ends) if ends else (None, None)
            key = f"{src}->{dst}"
            if src is None or dst is None or key not in system.links["outer"]:
                raise CheckpointError(
                    f"release link {entry.get('filename')!r} ({' -> '.join(ends or ('?', '?'))}) matches no "
                    f"edge; edges are {list(system.links['outer'])}"
                )
            with _malformed(Path(outer_dir) / "outerlink_config.json"):
                path = Path(outer_dir) / entry["filename"]
            link = OuterLink(
                LinkConfig(
                    key, "outer", system.agents[src].hidden_size, system.agents[dst].hidden_size, "release"
                )
            )
            state = _torch_load(path)
            _load_state(link, state, str(path))
            system.set_link(_in_dtype(link, state, link_dtype))
    return system
