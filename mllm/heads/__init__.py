"""Auxiliary training objectives, registered like injectors (``mllm.registry.AUX_HEADS``)."""
