"""Names of variables and of the optimizer's state."""

import keras

from keras_muon.naming import lora_rank
from keras_muon.naming import state_name
from keras_muon.naming import variable_path


def test_variable_path_and_state_name():
    layer = keras.layers.Dense(3, name="proj")
    layer.build((None, 2))
    assert variable_path(layer.kernel) == "proj/kernel"
    assert state_name(variable_path(layer.kernel), "momentum") == "proj_kernel_momentum"


def test_state_names_are_those_keras_gives_state_made_from_a_variable():
    layer = keras.layers.Dense(3, name="proj")
    layer.build((None, 2))
    optimizer = keras.optimizers.SGD(momentum=0.9)
    optimizer.build([layer.kernel])
    made_by_keras = optimizer.add_variable_from_reference(layer.kernel, "momentum")
    assert made_by_keras.name == state_name(variable_path(layer.kernel), "momentum")


class Unnamed:
    """A backend variable without a path: a raw `tf.Variable` has a name."""

    name = "matrix:0"


def test_a_variable_without_a_path_goes_by_its_name():
    assert variable_path(Unnamed()) == "matrix:0"


def test_the_rank_of_an_einsum_lora_factor_is_not_its_shortest_axis():
    layer = keras.layers.EinsumDense("abc,cde->abde", output_shape=(5, 2, 16), name="query")
    layer.build((None, 5, 8))
    layer.enable_lora(4)
    assert tuple(layer.lora_kernel_a.shape) == (8, 2, 4) and tuple(layer.lora_kernel_b.shape) == (
        4,
        16,
    )
    assert lora_rank(layer.lora_kernel_a) == lora_rank(layer.lora_kernel_b) == 4
