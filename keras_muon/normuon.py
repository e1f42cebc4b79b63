import keras

from keras_muon.arguments import number
from keras_muon.muon import Muon
from keras_muon.muon import document
from keras_muon.update import rule
from keras_muon.update.state import add_float32_state
from keras_muon.update.state import block_state_layout


@keras.saving.register_keras_serializable(package="keras_muon")
@document
class NorMuon(Muon):
    """Muon with a per-neuron second moment of the orthogonalized update.

    After msign, each neuron's entries of `O` are divided by the square
    root of a running mean of their squares, so that every neuron moves at
    a similar rate; the result is rescaled to `O`'s Frobenius norm, then
    scaled by `s` as in `Muon`:

    ```
    v ← β₂·v + (1 − β₂)·mean(O ⊙ O)      (one entry per neuron)
    Ô = O / sqrt(v) · ‖O‖_F / ‖O / sqrt(v)‖_F
    W ← W − lr·(s·Ô + λ·W)
    ```

    The state adds one float32 vector per Muon block to `Muon`'s. Routing,
    views, batching and the AdamW side are `Muon`'s.

    Args:
        beta_2: Float in [0, 1), the decay of the second moment. Defaults
            to `0.95`.
        neuron_axis: `"longer"` (one entry per row or column of the longer
            side of each `(d_in, d_out)` block, output on a tie) or
            `"output"` (one per output feature). Defaults to `"longer"`.
        {{muon_arguments}}

    References:
        - [Li et al., 2025](https://arxiv.org/abs/2510.05491)
    """

    def __init__(self, beta_2=0.95, neuron_axis="longer", name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.beta_2 = number("beta_2", beta_2, minimum=0.0, below=1.0)
        rule.neuron_state_shape(1, 1, 1, neuron_axis)  # validates it
        self.neuron_axis = neuron_axis

    def _add_variant_state(self, variable, view):
        shape = rule.neuron_state_shape(view.num_blocks, view.d_in, view.d_out, self.neuron_axis)
        layout = block_state_layout(variable, view, shape)  # sharded as the variable's blocks
        return add_float32_state(self, variable, "neuron_second_moment", shape, layout)

    def _normalized(self, entry, blocks):
        second_moment = entry.state.variant_state
        normalized, new_second_moment = rule.normuon(blocks, second_moment, self.beta_2)
        self.assign(second_moment, new_second_moment)
        return normalized

    def get_config(self):
        config = super().get_config()
        config.update({"beta_2": self.beta_2, "neuron_axis": self.neuron_axis})
        return config
