"""Merges of models whose tokenizers differ: ``tokenizer_source: union | base | MODEL`` and ``tokenizer:``
with ``tokens`` / ``pad_to_multiple_of`` against mergekit's output on tiny fp32 Llama checkpoints (every
tensor, embed_tokens and lm_head row by row per token, within 1e-5 relative; the same vocabulary through
AutoTokenizer), and one-line errors for bad ``tokens:`` entries.

mergekit gives tokens new to the base ids in hash order (a Python set of models, a hash-map vocabulary),
so for ``union`` the vocabularies are compared as token sets with the base's ids fixed, and rows by token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mllm.merge import MergeError, load_plan, run_merge

SPECIAL = ["<unk>", "<s>", "</s>"]
WORDS = [f"w{i}" for i in range(20)]


def _save_tokenizer(folder: Path, words: list[str], added: list[str] = ()) -> int:
    """A word-level tokenizer built locally with ``tokenizers``: specials, ``words``, then ``added`` special
    tokens; saved into ``folder`` (transformers' files). Returns its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIAL, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if added:
        fast.add_special_tokens({"additional_special_tokens": list(added)})
    fast.save_pretrained(folder)
    return len(fast.get_vocab())


@pytest.fixture(scope="module")
def vocab_llamas(tmp_path_factory: pytest.TempPathFactory, ckpt) -> dict[str, Path]:
    """base (specials + w0..w19), a (base's + x1, x2 and an added <|im|>), b (w5..w19 reordered, w0..w4
    missing, x1 and y1 added) -- random weights each, vocab_size = its tokenizer's size (b: 3 more, unused
    embedding rows, as models padded to a round vocab_size have)."""
    root = tmp_path_factory.mktemp("vocab_llamas")
    spec = {"base": (WORDS, []), "a": ([*WORDS, "x1", "x2"], ["<|im|>"]),
            "b": ([*reversed(WORDS[5:]), "y1", "x1"], [])}
    out = {}
    for i, (key, (words, added)) in enumerate(spec.items()):
        folder = root / key
        n = len(SPECIAL) + len(words) + len(added)
        ckpt.save_llama(folder, vocab=n + 3 * (key == "b"), seed=10 + i)
        assert _save_tokenizer(folder, words, added) == n
        out[key] = folder
    return out


def _mergekit(cfg: dict, out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_merge
    from mergekit.options import MergeOptions

    mergekit_merge(MergeConfiguration.model_validate(cfg), str(out),
                   options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    return out


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _assert_same_merge(ckpt, ours: Path, theirs: Path, base: Path, exact_ids: bool) -> None:
    """Same tensors (vocabulary rows matched by token), same vocabulary, same vocab_size in config.json.
    mergekit's folder may load with a stripped special token past its embedding rows (see
    mllm.merge.vocab); its vocabulary is taken without it."""
    size = json.loads((theirs / "config.json").read_text())["vocab_size"]
    vo, vb = _vocab(ours), _vocab(base)
    vt = {t: i for t, i in _vocab(theirs).items() if i < size}
    assert set(vo) == set(vt)
    if exact_ids:
        assert vo == vt
    else:
        assert all(vo[t] == vt[t] for t in vb if t in vt and vt[t] < len(vb))
    so, st = ckpt.state_of(ours), ckpt.state_of(theirs)
    assert sorted(so) == sorted(st)
    assert json.loads((ours / "config.json").read_text())["vocab_size"] == size
    order = sorted(vt, key=vt.get)
    for name in so:
        a, b = so[name], st[name]
        assert a.shape == b.shape, name
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert a.shape[0] == size
            pad = list(range(len(vt), size))
            a = torch.cat([a[[vo[t] for t in order]], a[pad]])
            b = torch.cat([b[[vt[t] for t in order]], b[pad]])
        assert _rel(a, b) <= 1e-5, (name, _rel(a, b))


def _config(vocab_llamas, method: str = "linear", **tok) -> dict:
    """base_model for task_arithmetic; linear takes none (mergekit's tokenizer base is then the first of a
    set of models, which varies from run to run, so linear is only run with a model as the source)."""
    weights = (("a", 0.3), ("b", 0.2)) if method == "task_arithmetic" else (("base", 0.5), ("a", 0.3), ("b", 0.2))
    cfg = {"merge_method": method, "dtype": "float32",
           "models": [{"model": str(vocab_llamas[k]), "parameters": {"weight": w}} for k, w in weights]}
    if method == "task_arithmetic":
        cfg["base_model"] = str(vocab_llamas["base"])
    return {**cfg, **tok}


CASES = {
    "union": dict(tokenizer_source="union"),
    "union_tokens_pad": dict(tokenizer={
        "source": "union", "pad_to_multiple_of": 16,
        "tokens": {"x1": {"source": "{a}"},  # a's row for the models that lack it (here: base)
                   "w3": {"source": {"kind": "zero"}, "force": True},
                   "w7": {"source": {"kind": "model_token", "model": "{b}", "token": "y1"}, "force": True},
                   "<|im|>": {"source": {"kind": "model_token", "model": "{base}", "token_id": 4}},
                   "new": {"source": {"kind": "model_token", "model": "{a}", "token": "x2"}}}}),
    "base": dict(tokenizer_source="base"),
    "model_b_pad": dict(tokenizer={"source": "{b}", "pad_to_multiple_of": 8,
                                   "tokens": {"w9": {"source": "{a}", "force": True}}}),
}


def _fill(value, vocab_llamas):
    if isinstance(value, str):
        for k, v in vocab_llamas.items():
            value = value.replace(f"{{{k}}}", str(v))
        return value
    if isinstance(value, dict):
        return {_fill(k, vocab_llamas): _fill(v, vocab_llamas) for k, v in value.items()}
    return value


@pytest.mark.parametrize(("case", "method"), [(c, "task_arithmetic") for c in sorted(CASES)] + [("model_b_pad", "linear")])
def test_vocabulary_and_rows_equal_mergekit(tmp_path: Path, ckpt, vocab_llamas, case: str, method: str) -> None:
    cfg = _config(vocab_llamas, method, **_fill(CASES[case], vocab_llamas))
    ours = run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours")
    theirs = _mergekit(cfg, tmp_path / "mk")
    _assert_same_merge(ckpt, ours, theirs, vocab_llamas["base"], exact_ids=not case.startswith("union"))


@pytest.mark.parametrize(("source", "method", "pad"), [("union", "ties", None), ("{b}", "ties", None),
                                                      ("union", "task_arithmetic", 16)])
def test_slices_with_a_tokenizer_equal_mergekit(tmp_path: Path, ckpt, vocab_llamas, source: str, method: str,
                                                pad: int | None) -> None:
    """The slices form (two slices): embed_tokens from the first slice's sources, lm_head from the last's.
    Padding is left out under TIES: the padding rows of a model are equal, so their deltas tie in magnitude
    at the trimming threshold, and which of equal entries survive is the trimming's tie-break, not the
    vocabulary's."""
    def src(key: str, lr: list[int], **params) -> dict:
        return {"model": str(vocab_llamas[key]), "layer_range": lr, **({"parameters": params} if params else {})}

    cfg = {"merge_method": method, "dtype": "float32", "base_model": str(vocab_llamas["base"]),
           "parameters": {"weight": 0.5, **({"density": 0.6} if method == "ties" else {})},
           "slices": [{"sources": [src("base", [0, 2]), src("a", [0, 2]), src("b", [0, 2])]},
                      {"sources": [src("base", [2, 4]), src("b", [1, 3]), src("a", [2, 4])]}],
           "tokenizer": {"source": _fill(source, vocab_llamas), "pad_to_multiple_of": pad,
                         "tokens": {"<|im|>": {"source": {"kind": "zero"}}}}}
    ours = run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours")
    _assert_same_merge(ckpt, ours, _mergekit(cfg, tmp_path / "mk"), vocab_llamas["base"], exact_ids=source != "union")


def test_new_token_with_base_source_follows_the_closed_form(tmp_path: Path, ckpt, vocab_llamas) -> None:
    """``source: base`` plus a ``tokens:`` key the base lacks: mergekit 0.1.x fails here (it adds the token
    to the base's own tokenizer, then looks up a permutation entry it never made: KeyError), so the rows
    are checked by hand. The other rows are those of mergekit's ``base`` merge; the new tokens' rows
    are the same default in every model, which task arithmetic leaves as it is; each model's padding row
    is its mean row, so (task arithmetic being linear) the output's is the output's mean row."""
    tok = {"source": "base", "pad_to_multiple_of": 8,
           "tokens": {"new": {"source": {"kind": "zero"}},
                      "new2": {"source": {"kind": "model_token", "model": str(vocab_llamas["a"]), "token": "x2"}}}}
    cfg = _config(vocab_llamas, "task_arithmetic", tokenizer=tok)
    ours = ckpt.state_of(run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours"))
    theirs = ckpt.state_of(_mergekit(_config(vocab_llamas, "task_arithmetic", tokenizer_source="base"), tmp_path / "mk"))
    vocab, a_vocab = _vocab(tmp_path / "ours"), _vocab(vocab_llamas["a"])
    n = len(vocab)
    assert (n, vocab["new"], vocab["new2"]) == (25, 23, 24)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"] == 32
    a_state = ckpt.state_of(vocab_llamas["a"])
    for name in theirs:
        if not name.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert _rel(ours[name], theirs[name]) <= 1e-5, name
            continue
        out = ours[name]
        assert out.shape[0] == 32
        assert _rel(out[:23], theirs[name]) <= 1e-5
        assert out[vocab["new"]].abs().max() == 0
        assert _rel(out[vocab["new2"]], a_state[name][a_vocab["x2"]]) <= 1e-6
        assert _rel(out[n:], out[:n].mean(0).expand(32 - n, -1)) <= 1e-5


def test_output_tokenizer_loads_and_chat_template_is_set(tmp_path: Path, ckpt, vocab_llamas) -> None:
    from transformers import AutoTokenizer

    cfg = _config(vocab_llamas, "task_arithmetic", tokenizer_source="union", chat_template="chatml")
    out = run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours")
    tok = AutoTokenizer.from_pretrained(str(out))
    assert "<|im_start|>" in tok.chat_template
    assert tok("w1 x1 y1 <|im|>")["input_ids"] == [tok.get_vocab()[t] for t in ("w1", "x1", "y1", "<|im|>")]
    again = run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "again")  # reproducible ids
    assert _vocab(again) == tok.get_vocab()


def test_same_tokenizers_stream_the_embeddings_unchanged(tmp_path: Path, ckpt, vocab_llamas) -> None:
    import shutil

    from mllm.merge.engine import open_readers
    from mllm.merge.layout import plan_tensors
    from mllm.merge.vocab import build_vocab

    shutil.copytree(vocab_llamas["base"], tmp_path / "c")  # same tokenizer as the base
    cfg = _config(vocab_llamas, "task_arithmetic", tokenizer_source="base")
    cfg["models"] = [{"model": str(tmp_path / "c"), "parameters": {"weight": 0.5}}]
    plan = load_plan(ckpt.write_yaml(tmp_path / "m.yaml", cfg))
    readers = open_readers(plan)
    assert all(j.vocab is None for j in plan_tensors(plan, readers, build_vocab(plan, readers)))


def _token_error(tmp_path: Path, ckpt, vocab_llamas, entry: dict) -> str:
    cfg = _config(vocab_llamas, "task_arithmetic", tokenizer={"source": "union", "tokens": {"x1": entry}})
    path = ckpt.write_yaml(tmp_path / "m.yaml", cfg)
    with pytest.raises(MergeError) as err:
        run_merge(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: tokenizer.tokens.x1")
    return text[len(f"{path}: "):]


@pytest.mark.parametrize(("entry", "message"), [
    ({"source": {"kind": "one"}}, "tokenizer.tokens.x1.source: expected a model, {kind: zero} or {kind: model_token, "
                                  "model: <model>, token: <token> | token_id: <id>}, got {'kind': 'one'}"),
    ({"source": {"kind": "model_token", "model": "{a}", "token": "x2", "token_id": 3}},
     "tokenizer.tokens.x1.source: give exactly one of token and token_id"),
    ({"source": {"kind": "model_token", "model": "{a}", "token_id": -1}},
     "tokenizer.tokens.x1.source.token_id: expected a token id >= 0, got -1"),
    ({"source": "{a}", "weight": 1}, "tokenizer.tokens.x1.weight: unknown key (expected {source: <model> | "
                                     "{kind: zero} | {kind: model_token, model: <model>, token: <token>}, force: <bool>})"),
    ({"force": True}, "tokenizer.tokens.x1: no source, and the token is missing from a model (or forced); give "
                      "source: a model, {kind: zero} or {kind: model_token, ...}"),
    ({"source": "{base}"}, "tokenizer.tokens.x1.source: model '{base}' has no token 'x1'"),
    ({"source": "/nowhere/model"}, "tokenizer.tokens.x1.source: '/nowhere/model' is not one of the models merged "
                                   "into this tensor ({a}, {b}, {base})"),
    ({"source": {"kind": "model_token", "model": "{b}", "token": "x2"}},
     "tokenizer.tokens.x1.source.token: 'x2' is not in the tokenizer of model '{b}'"),
    ({"source": {"kind": "model_token", "model": "{b}", "token_id": 99}},
     "tokenizer.tokens.x1.source: token id 99 is out of range for model '{b}' (23 rows)"),
])
def test_bad_token_entries_are_one_line(tmp_path: Path, ckpt, vocab_llamas, entry: dict, message: str) -> None:
    assert _token_error(tmp_path, ckpt, vocab_llamas, _fill(entry, vocab_llamas)) == _fill(message, vocab_llamas)


def _save_bpe(folder: Path, extra: list[str]) -> int:
    """A byte-level BPE tokenizer trained locally on a few sentences, plus ``extra`` special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the red circle is left of the blue square", "how many green triangles are there", "three plus four"]
    tok.train_from_iterator(text * 4, trainers.BpeTrainer(vocab_size=120, special_tokens=["<s>", "</s>"],
                                                          show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if extra:
        fast.add_special_tokens({"additional_special_tokens": extra})
    fast.save_pretrained(folder)
    return len(fast.get_vocab())


@pytest.mark.parametrize("source", ["union", "base"])
def test_base_tokens_without_embedding_rows_are_stripped_as_mergekit_does(tmp_path: Path, ckpt, source: str) -> None:
    """A BPE base tokenizer with a token past its config's vocab_size (no row): mergekit strips it from the
    base's vocabulary, added tokens and merges before building the output vocabulary; the same here. With
    ``union`` (built from the base's tokenizer saved and loaded again) the token, one of the special tokens,
    is back, with the zero row of a token no model has; with ``base`` it is gone from the vocabulary the
    rows follow (mergekit's folder still lists it, past its rows; ours does not)."""
    folders = {}
    for i, (key, extra, unused) in enumerate((("base", ["<|pad|>"], 1), ("a", ["<|im|>"], 0))):
        folders[key] = tmp_path / key
        n = _save_bpe(folders[key], extra)
        ckpt.save_llama(folders[key], vocab=n - unused, seed=20 + i)
    cfg = {"merge_method": "task_arithmetic", "dtype": "float32", "base_model": str(folders["base"]),
           "models": [{"model": str(folders["a"]), "parameters": {"weight": 0.6}}], "tokenizer_source": source}
    ours = run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours")
    theirs = _mergekit(cfg, tmp_path / "mk")
    if source == "union":  # the base's tokenizer, saved and loaded again: <|pad|> is back, with a zero row
        assert ckpt.state_of(ours)["model.embed_tokens.weight"][_vocab(ours)["<|pad|>"]].abs().max() == 0
    else:
        assert "<|pad|>" not in _vocab(ours) and "<|pad|>" in _vocab(theirs)
    _assert_same_merge(ckpt, ours, theirs, folders["base"], exact_ids=True)


def test_non_bpe_base_with_tokens_past_vocab_size_is_refused(tmp_path: Path, ckpt, vocab_llamas) -> None:
    import shutil

    base = tmp_path / "base"
    shutil.copytree(vocab_llamas["base"], base)
    ckpt.save_llama(base, vocab=20, seed=0)  # 23 tokens, 20 rows
    cfg = _config({**vocab_llamas, "base": base}, "task_arithmetic", tokenizer_source="union")
    path = ckpt.write_yaml(tmp_path / "m.yaml", cfg)
    with pytest.raises(MergeError) as err:
        run_merge(path, tmp_path / "out")
    assert str(err.value) == (f"{base}: tokenizer has 3 token(s) at ids >= vocab_size 20 and is of type WordLevel; "
                              f"only BPE tokenizers can be stripped of them (as in mergekit)")


def test_dry_run_shows_the_output_vocabulary_rows(tmp_path: Path, ckpt, vocab_llamas, capsys) -> None:
    cfg = _config(vocab_llamas, "task_arithmetic", tokenizer={"source": "union", "pad_to_multiple_of": 16})
    run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "out", dry_run=True)
    text = capsys.readouterr().out
    assert "model.embed_tokens.weight [32, 16] float32 <- task_arithmetic" in text
    assert "lm_head.weight [32, 16] float32 <- task_arithmetic" in text
    assert not (tmp_path / "out").exists()
