"""recursivemas: latent-space multi-agent LLM systems (RecursiveMAS, arXiv 2604.25917).

Frozen HuggingFace causal LMs collaborate by passing latent thoughts through small trainable
RecursiveLinks, recursing for several rounds; only the last agent in the last round writes text.
"""

from recursivemas._version import __version__
from recursivemas.agent import Agent, GenerationConfig, StepConfig
from recursivemas.links import InnerLink, LinkConfig, OuterLink
from recursivemas.presets import build_preset
from recursivemas.prompts import PromptTemplate
from recursivemas.system import Edge, MASInput, RecursiveMAS, SystemConfig
from recursivemas.trace import RunResult, StageTrace

__all__ = [
    "Agent",
    "Edge",
    "GenerationConfig",
    "InnerLink",
    "LinkConfig",
    "MASInput",
    "OuterLink",
    "PromptTemplate",
    "RecursiveMAS",
    "RunResult",
    "StageTrace",
    "StepConfig",
    "SystemConfig",
    "__version__",
    "build_preset",
]
