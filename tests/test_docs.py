"""The ``>>>`` examples in the public modules' docstrings run and give what they show."""

import doctest
import importlib

import pytest

MODULES = [
    "layerlens_jax._src.sites",
    "layerlens_jax._src.profile",
    "layerlens_jax._src.fisher_rules",
    "layerlens_jax._src.utility",
    "layerlens_jax._src.allocate",
    "layerlens_jax._src.peft.apply",
    "layerlens_jax._src.checkpoint",
    "layerlens_jax.models",
]

# The headline functions each carry a runnable example (module, name).
MUST_HAVE_EXAMPLE = [
    ("layerlens_jax._src.sites", "discover_sites"),
    ("layerlens_jax._src.profile", "profile"),
    ("layerlens_jax._src.utility", "utility"),
    ("layerlens_jax._src.utility", "utility_report"),
    ("layerlens_jax._src.allocate", "allocate"),
    ("layerlens_jax._src.peft.apply", "apply_plan"),
    ("layerlens_jax._src.peft.apply", "merge"),
    ("layerlens_jax._src.checkpoint", "save_adapters"),
]

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=FLAGS, report=True, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"


@pytest.mark.parametrize("name,function", MUST_HAVE_EXAMPLE)
def test_headline_functions_have_an_example(name, function):
    obj = getattr(importlib.import_module(name), function)
    examples = doctest.DocTestParser().get_examples(obj.__doc__ or "")
    assert examples, f"{name}.{function} has no '>>>' example in its docstring"


def test_a_failing_example_is_caught():
    def wrong():
        """
        >>> 1 + 1
        3
        """

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=FLAGS)
    for test in finder.find(wrong, "wrong", globs={}):
        runner.run(test, out=lambda s: None)
    assert runner.summarize(verbose=False) == (1, 1)
