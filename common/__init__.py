"""Floor 0: helpers every package of ours may import (it imports nothing of ours).

The house has three floors (``encoders/``, ``projectors/``, ``train/`` at the bottom, ``eval/`` above,
``mllm/`` as the roof), every import pointing down. What all of them share — the user-error type,
atomic file writes, layer-index resolution — lives here, under all of them, exactly once.
"""
