"""LayerRegistry: rules per layer type, the most specific class first."""

import keras
import pytest

from keras_muon.registry import LayerRegistry
from keras_muon.registry import installed_classes


class Base(keras.layers.Layer):
    pass


class Derived(Base):
    pass


class MoreDerived(Derived):
    pass


def base_rule(layer):
    return "base"


def derived_rule(layer):
    return "derived"


def library_rule(layer):
    return "library's"


def test_the_most_specific_registered_class_decides():
    registry = LayerRegistry()
    assert registry.rule(MoreDerived()) is None
    registry.register(Base, base_rule)
    assert registry.rule(MoreDerived()) is base_rule
    registry.register(Derived, derived_rule)
    assert registry.rule(MoreDerived()) is derived_rule
    assert registry.rule(Base()) is base_rule
    classes = registry.classes_and_rules(MoreDerived())
    assert classes[:3] == [(MoreDerived, None), (Derived, derived_rule), (Base, base_rule)]


def test_defaults_keep_what_is_registered():
    registry = LayerRegistry()
    registry.register(Base, base_rule)
    registry.register_defaults({Base: library_rule, Derived: library_rule})
    assert registry.rule(Base()) is base_rule
    assert registry.rule(Derived()) is library_rule


def test_scoped_undoes_registrations():
    registry = LayerRegistry()
    registry.register(Base, base_rule)
    with registry.scoped():
        registry.register(Base, library_rule)
        registry.register(Derived, derived_rule)
        assert registry.rule(Derived()) is derived_rule
    assert registry.rule(Derived()) is base_rule


@pytest.mark.parametrize(
    "layer_type, rule, message", [(object, base_rule, "layer_type"), (Base, "base", "rule")]
)
def test_register_checks_its_arguments(layer_type, rule, message):
    with pytest.raises(ValueError, match=message):
        LayerRegistry().register(layer_type, rule)


def test_installed_classes_skips_what_the_library_lacks():
    table = {
        ("keras.layers", "Dense"): "dense",
        ("keras.layers", "NoSuchLayer"): "missing class",
        ("no_such_library.layers", "Dense"): "missing module",
    }
    assert installed_classes(table) == {keras.layers.Dense: "dense"}
