"""Training-free merging: streaming safetensors engine, mergekit-style YAML, FRANK and baselines.

``run_merge(config_path, out_dir)`` is the entry point of ``mllm merge``; see engine.py.
This package never imports ``train/`` (merging is training-free).
"""

from mllm.merge.engine import run_merge
from mllm.merge.plan import MergePlan, load_plan
from mllm.merge.tensors import MergeError

__all__ = ["MergeError", "MergePlan", "load_plan", "run_merge"]
