"""Link checkpoints: our format (JSON config + safetensors + model card) and the official release's.

Our format, one directory::

    link_config.json        format_version; library, torch and transformers versions; agents (name, role,
                            model id/path, fingerprint, hidden size, prompt template, chat_template_kwargs);
                            links (LinkConfig); graph (SystemConfig); weights_sha256 (the weights file's
                            hash); config_sha256 (``config_digest``: the templates, chat_template_kwargs
                            and link configs the weights were trained with)
    link_model.safetensors  flat keys ``links.inner.<agent>.proj1.weight``, ``links.outer.<src->dst>...``
    README.md               a short model card

``link_config.json`` is checked against a strict schema (``CheckpointConfig``: exact types, no unknown
keys, bounded sizes, links that fit the recorded agents and graph) before any model is loaded or link
built. Format 1 (no ``config_sha256``) is still read; its prompts are not covered by a hash.

Files are written to temporary names and moved into place, so an interrupted save never leaves a
half-written checkpoint under the real names.

The official release stores, per agent, a pickled state dict (``adapter.pt`` or ``adapter(<task>).pt``,
named by ``innerlink_config.json``) and, per style, ``outerlink_config.json`` listing one ``.pt`` per
outer link with its source and target roles. ``load_release`` reads those into a system.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, TypeVar

import safetensors.torch
import torch
import transformers
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from recursivemas._version import __version__
from recursivemas.agent import Agent
from recursivemas.errors import CheckpointError, ConfigError
from recursivemas.fileio import atomic_write, sha256_file
from recursivemas.links import MAX_WINDOW, InnerLink, LinkConfig, OuterLink, build_link, count_parameters
from recursivemas.models import load_model, registry_names
from recursivemas.prompts import PromptTemplate
from recursivemas.system import RecursiveMAS, SystemConfig
from recursivemas.tools import TOOL_FACTORIES

FORMAT_VERSION = 2  # 2 added config_sha256; format 1 is still read
CONFIG_NAME = "link_config.json"
WEIGHTS_NAME = "link_model.safetensors"
CARD_NAME = "README.md"
MAX_JSON_BYTES = 16 * 2**20  # link_config.json and the release's manifests are a few KB
MAX_HIDDEN_SIZE = 65_536  # above every released LM; links are also checked against the loaded models
MAX_ROUNDS = 32  # as the CLI's --rounds: each round runs every agent again
MAX_LATENT_STEPS = 32_768  # as the CLI's --latent-steps: the largest bundled context window
MAX_TOOL_CALLS = 100
# apply_chat_template arguments the prompt builder sets itself, or that change what it returns
RESERVED_CHAT_KWARGS = frozenset(
    {
        "conversation",
        "tokenize",
        "add_generation_prompt",
        "return_dict",
        "return_tensors",
        "continue_final_message",
    }
)
logger = logging.getLogger(__name__)
_Record = TypeVar("_Record", bound=BaseModel)
_Link = TypeVar("_Link", InnerLink, OuterLink)


def _read_json(path: Path) -> Any:
    """The JSON value in ``path``; ``CheckpointError`` if unreadable, too large, not UTF-8 or not JSON."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(
                f"{path} is {size:,} bytes; a config file here is at most {MAX_JSON_BYTES:,}: "
                "this is not a config file"
            )
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err.strerror or err})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CheckpointError(
            f"{path} is not UTF-8 text (bad byte at offset {err.start}); re-save or re-download it"
        ) from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); re-save or re-download it") from None


def _refuse_constant(name: str) -> None:
    """``json.loads`` hook: ``NaN`` and ``Infinity`` are not JSON."""
    raise ValueError(f"{name} is not a JSON value")


def _validated(schema: type[_Record], data: Any, path: Path) -> _Record:
    """``data`` checked against ``schema``; a ``CheckpointError`` naming every bad field otherwise."""
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(_describe(e) for e in err.errors())
        raise CheckpointError(f"{path}: {problems}") from None


def _describe(error: Any) -> str:
    """One pydantic error as ``field: what is wrong (got value)``."""
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".")
    kind = error["type"]
    if kind == "extra_forbidden":
        text = "unknown key: remove it"
    elif kind == "missing":
        text = "missing: add it, or re-save the checkpoint"
    elif kind == "value_error":
        text = error["msg"].removeprefix("Value error, ")
    else:
        text = f"{error['msg']}, got {_short(error['input'])}"
    return f"{where}: {text}" if where else text


def _short(value: Any) -> str:
    """``repr(value)``, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- the link_config.json schema -------------------------------------------------------------------


class _Strict(BaseModel):
    """Exact JSON types (no ``true`` for 1, no ``"3"`` for 3), no unknown keys, finite floats."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def _integer_in(low: int, high: int) -> BeforeValidator:
    """A check that the JSON value is an integer (not ``true``, not ``1e23``) from ``low`` to ``high``,
    whose error message states the range."""

    def check(value: Any) -> Any:
        if type(value) is not int or not low <= value <= high:
            raise ValueError(f"must be an integer from {low} to {high}, got {_short(value)}")
        return value

    return BeforeValidator(check)


FormatVersion = Annotated[int, _integer_in(1, FORMAT_VERSION)]
HiddenSize = Annotated[int, _integer_in(1, MAX_HIDDEN_SIZE)]
Rounds = Annotated[int, _integer_in(1, MAX_ROUNDS)]
LatentSteps = Annotated[int, _integer_in(1, MAX_LATENT_STEPS)]
ToolCalls = Annotated[int, _integer_in(1, MAX_TOOL_CALLS)]
Name = Annotated[str, Field(min_length=1, max_length=200)]


class TemplateRecord(_Strict):
    """An agent's prompt template (``PromptTemplate``), checked as it would be when built."""

    system: str
    user: str
    response_prefix: str = ""

    @model_validator(mode="after")
    def _is_template(self) -> TemplateRecord:
        self.prompt_template()  # its ConfigError (a ValueError) becomes a field error
        return self

    def prompt_template(self) -> PromptTemplate:
        """The ``PromptTemplate`` this record describes."""
        return PromptTemplate(**self.model_dump())


def _chat_kwargs(value: dict[str, Any]) -> dict[str, Any]:
    """Refuse ``chat_template_kwargs`` that would clash with the prompt builder's own arguments."""
    reserved = sorted(RESERVED_CHAT_KWARGS & set(value))
    if reserved:
        raise ValueError(f"keys {reserved} are set by recursivemas itself: remove them")
    return value


class AgentRecord(_Strict):
    """One agent: its model, the model's fingerprint and hidden size, and its prompt."""

    name: Name
    role: str
    model: str | None
    fingerprint: Annotated[str, Field(pattern=r"^[0-9a-f]{1,64}$")]
    hidden_size: HiddenSize
    template: TemplateRecord | None = None
    chat_template_kwargs: Annotated[dict[str, Any], AfterValidator(_chat_kwargs)] = {}

    @model_validator(mode="after")
    def _identifier(self) -> AgentRecord:
        if not self.name.isidentifier():
            raise ValueError(f"name {self.name!r} must be a Python identifier (letters, digits, _)")
        return self


class LinkRecord(_Strict):
    """One link's ``LinkConfig``."""

    name: Name
    kind: Literal["inner", "outer"]
    src_dim: HiddenSize
    dst_dim: HiddenSize
    variant: Literal["paper", "release"] = "paper"
    residual_proj: bool = False
    rescale_norm: float | None = Field(default=None, gt=0)
    window: int = Field(default=1, ge=1, le=MAX_WINDOW)

    def link_config(self) -> LinkConfig:
        """The ``LinkConfig`` this record describes."""
        return LinkConfig(**self.model_dump())


class EdgeRecord(_Strict):
    """One edge of the graph (``Edge``)."""

    src: Name
    dst: Name
    slot: Name


def _tool_names(value: dict[str, list[str]]) -> dict[str, list[str]]:
    """Refuse tool names that are not built-in tools."""
    unknown = sorted({n for names in value.values() for n in names} - set(TOOL_FACTORIES))
    if unknown:
        raise ValueError(f"unknown tools {unknown}; built-in tools are {sorted(TOOL_FACTORIES)}")
    return value


class GraphRecord(_Strict):
    """The graph (``SystemConfig``) with bounded rounds and latent steps, checked as when it is built."""

    order: list[Name]
    answerer: Name
    edges: list[EdgeRecord]
    rounds: Rounds
    latent_steps: LatentSteps
    variant: Literal["paper", "release"] = "paper"
    pattern: str = "custom"
    agent_latent_steps: dict[str, LatentSteps] = {}
    tools: Annotated[dict[str, list[str]], AfterValidator(_tool_names)] = {}
    max_tool_calls: ToolCalls = 5
    tools_in_latent_turns: bool = False

    @model_validator(mode="after")
    def _is_graph(self) -> GraphRecord:
        self.system_config()  # its ConfigError (a ValueError) becomes a field error
        return self

    def system_config(self) -> SystemConfig:
        """The ``SystemConfig`` this record describes."""
        return SystemConfig(**self.model_dump())


class CheckpointConfig(_Strict):
    """``link_config.json``: every field typed and bounded, and the parts consistent with each other."""

    format_version: FormatVersion
    library: dict[str, str]
    agents: list[AgentRecord] = Field(min_length=1)
    links: list[LinkRecord]
    graph: GraphRecord
    weights_sha256: Sha256
    config_sha256: Sha256 | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CheckpointConfig:
        if self.format_version >= 2 and self.config_sha256 is None:
            raise ValueError("config_sha256: missing (format 2 requires it); re-save the checkpoint")
        agents = {a.name: a for a in self.agents}
        if len(agents) != len(self.agents):
            raise ValueError(f"agents: names must be unique, got {[a.name for a in self.agents]}")
        if sorted(self.graph.order) != sorted(agents):
            raise ValueError(f"graph.order {self.graph.order} must list exactly the agents {sorted(agents)}")
        for i, edge in enumerate(self.graph.edges):
            template = agents[edge.dst].template
            if template is not None:
                try:
                    template.prompt_template().check_slot(edge.slot, edge.dst)
                except ConfigError as err:
                    raise ValueError(f"graph.edges[{i}]: {err}") from None
        _check_link_shapes(self.links, agents, [f"{e.src}->{e.dst}" for e in self.graph.edges])
        return self


def _check_link_shapes(links: list[LinkRecord], agents: dict[str, AgentRecord], edges: list[str]) -> None:
    """Exactly one inner link per agent and one outer link per edge, sized by the agents' hidden sizes
    (so no link is larger than the models it connects)."""
    expected = {name: ("inner", a.hidden_size, a.hidden_size) for name, a in agents.items()}
    for key in edges:
        src, dst = key.split("->")
        expected[key] = ("outer", agents[src].hidden_size, agents[dst].hidden_size)
    names = [link.name for link in links]
    if sorted(names) != sorted(expected):
        raise ValueError(
            f"links are {sorted(names)}, but the agents and graph edges need {sorted(expected)} "
            "(one inner link per agent, one outer link per edge)"
        )
    for i, link in enumerate(links):
        kind, src_dim, dst_dim = expected[link.name]
        if (link.kind, link.src_dim, link.dst_dim) != (kind, src_dim, dst_dim):
            raise ValueError(
                f"links[{i}] ({link.name!r}) is kind {link.kind!r}, {link.src_dim}->{link.dst_dim}; "
                f"the recorded agents' hidden sizes make it {kind!r}, {src_dim}->{dst_dim}: fix kind, "
                "src_dim and dst_dim"
            )


def config_digest(agents: list[AgentRecord], links: list[LinkRecord]) -> str:
    """SHA-256 of what the weights were trained with: each agent's name, prompt template and
    ``chat_template_kwargs``, and every link config (the ``config_sha256`` of format 2)."""
    payload = {
        "agents": [
            a.model_dump(mode="json", include={"name", "template", "chat_template_kwargs"}) for a in agents
        ],
        "links": [  # a link without a window hashes as before windows existed
            link.model_dump(mode="json", exclude={"window"} if link.window == 1 else None) for link in links
        ],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    agents = [
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
    ]
    links = [c.to_dict() for c in system.link_configs()]
    digest = config_digest(
        [_validated(AgentRecord, r, out / CONFIG_NAME) for r in agents],
        [_validated(LinkRecord, r, out / CONFIG_NAME) for r in links],
    )
    tensors = {
        f"links.{k}": v.detach().to(device="cpu", dtype=dtype or v.dtype).contiguous()
        for k, v in system.links.state_dict().items()
    }
    atomic_write(
        out / WEIGHTS_NAME, lambda p: safetensors.torch.save_file(tensors, p, metadata={"format": "pt"})
    )
    config = {
        "format_version": FORMAT_VERSION,
        "library": _library_versions(),
        "agents": agents,
        "links": links,
        "graph": system.config.to_dict(),
        "weights_sha256": sha256_file(out / WEIGHTS_NAME),  # ties the config to these weights
        "config_sha256": digest,  # and to the prompts and link shapes they were trained with
    }
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


def read_config(directory: str | os.PathLike) -> CheckpointConfig:
    """Parse ``link_config.json`` and check it against the schema and its ``config_sha256``; raise a
    ``CheckpointError`` naming each bad field. Nothing is loaded or built."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a recursivemas checkpoint: {CONFIG_NAME} is missing")
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    version = raw.get("format_version")
    if type(version) is int and version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version}; this recursivemas reads up to {FORMAT_VERSION}: "
            "upgrade recursivemas"
        )
    config = _validated(CheckpointConfig, raw, path)
    if config.config_sha256 is not None and config.config_sha256 != config_digest(
        config.agents, config.links
    ):
        raise CheckpointError(
            f"{path}: config_sha256 does not match the agents' templates, chat_template_kwargs and link "
            "configs: they were edited after saving; restore them, or re-save the checkpoint from the system"
        )
    return config


def from_pretrained(
    directory: str | os.PathLike,
    agents: list[Agent] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    check_fingerprints: bool = True,
    allow_hub: bool = False,
) -> RecursiveMAS:
    """Load a system from a checkpoint directory.

    Without ``agents`` the recorded models are loaded: registry names and local folders freely; any other
    name (a Hugging Face Hub id, which would be downloaded) only with ``allow_hub=True``. With ``agents``,
    they must match the recorded ones by name and hidden size, and by fingerprint unless
    ``check_fingerprints=False``; otherwise ``CheckpointError`` lists every mismatch.
    """
    config = read_config(directory)
    if agents is None:
        _check_model_sources(config.agents, allow_hub)
        agents = [_load_recorded_agent(r, dtype, device) for r in config.agents]
    links = _read_links(directory, config, agents, check_fingerprints)
    system = RecursiveMAS(agents, config.graph.system_config())
    for link in links:
        system.set_link(link)
    return system


def load_links(system: RecursiveMAS, directory: str | os.PathLike) -> RecursiveMAS:
    """Replace ``system``'s links by those saved in ``directory`` for the same agents (checked as in
    ``from_pretrained``); the system keeps its own rounds and latent steps. Returns ``system``."""
    links = _read_links(directory, read_config(directory), list(system.agents.values()), True)
    for link in links:
        system.set_link(link)
    return system


def _read_links(
    directory: str | os.PathLike, config: CheckpointConfig, agents: list[Agent], check_fingerprints: bool
) -> list[InnerLink | OuterLink]:
    """The checkpoint's links with their weights, after checking the weights file and that ``agents``
    are the recorded ones (so links are only built at the loaded models' sizes)."""
    weights_path = Path(directory) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS_NAME} is missing")
    if sha256_file(weights_path) != config.weights_sha256:
        raise CheckpointError(
            f"{weights_path} does not match {CONFIG_NAME} (corrupt file or interrupted save)"
        )
    _check_agents(agents, {r.name: r for r in config.agents}, directory, check_fingerprints)
    links = [build_link(record.link_config()) for record in config.links]
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


def _is_local_model(spec: str) -> bool:
    """Whether ``spec`` loads without the network: a registry name or an existing folder."""
    return spec in registry_names() or Path(spec).is_dir()


def _check_model_sources(records: list[AgentRecord], allow_hub: bool) -> None:
    """Refuse, before anything is loaded, recorded models that would come from the Hugging Face Hub
    unless ``allow_hub``."""
    remote = [f"{r.name}: {r.model!r}" for r in records if r.model and not _is_local_model(r.model)]
    if remote and not allow_hub:
        raise CheckpointError(
            f"the checkpoint names models that are neither registry names ({', '.join(registry_names())}) "
            f"nor local folders ({'; '.join(remote)}), so they would be downloaded from the Hugging Face "
            "Hub. If you trust them, opt in with from_pretrained(..., allow_hub=True) (command line: "
            "--allow-hub); or pass agents=[...] loaded yourself"
        )


def _load_recorded_agent(record: AgentRecord, dtype: torch.dtype, device: str) -> Agent:
    if not record.model:
        raise CheckpointError(
            f"the checkpoint records no model for agent {record.name!r} (it was saved from an agent "
            "without model_id); load it with from_pretrained(DIR, agents=[...])"
        )
    model, tokenizer = load_model(record.model, dtype, device)
    return Agent(
        name=record.name,
        model=model,
        tokenizer=tokenizer,
        template=None if record.template is None else record.template.prompt_template(),
        role=record.role,
        model_id=record.model,
        chat_template_kwargs=dict(record.chat_template_kwargs),
    )


def _check_agents(
    agents: list[Agent], records: dict[str, AgentRecord], directory: Any, check_fingerprints: bool
) -> None:
    given = {a.name: a for a in agents}
    problems = []
    if set(given) != set(records):
        problems.append(f"agents {sorted(given)} but the checkpoint has {sorted(records)}")
    for name in sorted(set(given) & set(records)):
        agent, record = given[name], records[name]
        if agent.hidden_size != record.hidden_size:
            problems.append(
                f"agent {name!r} has hidden size {agent.hidden_size}, checkpoint expects "
                f"{record.hidden_size} (model {record.model})"
            )
        elif check_fingerprints and agent.fingerprint() != record.fingerprint:
            problems.append(
                f"agent {name!r} is not the model the links were trained on "
                f"({record.model}, fingerprint {record.fingerprint})"
            )
        if agent.template is None and record.template is not None:
            agent.template = record.template.prompt_template()
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

INNER_MANIFEST = "innerlink_config.json"
OUTER_MANIFEST = "outerlink_config.json"


def _file_in_folder(name: str) -> str:
    """A manifest's file name, refused unless it stays inside the manifest's folder: relative, no
    ``..``. Checked on the text, not by resolving links, so a Hugging Face snapshot (whose files are
    links into its blob store) still loads."""
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or ".." in parts or "\\" in name or "\0" in name:
        raise ValueError(
            f"{name!r} is not a file name inside the release folder; use a relative name without '..'"
        )
    return name


ReleaseFile = Annotated[str, AfterValidator(_file_in_folder)]


class _ReleaseRecord(BaseModel):
    """The release's manifests: the fields read here have exact types; other fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class InnerTask(_ReleaseRecord):
    """One task of ``innerlink_config.json``: the file with its inner-link weights."""

    adapter: ReleaseFile = Field(default="adapter.pt", alias="adapter.pt")


class InnerManifest(_ReleaseRecord):
    """``innerlink_config.json``."""

    tasks: dict[str, InnerTask] = {}


class OuterEntry(_ReleaseRecord):
    """One outer link of ``outerlink_config.json``: its file and the roles it connects."""

    filename: ReleaseFile
    legacy_key: str | None = None
    source_role: str | None = None
    target_role: str | None = None


class OuterTask(_ReleaseRecord):
    """One task of ``outerlink_config.json``."""

    adapters: list[OuterEntry]


class OuterManifest(_ReleaseRecord):
    """``outerlink_config.json``: one list of adapters, or one per task."""

    adapters: list[OuterEntry] | None = None
    tasks: dict[str, OuterTask] = {}


def _manifest(path: Path, schema: type[_Record]) -> _Record:
    """A release manifest read and checked against ``schema``."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return _validated(schema, data, path)


def _in_dtype(link: _Link, state: dict[str, torch.Tensor], link_dtype: str) -> _Link:
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
    candidates = []
    if task and (directory / INNER_MANIFEST).is_file():
        tasks = _manifest(directory / INNER_MANIFEST, InnerManifest).tasks
        if task in tasks:
            candidates.append(tasks[task].adapter)
    if task:
        candidates.append(f"adapter({task}).pt")
    candidates.append("adapter.pt")
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"no inner-link weights in {directory}: looked for {', '.join(candidates)}")


def _outer_entries(directory: Path, task: str | None) -> list[OuterEntry]:
    path = directory / OUTER_MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {OUTER_MANIFEST}")
    manifest = _manifest(path, OuterManifest)
    if manifest.adapters is not None:
        return manifest.adapters
    if task in manifest.tasks:
        return manifest.tasks[task].adapters
    raise CheckpointError(f"{path} has no adapters for task {task!r}; it has tasks {sorted(manifest.tasks)}")


RELEASE_ROLES = {"refiner": "critic", "tool_caller": "toolcaller", "tool-caller": "toolcaller"}
_EXPERT_RE = re.compile(r"expert_?(\d+)")
_KEY_RES = (
    re.compile(r"^(.+?)(?:->|_to_|-to-)(.+)$"),  # "planner->refiner", "expert_0_to_summarizer"
    re.compile(r"^([A-Za-z0-9_]+)-([A-Za-z0-9_]+)-outerlink", re.I),  # "Planner-Refiner-Outerlink(math)"
)


def _entry_ends(entry: OuterEntry) -> tuple[str, str] | None:
    """(source role, target role) of a release manifest entry, from whichever fields it has."""
    if entry.source_role and entry.target_role:
        return entry.source_role, entry.target_role
    for text in (entry.legacy_key, PurePosixPath(entry.filename).stem):
        for pattern in _KEY_RES:
            match = pattern.match(text or "")
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


def _release_inner_links(
    system: RecursiveMAS, inner_dirs: dict[str, str | os.PathLike], task: str | None, link_dtype: str
) -> list[InnerLink]:
    """The inner links of the agents named in ``inner_dirs``, read from their release folders."""
    links = []
    for name, folder in inner_dirs.items():
        if name not in system.agents:
            raise CheckpointError(f"no agent {name!r} in this system; agents are {list(system.agents)}")
        path = _inner_file(Path(folder), task)
        state = _torch_load(path)
        d = system.agents[name].hidden_size
        link = InnerLink(LinkConfig(name, "inner", d, d, "release"))
        _load_state(link, state, str(path))
        links.append(_in_dtype(link, state, link_dtype))
    return links


def _release_outer_links(
    system: RecursiveMAS, outer_dir: Path, task: str | None, link_dtype: str
) -> list[OuterLink]:
    """The outer links listed in ``outer_dir``'s manifest, each matched to one edge of ``system``."""
    links: dict[str, OuterLink] = {}
    for entry in _outer_entries(outer_dir, task):
        ends = _entry_ends(entry)
        src, dst = (_resolve_role(system, r) for r in ends) if ends else (None, None)
        key = f"{src}->{dst}"
        if src is None or dst is None or key not in system.links["outer"]:
            raise CheckpointError(
                f"release link {entry.filename!r} ({' -> '.join(ends or ('?', '?'))}) matches no "
                f"edge; edges are {list(system.links['outer'])}"
            )
        if key in links:
            raise CheckpointError(f"{outer_dir / OUTER_MANIFEST} lists two files for edge {key}")
        link = OuterLink(
            LinkConfig(
                key, "outer", system.agents[src].hidden_size, system.agents[dst].hidden_size, "release"
            )
        )
        path = outer_dir / entry.filename
        state = _torch_load(path)
        _load_state(link, state, str(path))
        links[key] = _in_dtype(link, state, link_dtype)
    return list(links.values())


def load_release(
    system: RecursiveMAS,
    inner_dirs: dict[str, str | os.PathLike] | None = None,
    outer_dir: str | os.PathLike | None = None,
    task: str | None = "math",
    link_dtype: str = "float32",
) -> RecursiveMAS:
    """Load official-release link weights into ``system`` (release form, strict key and shape checks).

    Every file is read and checked first; the system's links are replaced only once all have loaded,
    so an error leaves the system as it was. File names in the manifests must stay inside their folder.

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
    links: list[InnerLink | OuterLink] = [*_release_inner_links(system, inner_dirs or {}, task, link_dtype)]
    if outer_dir is not None:
        links += _release_outer_links(system, Path(outer_dir), task, link_dtype)
    for link in links:  # only now that every file has loaded
        system.set_link(link)
    return system
