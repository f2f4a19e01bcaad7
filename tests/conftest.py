"""Hermetic test set-up: no network, few threads, deterministic."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Any attempt to reach a model hub must fail loudly in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs on the CPU: models load onto CUDA by default when it is there, while the tests' batches
# are built on the CPU. Set CUDA_VISIBLE_DEVICES yourself to run GPU checks.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# Shared builders of test models (hf_families.py) import as top-level modules, as benchmarks/ scripts do.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny test models gain nothing from intra-op threads, and several pytest processes on a 2-core
# machine would oversubscribe it (OpenMP spin-waits make that very slow).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


TINY_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
TINY_WORDS = (
    "USER ASSISTANT : what colour shape is the of a are there how many left right above below "
    "red green blue circle square triangle yes no ? . , [ ] 0 1 2 3 4 5 6 7 8 9"
).split()


@pytest.fixture(scope="session")
def word_tokenizer():  # noqa: ANN201 - transformers is imported lazily
    """A fixed word-level tokenizer (ids: specials 0-4, then TINY_WORDS in order) for exact-id tests.

    Same special tokens as train/data/tokenizer.py; built here so goldens do not depend on it.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS + TINY_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.add_special_tokens(TINY_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens=["<image>"],
    )
