"""A callback that reports QK-Clip's statistics in the training logs."""

import keras
import numpy as np


class QKClipMonitor(keras.callbacks.Callback):
    """Adds QK-Clip's statistics to the logs of `fit`.

    After each batch, `max_logit` (the largest attention logit of the step,
    over all clipped layers and heads, before the clip) and `clipped_heads`
    (the number of heads clipped in the step) go to the batch logs, and so
    to the progress bar. At the end of each epoch, the epoch's largest
    `max_logit` and its total of `clipped_heads` go to the epoch logs, and
    so to the `History` and to `TensorBoard`.

    On JAX, reading the optimizer's state mid-epoch makes `fit` copy its
    training state into the variables after every batch.

    Put it before the other callbacks that read the logs. The model's
    optimizer (or the one a `LossScaleOptimizer` wraps) must have been
    created with `qk_clip_threshold`.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_max = -np.inf
        self._epoch_clipped = 0

    def on_train_batch_end(self, batch, logs=None):
        optimizer = self.model.optimizer
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        if hasattr(self.model, "jax_state_sync"):
            # JAX's fit keeps the state outside the variables until synced.
            self.model.jax_state_sync()
        logits = optimizer.max_logits()
        max_logit = max((float(np.max(v)) for v in logits.values()), default=-np.inf)
        clipped = optimizer.clipped_heads()
        self._epoch_max = max(self._epoch_max, max_logit)
        self._epoch_clipped += clipped
        if logs is not None:
            logs["max_logit"] = max_logit
            logs["clipped_heads"] = clipped

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["max_logit"] = self._epoch_max
            logs["clipped_heads"] = self._epoch_clipped
