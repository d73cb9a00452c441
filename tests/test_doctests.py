"""The worked examples in the core modules' docstrings are executed."""

import doctest

import pytest

from fluid_cli import config, data, hf, khead, layout, openai_api, prompts, render, sources, synthetic, tokenizer


@pytest.mark.parametrize("module", [config, data, hf, khead, layout, openai_api, prompts, render, sources, synthetic,
                                    tokenizer],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
