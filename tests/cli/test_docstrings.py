"""The examples in the command modules' docstrings run as written."""

import doctest

import pytest

from starquant_plugin.cli import quantize, table


@pytest.mark.parametrize("module", [table, quantize], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
