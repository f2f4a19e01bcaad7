"""The tokenizer keys of a merge YAML: mergekit's ``tokenizer_source`` / ``tokenizer:`` and ``chat_template``.

* ``tokenizer_source: base | union | MODEL`` or ``tokenizer: {source, tokens, pad_to_multiple_of}``
  (mergekit's ``TokenizerConfig``, whose ``source`` defaults to ``union``) are parsed into a
  :class:`TokenizerSpec` stored in the plan. ``base`` and a model copy that folder's tokenizer files;
  a vocabulary built from several models (``union``), per-token embedding sources (``tokens``) and
  vocabulary padding change the embedding matrices and are refused, one line naming the key, until
  implemented.
* ``chat_template``: ``auto`` (the template most inputs share, as mergekit picks it), one of mergekit's
  named templates (read from an installed mergekit's package data), or a Jinja template; written into
  the output's ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm.merge.hub import parse_ref
from mllm.merge.settings import as_type
from mllm.merge.tensors import MergeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerSpec:
    source: str  # 'base', 'union' or a model reference as written
    path: Path | None  # the folder whose tokenizer files are copied
    tokens: Mapping[str, Any] | None = None  # mergekit's per-token embedding sources (stored, not applied)
    pad_to_multiple_of: int | None = None


def parse_tokenizer(data: Mapping[str, Any], src: Path, base: Path | None) -> TokenizerSpec | None:
    """``tokenizer_source`` or ``tokenizer: {source, tokens, pad_to_multiple_of}`` (mergekit's TokenizerConfig,
    whose source defaults to 'union')."""
    if data.get("tokenizer_source") is not None and data.get("tokenizer") is not None:
        raise MergeError(f"{src}: tokenizer: give either tokenizer_source or tokenizer, not both")
    tok, key = data.get("tokenizer"), "tokenizer.source"
    tokens = pad = None
    if tok is not None:
        if not isinstance(tok, Mapping) or set(tok) - {"source", "tokens", "pad_to_multiple_of"}:
            extra = sorted(set(tok) - {"source", "tokens", "pad_to_multiple_of"}) if isinstance(tok, Mapping) else []
            at = f"tokenizer.{extra[0]}: unknown key" if extra else "tokenizer: expected a mapping"
            raise MergeError(f"{src}: {at} (expected source, tokens, pad_to_multiple_of)")
        source, tokens, pad = tok.get("source", "union"), tok.get("tokens"), tok.get("pad_to_multiple_of")
        if tokens is not None and not isinstance(tokens, Mapping):
            raise MergeError(f"{src}: tokenizer.tokens: expected a mapping {{token: {{source: ..., force: ...}}}}")
        if pad is not None:
            as_type(int, pad, f"{src}: tokenizer.pad_to_multiple_of")
    else:
        source, key = data.get("tokenizer_source"), "tokenizer_source"
        if source is None:
            return None
    if not isinstance(source, str) or not source:
        raise MergeError(f"{src}: {key}: expected 'base', 'union' or a model, got {source!r}")
    if source == "union":
        raise MergeError(f"{src}: {key}: 'union' (one vocabulary built from every model's) is not supported yet; "
                         f"use 'base' or a model")
    if tokens:
        raise MergeError(f"{src}: tokenizer.tokens: per-token embedding sources are not supported yet")
    if pad:
        raise MergeError(f"{src}: tokenizer.pad_to_multiple_of: padding the vocabulary is not supported yet")
    if source == "base":
        if base is None:
            raise MergeError(f"{src}: {key}: 'base' needs base_model")
        return TokenizerSpec("base", base, tokens, pad)
    return TokenizerSpec(source, parse_ref(source, f"{src}: {key}").path, tokens, pad)


def parse_chat_template(value: Any, src: Path) -> str | None:
    """'auto', a Jinja template, or one of mergekit's named templates (read from mergekit's package data)."""
    if value is None or value == "auto":
        return value
    if not isinstance(value, str):
        raise MergeError(f"{src}: chat_template: expected 'auto', a template name or a Jinja template")
    if len(value) < 256 and "\n" not in value and "{" not in value:
        try:
            from importlib.resources import files

            path = files("mergekit._data.chat_templates").joinpath(f"{value}.jinja")
            if path.is_file():
                return path.read_text()
        except ModuleNotFoundError:
            pass
        raise MergeError(f"{src}: chat_template: {value!r} is neither 'auto', a Jinja template, nor a named "
                         f"template of an installed mergekit (chatml, llama3, mistral, alpaca, exaone)")
    if len(value) < 20 or "{" not in value:
        raise MergeError(f"{src}: chat_template: {value!r} is not a Jinja template")
    return value


def _model_template(folder: Path) -> str | None:
    """A model's chat template: chat_template.jinja, else tokenizer_config.json's (its 'default' if named)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    cfg_path = folder / "tokenizer_config.json"
    template = json.loads(cfg_path.read_text()).get("chat_template") if cfg_path.is_file() else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) and template else None


def set_chat_template(out: Path, template: str, inputs: Sequence[Path], source: Path) -> None:
    """Write ``chat_template`` into the output's tokenizer_config.json (and into a chat_template.jinja /
    .json the tokenizer folder carries, which transformers reads first). 'auto' takes the template most of
    the inputs share, as mergekit does; none at all leaves the tokenizer as it is."""
    if template == "auto":
        found = [t.strip() for folder in inputs if (t := _model_template(folder))]
        if not found:
            log.warning("%s: chat_template: auto: no input has a chat template; the tokenizer's is kept", source)
            return
        template = Counter(found).most_common(1)[0][0]
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    if (out / "chat_template.jinja").is_file():
        (out / "chat_template.jinja").write_text(template)
    if (out / "chat_template.json").is_file():
        (out / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")
