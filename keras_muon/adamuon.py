import math

import keras
from keras import ops

from keras_muon.arguments import boolean
from keras_muon.arguments import number
from keras_muon.muon import Muon
from keras_muon.muon import document
from keras_muon.update import rule
from keras_muon.update.state import add_float32_state


@keras.saving.register_keras_serializable(package="keras_muon")
@document(omit=("scale", "rms_rate"))
class AdaMuon(Muon):
    """Muon with an element-wise second moment of the orthogonalized update,
    rescaled to a fixed update RMS.

    ```
    X = sign(N)               (N if sign_input=False; N is Muon's direction)
    O = msign(X)
    V ← β₂·V + (1 − β₂)·O ⊙ O
    Ô = O / (sqrt(V) + ε)
    W ← W − lr·(rms_rate·sqrt(d_in·d_out)·Ô / ‖Ô‖_F + λ·W)
    ```

    Each block's update has RMS exactly `rms_rate`, as AdamW's typically
    has, so AdamW's learning rate and weight decay carry over. `V` has the
    shape and layout of the variable (float32): the state of a Muon
    variable is then the size of AdamW's, two moments. Routing, views,
    batching and the AdamW side are `Muon`'s.

    Args:
        beta_2: Float in [0, 1), the decay of `V`, or `None` for `momentum`.
            Defaults to `None`.
        sign_input: Boolean, whether msign is applied to the sign of the
            momentum direction (as in the paper) rather than to the
            direction itself. Defaults to `True`.
        rms_rate: Float > 0, the RMS of each block's update. Defaults to
            `0.2`.
        {{muon_arguments}}

    References:
        - [Si et al., 2025](https://arxiv.org/abs/2507.11005)
    """

    def __init__(
        self, beta_2=None, sign_input=True, rms_rate=rule.DEFAULT_RMS_RATE, name=None, **kwargs
    ):
        if "scale" in kwargs:
            raise ValueError(
                "AdaMuon has no `scale`: each block's update has the RMS "
                f"`rms_rate`. Received: scale={kwargs['scale']!r}"
            )
        rms_rate = number("rms_rate", rms_rate, above=0.0)
        super().__init__(rms_rate=rms_rate, name=name, **kwargs)
        if beta_2 is not None:
            beta_2 = number("beta_2", beta_2, minimum=0.0, below=1.0)
        self.beta_2 = beta_2
        self.sign_input = boolean("sign_input", sign_input)

    def _block_scale(self, view):
        return self.rms_rate * math.sqrt(view.d_in * view.d_out)

    def _add_variant_state(self, variable, view):
        # The variable's shape and layout, so that it is sharded as the
        # variable is; read as blocks at each step.
        layout = getattr(variable, "_layout", None)
        return add_float32_state(self, variable, "second_moment", variable.shape, layout)

    def _orthogonalization_input(self, blocks):
        return ops.sign(blocks) if self.sign_input else blocks

    def _normalized(self, entry, blocks):
        second_moment = entry.state.variant_state
        view = entry.state.route.view
        beta_2 = self.momentum if self.beta_2 is None else self.beta_2
        normalized, new_second_moment = rule.adamuon(blocks, view.to_blocks(second_moment), beta_2)
        self.assign(second_moment, view.from_blocks(new_second_moment))
        return normalized

    def get_config(self):
        config = super().get_config()
        del config["scale"]
        config.update({"beta_2": self.beta_2, "sign_input": self.sign_input})
        return config
