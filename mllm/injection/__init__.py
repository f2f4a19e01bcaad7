"""LLM-side fusion: injectors that hook the decoder layers of a HF causal LM, so visual context reaches
the LLM inside its layers instead of (or besides) as spliced tokens.

``gated_xattn`` (Flamingo gated cross-attention), ``ffn_embed`` (DEHVF FFN memory) and ``pyramid``
(DPN pooling experts); registered in ``mllm.registry.INJECTORS``, interface in :mod:`.base`;
:mod:`.diagnose` measures where the LLM reads the image (``xattn_report``, ``ffn_report``, ``router_report``).
"""

from mllm.injection.base import InjectionError, InjectionSpec, Injector, VisualContext, inject

__all__ = ["InjectionError", "InjectionSpec", "Injector", "VisualContext", "inject"]
