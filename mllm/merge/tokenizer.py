"""The tokenizer keys of a merge YAML: mergekit's ``tokenizer_source`` / ``tokenizer:`` and ``chat_template``.

* ``tokenizer_source: base | union | MODEL`` or ``tokenizer: {source, tokens, pad_to_multiple_of}``
  (mergekit's ``TokenizerConfig``, whose ``source`` defaults to ``union``) are parsed into a
  :class:`TokenizerSpec` stored in the plan; :mod:`mllm.merge.vocab` builds the output vocabulary from
  it and aligns the embedding / lm_head rows of every model to it, as mergekit does.
* ``tokens: {TOKEN: {source: ..., force: bool}}``: where a token's row comes from when a model lacks it
  (or always, with ``force``) -- ``source`` is a model of the merge (that model's row of the token),
  ``{kind: model_token, model: M, token: T}`` / ``{..., token_id: I}`` (M's row of another token), or
  ``{kind: zero}``. A token not in the output vocabulary is added to it (mergekit's ``add_tokens``).
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
class TokenSource:
    """One entry of ``tokenizer.tokens`` (mergekit's ``TokenEmbeddingConfig``)."""

    kind: str  # 'model' (that model's row of the token), 'model_token' (its row of another token), 'zero', 'none'
    model: str | None = None  # the model as written in the YAML (matched to the merge's models)
    token: str | None = None  # model_token: the donor token ...
    token_id: int | None = None  # ... or its id in that model's own vocabulary
    force: bool = False  # use this source even in models that have the token


@dataclass(frozen=True)
class TokenizerSpec:
    source: str  # 'base', 'union' or a model reference as written
    path: Path | None  # the folder of the source tokenizer (the base's for 'base'; None for 'union')
    tokens: Mapping[str, TokenSource] | None = None  # per-token embedding sources, in YAML order
    pad_to_multiple_of: int | None = None


def _token_source(tok: str, value: Any, where: str) -> TokenSource:
    """``tokens.<tok>``: ``{source: MODEL | {kind: zero} | {kind: model_token, model, token | token_id}, force}``."""
    at = f"{where}.{tok}"
    if not isinstance(value, Mapping) or set(value) - {"source", "force"}:
        extra = sorted(set(value) - {"source", "force"}) if isinstance(value, Mapping) else []
        msg = f"{at}.{extra[0]}: unknown key" if extra else f"{at}: expected a mapping"
        raise MergeError(f"{msg} (expected {{source: <model> | {{kind: zero}} | {{kind: model_token, model: <model>, "
                         f"token: <token>}}, force: <bool>}})")
    force = value.get("force", False)
    if not isinstance(force, bool):
        raise MergeError(f"{at}.force: expected true or false, got {force!r}")
    src = value.get("source")
    if src is None:
        return TokenSource("none", force=force)
    if isinstance(src, str) and src:
        return TokenSource("model", model=src, force=force)
    kind = src.get("kind") if isinstance(src, Mapping) else None
    if kind == "zero" and set(src) == {"kind"}:
        return TokenSource("zero", force=force)
    if kind == "model_token" and not set(src) - {"kind", "model", "token", "token_id"}:
        model, token, token_id = src.get("model"), src.get("token"), src.get("token_id")
        if not isinstance(model, str) or not model:
            raise MergeError(f"{at}.source.model: expected a model of the merge, got {model!r}")
        if (token is None) == (token_id is None):
            raise MergeError(f"{at}.source: give exactly one of token and token_id")
        if token is not None and not isinstance(token, str):
            raise MergeError(f"{at}.source.token: expected a token string, got {token!r}")
        if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
            raise MergeError(f"{at}.source.token_id: expected a token id >= 0, got {token_id!r}")
        return TokenSource("model_token", model=model, token=token, token_id=token_id, force=force)
    raise MergeError(f"{at}.source: expected a model, {{kind: zero}} or {{kind: model_token, model: <model>, "
                     f"token: <token> | token_id: <id>}}, got {src!r}")


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
        if tokens is not None:
            tokens = {str(t): _token_source(str(t), v, f"{src}: tokenizer.tokens") for t, v in tokens.items()}
        if pad is not None:
            pad = as_type(int, pad, f"{src}: tokenizer.pad_to_multiple_of")
            if pad < 1:
                raise MergeError(f"{src}: tokenizer.pad_to_multiple_of: expected an integer >= 1, got {pad}")
    else:
        source, key = data.get("tokenizer_source"), "tokenizer_source"
        if source is None:
            return None
    if not isinstance(source, str) or not source:
        raise MergeError(f"{src}: {key}: expected 'base', 'union' or a model, got {source!r}")
    if source == "union":
        return TokenizerSpec("union", None, tokens, pad)
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
