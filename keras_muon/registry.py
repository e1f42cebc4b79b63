"""Rules per layer type, looked up from the most specific class of a layer.

keras_muon keeps two registries of this kind: how a layer's variables are
read as matrices (`routing.keras_layers.MATRIX_RULES`) and how QK-Clip
reads a layer's attention (`qk_clip.rules.ATTENTION_RULES`). The rules for
other libraries' layers are registered as defaults when those libraries
have been imported, so that a rule the user registered first is kept.
"""

import contextlib
import importlib

from keras_muon.arguments import layer_rule


class LayerRegistry:
    """Maps layer types to rules; a subclass without a rule of its own
    takes its closest registered base class's."""

    def __init__(self):
        self._rules = {}

    def register(self, layer_type, rule):
        """Sets the rule of `layer_type`, after checking both arguments."""
        layer_rule(layer_type, rule)
        self._rules[layer_type] = rule

    def register_defaults(self, rules):
        """Sets the rule of each layer type of `rules` (a dict) that has
        none yet."""
        for layer_type, rule in rules.items():
            self._rules.setdefault(layer_type, rule)

    def classes_and_rules(self, layer):
        """`(class, its rule or None)` for each class of `layer`, the most
        specific first."""
        return [(cls, self._rules.get(cls)) for cls in type(layer).__mro__]

    def rule(self, layer):
        """The rule of the most specific registered class of `layer`, or
        None."""
        return next((r for _, r in self.classes_and_rules(layer) if r is not None), None)

    @contextlib.contextmanager
    def scoped(self):
        """Undoes, on exit, the registrations made inside (for tests)."""
        saved = dict(self._rules)
        try:
            yield self
        finally:
            self._rules.clear()
            self._rules.update(saved)


def installed_classes(table):
    """`{class: value}` for each `(module, class name): value` of `table`
    whose class the installed version of its library has."""
    classes = {}
    for (module, name), value in table.items():
        try:
            classes[getattr(importlib.import_module(module), name)] = value
        except (ImportError, AttributeError):  # an older or newer version
            continue
    return classes
