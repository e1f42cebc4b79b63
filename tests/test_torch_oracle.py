"""keras_muon against torch.optim.Muon, the peer implementation in PyTorch."""

import keras
import numpy as np
import pytest

import keras_muon

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="compares with torch.optim.Muon"
)


@pytest.mark.parametrize("shape", [(48, 96), (96, 48)], ids=["widening", "narrowing"])
def test_agrees_with_torch_optim_muon(shape):
    import torch

    rng = np.random.default_rng(0)
    initial = rng.normal(size=shape).astype("float32")
    gradients = [rng.normal(size=shape).astype("float32") for _ in range(3)]

    kernel = keras.Variable(initial, name="kernel")  # Keras: (d_in, d_out)
    optimizer = keras_muon.Muon(
        learning_rate=0.02, weight_decay=0.1, scale="jordan", ns_coefficients="jordan"
    )
    # torch.nn.Linear stores the same matrix transposed: (d_out, d_in).
    parameter = torch.nn.Parameter(torch.tensor(initial.T.copy()))
    peer = torch.optim.Muon(
        [parameter],
        lr=0.02,
        weight_decay=0.1,
        momentum=0.95,
        nesterov=True,
        adjust_lr_fn="original",
    )
    for g in gradients:
        optimizer.apply([keras.ops.convert_to_tensor(g)], [kernel])
        parameter.grad = torch.tensor(g.T.copy())
        peer.step()

    ours = keras.ops.convert_to_numpy(kernel) - initial
    theirs = parameter.detach().numpy().T - initial
    # torch iterates in bfloat16; keras_muon in float32 here. A transposed
    # scale factor would be off by sqrt(2), i.e. about 40%.
    assert np.linalg.norm(ours - theirs) <= 2e-2 * np.linalg.norm(theirs)
