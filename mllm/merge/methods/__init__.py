"""Merge methods, one file each; named in ``mllm.registry.MERGE_METHODS``."""
