"""diffusers_am.checks: what each check accepts, what it returns, and its exact one-line message."""

import math

import numpy as np
import pytest
import torch

from diffusers_am.checks import finite_float, int_at_least, one_of, positive_float, positive_int


def test_integers_are_ints_or_numpy_ints_never_bools_or_floats():
    assert positive_int(3, "n") == 3 and type(positive_int(np.int64(3), "n")) is int
    assert int_at_least(0, "seed", 0) == 0 and int_at_least(np.int32(5), "k", 1) == 5
    for bad in (0, -2, True, 2.0, "3", None, torch.tensor(2)):
        with pytest.raises(ValueError) as err:
            positive_int(bad, "batch_size")
        assert str(err.value) == f"`batch_size` must be a positive integer; got {bad!r}."
    for bad in (-1, False, 1.5, "0"):
        with pytest.raises(ValueError) as err:
            int_at_least(bad, "--seed", 0)
        assert str(err.value) == f"`--seed` must be an integer >= 0; got {bad!r}."


def test_numbers_are_finite_and_come_back_as_floats():
    assert finite_float(2, "g") == 2.0 and type(finite_float(np.float32(0.5), "g")) is float
    assert finite_float(-1.5, "g") == -1.5 and positive_float(torch.tensor(0.25), "lam") == 0.25
    for bad in (math.nan, math.inf, -math.inf, "1.0", True, None, [1.0]):
        with pytest.raises(ValueError) as err:
            finite_float(bad, "guidance_scale")
        assert str(err.value) == f"`guidance_scale` must be a finite number; got {bad!r}."
    for bad in (0, 0.0, -1e-9, math.inf, math.nan, "2", False):
        with pytest.raises(ValueError) as err:
            positive_float(bad, "reward_scale")
        assert str(err.value) == f"`reward_scale` must be a finite number > 0; got {bad!r}."


def test_one_of_names_every_choice_in_order():
    assert one_of("nf4", "--quantize_base", ("none", "nf4", "int8")) == "nf4"
    assert one_of("b", "net", iter(["a", "b"])) == "b"  # any iterable of choices
    with pytest.raises(ValueError) as err:
        one_of("fp8", "--quantize_base", ("none", "nf4", "int8"))
    assert str(err.value) == "`--quantize_base` must be one of none, nf4, int8; got 'fp8'."
    with pytest.raises(ValueError, match=r"^`split` must be one of train, heldout; got None\.$"):
        one_of(None, "split", {"train": 1, "heldout": 2})
