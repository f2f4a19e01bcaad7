"""LLM-side fusion (DESIGN.md data path (b)): injectors that hook the decoder layers of a HF causal LM.

``gated_xattn`` (Flamingo gated cross-attention), ``ffn_embed`` (DEHVF FFN memory) and ``pyramid``
(DPN pooling experts); registered in ``mllm.registry.INJECTORS``, interface in :mod:`.base`.
"""

from mllm.injection.base import InjectionError, InjectionSpec, Injector, VisualContext, inject

__all__ = ["InjectionError", "InjectionSpec", "Injector", "VisualContext", "inject"]
