"""QKClipMonitor in the training logs."""

import numpy as np

import keras_muon
from tests.qk_clip.attention import fit_one_step
from tests.qk_clip.attention import without_learning


def test_the_monitor_reports_in_the_history():
    model, (inputs, targets, mask), before, threshold, optimizer = without_learning(4)
    # Two steps on the same batch: the second sees the clipped logits.
    history = fit_one_step(
        model, optimizer, np.concatenate([inputs] * 2), np.concatenate([targets] * 2),
        callbacks=[keras_muon.QKClipMonitor()],
    )
    np.testing.assert_allclose(history.history["max_logit"], [before.max()], rtol=1e-5)
    assert history.history["clipped_heads"][0] >= np.sum(before > threshold)
