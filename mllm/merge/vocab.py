"""The output vocabulary of a merge with ``tokenizer_source`` / ``tokenizer:``, and each model's embedding
rows aligned to it, as mergekit 0.1.x builds them (its ``build_tokenizer`` and ``PermutedVocabulary``).

Vocabulary (:func:`build_vocab`):

* the *tokenizer base* is ``base_model``, else the first model of the merge; its tokenizer is loaded with
  ``AutoTokenizer``, and tokens with an id >= its config's ``vocab_size`` (no embedding row) are stripped
  from it as mergekit strips them: from its vocabulary, added tokens and BPE merges (a tokenizer of
  another kind with such tokens is refused, as mergekit refuses it). A model folder without a tokenizer
  is taken to share the base's, as mergekit assumes when one does not load. (A stripped token that is
  one of the tokenizer's special tokens stays listed in mergekit's saved tokenizer_config.json, so its
  output loads with that token at an id past the embedding; here it is dropped from those lists when the
  output vocabulary does not hold it, so the output loads with exactly the vocabulary the rows follow.)
* ``base``: the base's tokenizer; a model: that folder's tokenizer; ``union``: the base's tokenizer plus,
  model after model (base first, then the YAML's order), every token below the model's ``vocab_size``
  that the base lacks, added with ``add_tokens`` as a plain token, then every model's added tokens with
  their own settings (the first model's settings win). mergekit walks the models as a Python set and
  each vocabulary as a hash map, so the ids it gives tokens new to the base vary from run to run; this
  one takes the models in YAML order and each model's tokens in id order, so its output is
  reproducible, and each token's row is mergekit's whatever id it gets.
* then every ``tokens:`` key not yet in the vocabulary is added (``add_tokens``), in YAML order (with
  ``source: base`` mergekit 0.1.x adds it to the base's own tokenizer and then fails with a KeyError;
  here the base's vocabulary stays as loaded, so the base lacks the token like any model); and with
  ``pad_to_multiple_of`` the embedding matrices get rows up to the next multiple (the tokenizer does not
  grow), which is the ``vocab_size`` written into the output's config.json.

Rows (:meth:`Vocab.align`, per embedding / lm_head tensor, over the models that take part in it: the
merged models and the base). A model keeps its own row of every token it has. A token that some model
lacks (or whose ``tokens:`` entry has ``force: true``) gets one default row, used by every model that
lacks it (by every model, when forced):

* a ``tokens:`` entry: ``{kind: zero}`` -> zeros; a model -> that model's row of the token;
  ``{kind: model_token, model: M, token: T | token_id: I}`` -> M's row of T (an id of M's own tokenizer);
* otherwise: a token only one model has -> that model's row; one no model has -> zeros; one the base
  has -> the base's row; else the mean of the rows of the models that have it;
* padding rows: each model's mean over its aligned vocabulary rows (mergekit's choice).

The merge method is then applied to the aligned rows, as to any tensor. A ``tokens:`` source that
mergekit could not resolve (a model not in the merge, a token that model lacks, no source where one is
needed, an id out of range) is one MergeError naming the entry, raised when the plan is made.

Memory: the embedding matrices are the only tensors that change shape, and they are aligned whole:
while one of them is merged, each taking part model's aligned copy is held in fp32
(``n_inputs x V_out x hidden x 4`` bytes), and while they are built each model's original in fp32 as
well (``n_inputs x (V_in + V_out) x hidden x 4`` at most); every other tensor streams as before. When
every model's rows already sit at the output ids (same tokenizer, nothing forced or padded), the
tensor is streamed unchanged.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mllm.merge.families import text_config
from mllm.merge.hub import parse_ref
from mllm.merge.tensors import TOKENIZER_FILES, MergeError, ModelReader
from mllm.merge.tokenizer import TokenizerSpec, TokenSource

if TYPE_CHECKING:
    from mllm.merge.plan import MergePlan

log = logging.getLogger(__name__)
VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|lm_head|embed_out|wte)\.weight$")


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except (OSError, ValueError) as err:
        raise MergeError(f"{folder}: tokenizer: cannot be loaded with AutoTokenizer ({err})") from err


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt"))


def _stripped(tok: Any, size: int, folder: Path) -> Any:
    """mergekit's ``get_stripped_tokenizer``: ``tok`` without the tokens whose id is >= ``size``."""
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok
    from tokenizers import Tokenizer

    data = json.loads(tok._tokenizer.to_str()) if tok.is_fast else None
    kind = data["model"]["type"] if data else "slow"
    if kind != "BPE":
        raise MergeError(f"{folder}: tokenizer has {len(unused)} token(s) at ids >= vocab_size {size} and is of "
                         f"type {kind}; only BPE tokenizers can be stripped of them (as in mergekit)")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)
    merges = data["model"]["merges"]
    data["model"]["merges"] = [m for m in merges if not unused & set(m.split(" ") if isinstance(m, str) else m)]
    tok._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tok


def _union(base_tok: Any, toks: Mapping[str, Any], sizes: Mapping[str, int]) -> Any:
    """mergekit's ``build_union_tokenizer``: the base's tokenizer (a fresh copy) plus the others' tokens."""
    from transformers import AutoTokenizer

    out_vocab: dict[str, None] = {}
    out_added: dict[str, Any] = {}
    for mid, tok in toks.items():
        for t, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if idx < sizes[mid]:
                out_vocab.setdefault(t)
        for idx, info in tok.added_tokens_decoder.items():
            if idx >= sizes[mid]:
                continue
            if info.content in out_added and out_added[info.content] != info:
                log.warning("token %r added with different settings by %s; the first model's are used",
                            info.content, mid)
            out_added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as tmp:  # a copy: the base's tokenizer stays as loaded
        base_tok.save_pretrained(tmp)
        res = AutoTokenizer.from_pretrained(tmp, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res


@dataclass
class _Rule:
    """How the rows of one aligned tensor are made, for one set of taking-part models."""

    perms: dict[str, torch.Tensor]  # model id -> its row of each output token (-1: lacks it), shape [V]
    default_ids: torch.Tensor  # output ids that have a default row
    defaults: list[tuple[str, Any]]  # per default id: ('mean', [model ids]) | ('row', (model id, row)) | ('zero', None)
    forced: torch.Tensor  # bool [V]: the default replaces every model's own row


class Vocab:
    """The output tokenizer, each model's original vocabulary and the rules that align their rows."""

    def __init__(self, plan: MergePlan, spec: TokenizerSpec, tokenizer: Any, vocabs: Mapping[str, Mapping[str, int]],
                 sizes: Mapping[str, int]) -> None:
        self.plan, self.spec, self.tokenizer = plan, spec, tokenizer
        self.vocab: dict[str, int] = tokenizer.get_vocab()
        self.tokens: list[str] = [""] * len(self.vocab)
        for t, i in self.vocab.items():
            self.tokens[i] = t
        pad = spec.pad_to_multiple_of
        n = len(self.vocab)
        self.size = n if not pad or n % pad == 0 else (n // pad + 1) * pad  # rows of the output matrices
        self.vocabs, self.sizes = vocabs, sizes
        self._rules: dict[tuple[tuple[str, ...], str | None], _Rule] = {}
        self._cache: tuple[str, dict[str, _Rows]] | None = None

    # --- which tensors, which rules -------------------------------------------------------------------
    def perm(self, mid: str) -> torch.Tensor:
        own, size = self.vocabs[mid], self.sizes[mid]
        return torch.tensor([i if (i := own.get(t, -1)) < size else -1 for t in self.tokens], dtype=torch.long)

    def changes(self, mids: Sequence[str]) -> bool:
        """Whether aligning changes any of these models' matrices (else they are streamed as stored)."""
        if self.size != len(self.vocab) or any(s.force for s in (self.spec.tokens or {}).values()):
            return True
        ident = torch.arange(len(self.vocab))
        return any(self.sizes[m] != self.size or not torch.equal(self.perm(m), ident) for m in mids)

    def _model_id(self, text: str, mids: Sequence[str], where: str) -> str:
        """The taking-part model a ``tokens:`` source names (its YAML string, or the same folder)."""
        if text in mids:
            return text
        path = None
        try:
            path = parse_ref(text, where).path.resolve()
        except MergeError:
            pass
        by_path = {m.id: m.path.resolve() for m in self.plan.inputs}
        found = next((m for m in mids if path is not None and by_path.get(m) == path), None)
        if found is None:
            raise MergeError(f"{where}: {text!r} is not one of the models merged into this tensor "
                             f"({', '.join(mids)})")
        return found

    def rule(self, mids: tuple[str, ...], base: str | None, shapes: Mapping[str, tuple[int, ...]]) -> _Rule:
        """mergekit's ``assign_embedding_sources`` and default rows for the models ``mids`` (in order)."""
        key = (mids, base)
        if key in self._rules:
            return self._rules[key]
        where = f"{self.plan.source}: tokenizer.tokens"
        perms = {m: self.perm(m) for m in mids}
        have = torch.stack([perms[m] >= 0 for m in mids])  # [n_models, V]
        count = have.sum(0)
        cfgs: Mapping[str, TokenSource] = self.spec.tokens or {}
        forced = torch.zeros(len(self.vocab), dtype=torch.bool)
        ids, defaults, seen = [], [], set()
        for tid in torch.nonzero(count < len(mids)).flatten().tolist() + [self.vocab[t] for t in cfgs]:
            tok = self.tokens[tid]
            cfg = cfgs.get(tok)
            if tid in seen or (cfg is not None and not cfg.force and int(count[tid]) == len(mids)):
                continue
            forced[tid] = cfg is not None and cfg.force
            seen.add(tid)
            ids.append(tid)
            if cfg is None:
                holders = [m for m, h in zip(mids, have[:, tid].tolist(), strict=True) if h]
                if not holders:
                    log.warning("token %r is in no model; its row is zeros", tok)
                    defaults.append(("zero", None))
                elif len(holders) == 1 or (base in holders):
                    src = holders[0] if len(holders) == 1 else base
                    defaults.append(("row", (src, int(perms[src][tid]))))
                else:
                    defaults.append(("mean", holders))
                continue
            at = f"{where}.{tok}"
            if cfg.kind == "zero":
                defaults.append(("zero", None))
            elif cfg.kind == "none":
                raise MergeError(f"{at}: no source, and the token is missing from a model (or forced); "
                                 f"give source: a model, {{kind: zero}} or {{kind: model_token, ...}}")
            elif cfg.kind == "model":
                m = self._model_id(cfg.model or "", mids, f"{at}.source")
                if int(perms[m][tid]) < 0:
                    raise MergeError(f"{at}.source: model {m!r} has no token {tok!r}")
                defaults.append(("row", (m, int(perms[m][tid]))))
            else:
                m = self._model_id(cfg.model or "", mids, f"{at}.source.model")
                row = cfg.token_id
                if row is None:
                    if cfg.token not in self.vocabs[m]:
                        raise MergeError(f"{at}.source.token: {cfg.token!r} is not in the tokenizer of model {m!r}")
                    row = self.vocabs[m][cfg.token]
                if row >= shapes[m][0]:
                    raise MergeError(f"{at}.source: token id {row} is out of range for model {m!r} "
                                     f"({shapes[m][0]} rows)")
                defaults.append(("row", (m, row)))
        rule = _Rule(perms, torch.tensor(ids, dtype=torch.long), defaults, forced)
        self._rules[key] = rule
        return rule

    # --- aligned tensors ------------------------------------------------------------------------------
    def align(self, sources: Mapping[str, str], base: str | None,
              readers: Mapping[str, ModelReader]) -> dict[str, torch.Tensor]:
        """Each model's tensor (model id -> its tensor name) with its rows at the output ids, in fp32."""
        mids = tuple(sources)
        rule = self.rule(mids, base, {m: readers[m].shape(sources[m]) for m in mids})
        old = {m: readers[m].get(sources[m]).float() for m in mids}
        width = old[mids[0]].shape[1:]
        defaults = torch.zeros((len(rule.defaults), *width))
        for k, (kind, arg) in enumerate(rule.defaults):
            if kind == "row":
                defaults[k] = old[arg[0]][arg[1]]
            elif kind == "mean":
                acc = torch.zeros(width)
                for m in arg:
                    acc = acc + old[m][int(rule.perms[m][rule.default_ids[k]])]
                defaults[k] = acc / len(arg)
        n, out = len(self.vocab), {}
        for m in mids:
            p = rule.perms[m]
            new = torch.zeros((self.size, *width))
            keep = (p >= 0) & ~rule.forced
            new[:n][keep] = old[m][p[keep]]
            if len(rule.defaults):
                take = (p[rule.default_ids] < 0) | rule.forced[rule.default_ids]
                new[rule.default_ids[take]] = defaults[take]
            if self.size > n:
                new[n:] = new[:n].mean(0)
            del old[m]
            out[m] = new
        return out

    def readers(self, name: str, sources: Mapping[str, str], base: str | None,
                readers: Mapping[str, ModelReader]) -> dict[str, _Rows]:
        """Readers of the aligned tensors of output tensor ``name`` (kept until :meth:`release`)."""
        if self._cache is None or self._cache[0] != name:
            self._cache = None
            aligned = self.align(sources, base, readers)
            self._cache = (name, {m: _Rows(sources[m], t) for m, t in aligned.items()})
        return self._cache[1]

    def release(self) -> None:
        self._cache = None

    # --- output files ---------------------------------------------------------------------------------
    def write(self, out: Path) -> None:
        """Replace the tokenizer files in ``out`` by the output tokenizer (``save_pretrained``, as mergekit
        saves it) and set ``vocab_size`` in config.json (top level or ``text_config``)."""
        for n in TOKENIZER_FILES:
            if (out / n).is_file():
                (out / n).unlink()
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save_pretrained(tmp)
            for name in ("tokenizer_config.json", "special_tokens_map.json"):  # special tokens stripped away
                cfg_path = Path(tmp) / name
                data = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
                for key in ("extra_special_tokens", "additional_special_tokens"):
                    if isinstance(data.get(key), list):
                        data[key] = [t for t in data[key] if _content(t) in self.vocab]
                if data:
                    cfg_path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            for f in Path(tmp).iterdir():
                shutil.copy2(f, out / f.name)
        path = out / "config.json"
        if path.is_file():
            cfg = json.loads(path.read_text())
            node = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg
            node["vocab_size"] = self.size
            path.write_text(json.dumps(cfg, indent=2) + "\n")


def _content(token: Any) -> Any:
    return token.get("content") if isinstance(token, Mapping) else token


class _Rows:
    """A reader over one in-memory tensor, for the engine's row-block reads of an aligned matrix."""

    def __init__(self, name: str, tensor: torch.Tensor) -> None:
        self.name, self.tensor = name, tensor

    def __contains__(self, name: object) -> bool:
        return name == self.name

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensor.dtype

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return (self.tensor if rows is None else self.tensor[rows[0]:rows[1]]).clone()  # callers own their reads


def build_vocab(plan: MergePlan, readers: Mapping[str, ModelReader]) -> Vocab | None:
    """The output vocabulary and each model's original one (None without tokenizer keys)."""
    spec = plan.tokenizer
    if spec is None:
        return None
    entries = {m.id: m for m in (*plan.inputs, plan.reference)}
    base = plan.base or plan.inputs[0]
    if not _has_tokenizer(base.path):
        raise MergeError(f"{plan.source}: tokenizer: the base {base.id!r} has no tokenizer (tokenizer.json, "
                         f"tokenizer.model, ...) to build the output vocabulary from")
    sizes, toks = {}, {}
    for mid, entry in entries.items():
        tok_dir = entry.path if _has_tokenizer(entry.path) else None
        if tok_dir is None:
            log.warning("%s: no tokenizer; taken to be the same as the base's (%s), as mergekit does",
                        entry.path, base.id)
        if mid not in toks and tok_dir is not None:
            toks[mid] = _load_tokenizer(tok_dir)
    for mid in entries:
        tok = toks.get(mid, toks[base.id])
        size = text_config(readers[mid].config).get("vocab_size")
        sizes[mid] = int(size) if isinstance(size, int) else len(tok.get_vocab())
    base_tok = toks[base.id] = _stripped(toks[base.id], sizes[base.id], base.path)
    if spec.source == "union":
        order = [base.id, *(m for m in toks if m != base.id and m in {e.id for e in plan.inputs})]
        out = _union(base_tok, {m: toks[m] for m in order}, sizes)
    elif spec.source == "base":
        out = copy.deepcopy(base_tok)  # the base's own vocabulary stays as loaded when tokens: adds to it
    else:
        assert spec.path is not None
        out = _load_tokenizer(spec.path)
    existing = set(out.get_vocab())
    for t in spec.tokens or {}:
        if t not in existing:
            out.add_tokens(t)
            existing.add(t)
    vocabs = {mid: toks.get(mid, base_tok).get_vocab() for mid in entries}
    return Vocab(plan, spec, out, vocabs, sizes)
