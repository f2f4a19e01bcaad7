"""Where an MLLM folder keeps its language model's tensors, found from its config.json and weight names.

A merge of an MLLM with plain LLMs (FRANK: Wei & Chen, 2025, arXiv 2505.16151, Eq. 4 per decoder block)
pairs the MLLM's language-model tensors with the LLMs' ``model.layers.N.*``, ``model.embed_tokens``,
``model.norm`` and ``lm_head``. Families keep them under different prefixes, and transformers 5.x's
``save_pretrained`` writes some in the original checkpoint layout:

====================================  =================================  ========================
family (model_type)                   decoder blocks                     lm_head
====================================  =================================  ========================
llava, llava_onevision, gemma3,       ``language_model.model.layers.N``  ``language_model.lm_head``
internvl, internvl_chat (original)                                       (gemma3, internvl: tied)
qwen2_vl, qwen2_5_vl                  ``model.layers.N``                 ``lm_head``
qwen3_vl                              ``model.language_model.layers.N``  ``lm_head``
idefics3, smolvlm                     ``model.text_model.layers.N``      ``lm_head``
this package's MLLM (``llm/``)        ``llm.model.layers.N``             ``llm.lm_head``
====================================  =================================  ========================

No table is consulted: :func:`detect_name_map` takes the layer count from the text config
(``text_config``; ``llm_config`` for InternVL's original ``internvl_chat``) and looks, in the weight names,
for the prefix ``P`` before ``layers.{i}.`` that holds exactly that many blocks and ``P + embed_tokens``
(vision towers have ``layers.{i}`` too, never token embeddings), and for the ``lm_head`` whose prefix
encloses ``P``. The rules map ``P`` to ``model.`` and that head to ``lm_head.``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from mllm.merge.plan import MergePlan
from mllm.merge.tensors import MergeError, ModelReader

log = logging.getLogger(__name__)
_TEXT_KEYS = ("text_config", "llm_config")  # transformers' MLLMs; InternVL's original (internvl_chat)
_BLOCK = re.compile(r"^(.*?)layers\.(\d+)\.")
_HEAD = re.compile(r"^(.*?)lm_head\.weight$")
LLM_BLOCKS, LLM_HEAD = "model.", "lm_head."  # where a plain causal LM keeps them


def text_config(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language-model part of a config.json (an MLLM's ``text_config`` / ``llm_config``, else the config)."""
    for key in _TEXT_KEYS:
        if isinstance(cfg.get(key), Mapping):
            return cfg[key]
    return cfg


def is_multimodal(cfg: Mapping[str, Any]) -> bool:
    """Whether a config.json nests its language model's config (an MLLM)."""
    return text_config(cfg) is not cfg


def detect_name_map(reader: ModelReader) -> tuple[tuple[re.Pattern[str], str], ...]:
    """name_map rules turning ``reader``'s language-model tensor names into a plain causal LM's; () when its
    names are already those (a plain LLM, Qwen2-VL) or no prefix holds the text config's decoder blocks.
    MergeError when several prefixes fit."""
    layers = text_config(reader.config).get("num_hidden_layers")
    blocks: dict[str, set[int]] = defaultdict(set)
    for name in reader.names():
        if m := _BLOCK.match(name):
            blocks[m.group(1)].add(int(m.group(2)))
    found = [p for p, idx in blocks.items() if f"{p}embed_tokens.weight" in reader
             and (not isinstance(layers, int) or idx == set(range(layers)))]
    if len(found) > 1:
        raise MergeError(f"{reader.path}: the language model's decoder blocks could be under any of "
                         f"{sorted(found)}; set name_map in the merge YAML")
    if not found:
        return ()
    prefix = found[0]
    heads = [m.group(1) for n in reader.names() if (m := _HEAD.match(n)) and prefix.startswith(m.group(1))]
    rules = [(prefix, LLM_BLOCKS)] + ([(max(heads, key=len) + LLM_HEAD, LLM_HEAD)] if heads else [])
    return tuple((re.compile("^" + re.escape(src)), dst) for src, dst in rules if src != dst)


def with_detected_names(plan: MergePlan, readers: Mapping[str, ModelReader]) -> MergePlan:
    """``plan`` with the reference model's detected name_map, when its YAML sets neither name_map nor
    layer_pattern (an explicit one wins)."""
    if not plan.detect_names:
        return plan
    rules = detect_name_map(readers[plan.reference.id])
    if rules:
        log.info("%s: language model found in %s: name_map %s", plan.source, plan.reference.path,
                 {p.pattern: r for p, r in rules})
    return dataclasses.replace(plan, name_map=rules, detect_names=False)
