"""Configs are values: variants with other values, and the names that identify results."""

import pytest

from mnist_jax import fit
from mnist_jax.config import VARIANTS, TrainConfig, parse_seeds, select_variants
from mnist_jax.errors import ConfigError


def test_with_values_changes_the_values_and_names_them():
    v = VARIANTS["l2_dropout"].with_values(l2=3e-4, dropout=0.2)
    assert (v.l2, v.dropout, v.name) == (3e-4, 0.2, "l2_dropout[l2=0.0003,dropout=0.2]")
    assert v.l2_layers == VARIANTS["l2_dropout"].l2_layers
    assert v.dropout_layers == VARIANTS["l2_dropout"].dropout_layers
    assert VARIANTS["l2"].with_values(l2=1e-3).name == "l2[l2=0.001]"
    assert VARIANTS["l2"].with_values(l2=1e-4, name="weak").name == "weak"


def test_a_value_the_recipe_cannot_use_is_an_error():
    with pytest.raises(ConfigError, match="'baseline' has no dropout: dropout=0.2"):
        VARIANTS["baseline"].with_values(dropout=0.2)
    with pytest.raises(ConfigError, match="'dropout' has no L2 penalty: l2=0.01"):
        VARIANTS["dropout"].with_values(l2=0.01)


def test_the_study_s_flags_keep_the_variants_names():
    chosen = select_variants(list(VARIANTS), l2=1e-4, dropout=0.2)
    assert [v.name for v in chosen] == list(VARIANTS)
    assert [(v.l2, v.dropout) for v in chosen] == [(0, 0), (1e-4, 0), (0, 0.2), (1e-4, 0.2)]


def test_two_variants_of_one_name_are_refused_by_name():
    twins = [VARIANTS["l2"], VARIANTS["l2"].with_values(l2=1e-4, name="l2")]
    with pytest.raises(ConfigError, match="two variants share the name 'l2'"):
        fit.new_stack(twins, (0,), TrainConfig())


@pytest.mark.parametrize("text, seeds", [("0-4", (0, 1, 2, 3, 4)), ("3", (3,)),
                                         ("0,2,5-6", (0, 2, 5, 6))])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


def test_the_clis_tables_name_what_the_library_does():
    """The CLI's choices come from config's tables; the modules that do the work agree."""
    from mnist_jax import config, export, inputs

    assert tuple(config.EXPORT_FORMATS) == tuple(export.FORMATS)
    assert inputs.INVERT_CHOICES == tuple(config.INVERT) == ("auto", "yes", "no")
