"""The reward API: built-ins, user functions by module/file, weights, None, and one-line errors."""

import textwrap

import numpy as np
import pytest
import torch

from dsv3.errors import ConfigError, DataError, TrainingError
from dsv3.train.rewards import RewardSet, extract_code, extract_final_answer, format_reward, math_reward


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("so a+b = 12", 12),
        ("The answer is \\boxed{\\frac{3}{4}}.", "0.75"),
        ("x = 1,000 then 2,500", "2500"),
        ("\\boxed{x^{2}+1} and 7 later", "x^{2} + 1"),
        ("3/4", 0.75),
        ("-5.0", "-5"),
        ("12.", 12),
    ],
)
def test_math_reward_accepts_the_same_answer(completion, answer):
    assert math_reward(["p"], [completion], answer=[answer]) == [1.0]


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("12 then 13", 12),
        ("\\boxed{7} but 12", 12),
        ("no number", 3),
        ("1.0001", 1),
        ("\\boxed{x+1}", "x+2"),
    ],
)
def test_math_reward_rejects_a_different_answer(completion, answer):
    assert math_reward(["p"], [completion], answer=[answer]) == [0.0]


def test_extractors():
    assert extract_final_answer("a \\boxed{1} b \\boxed{{2}}") == "{2}"
    assert extract_final_answer("nothing") is None
    assert extract_code("text\n```python\nx = 1\n```\nmore\n```\ny = 2\n```\n") == "y = 2\n"
    assert extract_code("def f(): return 1") == "def f(): return 1"


def test_format_reward_default_option_and_column():
    r1 = "<think>add</think> <answer>5</answer>"
    assert format_reward(["p", "p"], [r1, "5"]) == [1.0, 0.0]
    digits = RewardSet.from_specs([r"format=\d+"])
    assert digits(["p", "p"], ["42", "4 2"], {}).per_function["format"] == [1.0, 0.0]
    per_row = RewardSet.from_specs(["format"])(["p", "p"], ["42", r1], {"format": [r"\d+", None]})
    assert per_row.per_function["format"] == [1.0, 1.0]
    with pytest.raises(ConfigError, match="not a regular expression"):
        RewardSet.from_specs(["format=(unclosed"])
    with pytest.raises(DataError, match="format column"):
        RewardSet.from_specs(["format"])(["p"], ["x"], {"format": ["(bad"]})


def _user_module(tmp_path, body, name="user_rewards"):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_weights_none_and_user_functions(tmp_path, monkeypatch):
    path = _user_module(
        tmp_path,
        """
        def length(prompts, completions, **kw):
            return [None if c == "skip" else float(len(c)) for c in completions]
        def needs_answer(prompts, completions, answer, *, scale=1.0, **kw):
            return [0.5] * len(completions)
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rs = RewardSet.from_specs(["math", f"{path}:length", "user_rewards:needs_answer"], weights=[2.0, 0.5, 1.0])
    assert rs.names == ["math", f"{path}:length", "user_rewards:needs_answer"]
    assert rs.required_columns == ["answer"]
    out = rs(["p", "p", "p"], ["7", "skip", "x"], {"answer": [7, None, 3]})
    assert out.per_function["math"] == [1.0, None, 0.0]
    assert out.per_function[f"{path}:length"] == [1.0, None, 1.0]
    # 2*1 + 0.5*1 + 0.5 ; the middle row: only needs_answer applies ; 2*0 + 0.5*1 + 0.5
    assert out.total.dtype == torch.float32
    assert out.total.tolist() == [3.0, 0.5, 1.0]
    none = RewardSet([("never", lambda p, c, **k: [None] * len(c))])
    assert none(["p"], ["c"], {}).total.tolist() == [0.0]
    arrays = RewardSet(
        [("tensor", lambda p, c, **k: torch.ones(len(c))), ("numpy", lambda p, c, **k: np.full(len(c), 0.5))]
    )
    assert arrays(["p", "p"], ["a", "b"], {}).total.tolist() == [1.5, 1.5]


def test_bad_specs_get_one_line(tmp_path):
    broken = _user_module(tmp_path, "import not_a_module_anywhere\n", name="broken")
    cases = [
        (["nonsense"], "neither a built-in"),
        ([f"{broken}:f"], "does not import.*ModuleNotFoundError"),
        (["no_such_pkg_xyz:f"], "does not import"),
        ([f"{tmp_path}/missing.py:f"], "does not exist"),
        (["math:nope"], "has no function 'nope'"),
        (["math", "math"], "named twice"),
    ]
    for specs, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as e:
            RewardSet.from_specs(specs)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="2 reward weights were given for 1"):
        RewardSet.from_specs(["math"], weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="no reward functions"):
        RewardSet.from_specs([])


@pytest.mark.parametrize(
    "fn, pattern",
    [
        (lambda p, c, **k: 1 / 0, "'bad' raised ZeroDivisionError"),
        (lambda p, c, **k: [1.0], "'bad' returned 1 values for 2 completions"),
        (lambda p, c, **k: 3.0, "'bad' returned a float for 2"),
        (lambda p, c, **k: [1.0, float("nan")], "'bad' returned nan"),
        (lambda p, c, **k: ["1", 2.0], "'bad' returned '1'"),
    ],
)
def test_bad_reward_functions_get_one_line(fn, pattern):
    with pytest.raises(TrainingError, match=pattern) as e:
        RewardSet([("bad", fn)])(["p", "p"], ["a", "b"], {})
    assert "\n" not in str(e.value)


def test_missing_column_names_the_function():
    rs = RewardSet.from_specs(["format", "math"])
    with pytest.raises(DataError, match="'math' needs the column 'answer'.*columns: question"):
        rs.check_columns(["question"])
    with pytest.raises(DataError, match="'math' needs the column 'answer'"):
        rs(["p"], ["1"], {})
    with pytest.raises(DataError, match="one of each per completion"):
        rs(["p"], ["1"], {"answer": [1, 2]})
