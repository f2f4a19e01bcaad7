"""mllm: compose, train, merge and evaluate multimodal LLMs.

The public Python surface, importable from the package itself::

    from mllm import MLLM, load_config

    cfg = load_config("tiny", ["train.steps=100"])       # a recipe (name or YAML path) + --set overrides
    model = MLLM.from_pretrained("runs/tiny/model")       # a folder written by MLLM.save_pretrained
    model.eval()
    answers = model.generate([image], ["What colour is the circle?"])   # prompts as the model was trained

Names are resolved on first use, so ``import mllm`` stays light (no torch / transformers import).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "MLLM": "mllm.model",
    "ModelError": "mllm.model",
    "load_config": "mllm.config",
    "save_config": "mllm.config",
    "RunConfig": "mllm.config",
    "ModelConfig": "mllm.config",
    "ConfigError": "mllm.schema",
    "UserError": "common.errors",
    "run_merge": "mllm.merge",
}
__all__ = [
    "MLLM", "ConfigError", "ModelConfig", "ModelError", "RunConfig", "UserError", "load_config", "run_merge",
    "save_config",
]

if TYPE_CHECKING:
    from common.errors import UserError
    from mllm.config import ModelConfig, RunConfig, load_config, save_config
    from mllm.merge import run_merge
    from mllm.model import MLLM, ModelError
    from mllm.schema import ConfigError


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mllm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
