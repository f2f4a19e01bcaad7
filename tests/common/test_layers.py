"""common.layers.resolve_layers on hand-computed cases: both result shapes, both errors."""

from __future__ import annotations

import pytest

from common.errors import UserError
from common.layers import LayerError, resolve_layers


def test_negative_indices_count_from_the_end_in_config_order() -> None:
    # depth 4: -1 -> 3, -4 -> 0; order and repeats kept (what an encoder returns)
    assert resolve_layers([-1, 0, 2, 2, -4], 4) == [3, 0, 2, 2, 0]
    assert resolve_layers(range(3), 3) == [0, 1, 2]


def test_unique_gives_the_sorted_set() -> None:
    assert resolve_layers([-1, 0, 2, 2, -4], 4, unique=True) == [0, 2, 3]


@pytest.mark.parametrize("idx", [4, -5])
def test_out_of_range_names_the_field_and_the_stack(idx: int) -> None:
    with pytest.raises(LayerError, match=rf"^enc\.layers: layer {idx} is out of range for a 4-block encoder$"):
        resolve_layers([0, idx], 4, "enc.layers", stack="block encoder")


def test_empty_is_an_error_of_the_callers_type() -> None:
    class MyError(UserError):
        pass

    with pytest.raises(MyError, match="^x: choose at least one layer of the 2-layer LLM$"):
        resolve_layers([], 2, "x", stack="layer LLM", error=MyError)
    assert issubclass(LayerError, UserError) and issubclass(LayerError, ValueError)
