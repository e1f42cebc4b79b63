"""`Muon._update` on the torch backend, with multi-tensor operations.

Keras runs torch eagerly, where every `keras.ops` call launches at least
one kernel, and each Python number it meets becomes a tensor first. This
computes what `Muon._update` computes (the definition of the algorithm)
with `torch._foreach_*` operations over all the variables of a route at
once: momentums, directions, AdamW's moments, weight decay and the final
assignment each cost a few launches per step, not a few per variable.
Newton–Schulz runs batched per block shape as on every backend, and the
hooks of the variants (`_orthogonalization_input`, `_normalized`) are
called as in `Muon._update`. `tests/test_torch_update.py` checks it
against `Muon._update`, route by route.
"""

import torch
from keras import ops

from keras_muon.distributed import orthogonalize


# The methods of `Muon` that define the generic update: a subclass that
# overrides one of them gets the generic update (`Muon._update`) on torch.
GENERIC_STEPS = (
    "_update",
    "_update_momentums",
    "_update_muon_variables",
    "_muon_direction",
    "_muon_update",
    "_adamw_step",
    "_decayed",
)


def applies_to(optimizer_type, muon_type):
    """Whether this update computes what `optimizer_type._update` does:
    `optimizer_type` overrides none of `GENERIC_STEPS` of `muon_type`."""
    return all(
        getattr(optimizer_type, name) is getattr(muon_type, name) for name in GENERIC_STEPS
    )


@torch.no_grad()
def update(optimizer, grads, variables, learning_rate):
    """Updates `variables` (Keras variables) with `grads` as
    `optimizer._update` does."""
    learning_rate = ops.convert_to_tensor(learning_rate)
    by_dtype = {}
    for gradient, variable in zip(grads, variables):
        entry = _Entry(optimizer, optimizer._get_variable_index(variable), variable, gradient)
        is_muon = optimizer._routes[entry.index].view is not None
        routes = by_dtype.setdefault(entry.momentum.dtype, ([], []))
        routes[is_muon].append(entry)
    # Multi-tensor operations over the variables of one route and one state
    # dtype (the learning rate is cast to it, as in `Muon._update`).
    for adamw, muon in by_dtype.values():
        if adamw:
            _adamw_update(optimizer, adamw, learning_rate)
        if muon:
            _muon_update(optimizer, muon, learning_rate)
    if optimizer._qk_clip is not None:
        optimizer._qk_clip.clip(optimizer)


class _Entry:
    """One variable: its index, its torch tensor, its state (momentum, and
    velocity for AdamW), and its gradient and weights in the state's dtype
    (float32 copies for 16-bit variables)."""

    def __init__(self, optimizer, index, variable, gradient):
        self.index = index
        self.tensor = variable.value
        self.momentum = optimizer._momentums[index].value
        velocity = optimizer._velocities[index]
        self.velocity = None if velocity is None else velocity.value
        dtype = self.momentum.dtype
        self.gradient = _as(ops.convert_to_tensor(gradient), dtype)
        self.weights = _as(self.tensor, dtype)

    def store(self):
        """Writes the new weights back to a 16-bit variable."""
        if self.weights is not self.tensor:
            self.tensor.copy_(self.weights)


def _adamw_update(optimizer, entries, learning_rate):
    ms = [e.momentum for e in entries]
    vs = [e.velocity for e in entries]
    gradients = [e.gradient for e in entries]
    beta_1, beta_2 = optimizer.adam_beta_1, optimizer.adam_beta_2
    # Each operation as `Muon._adamw_step` orders it, so that both round
    # alike: m + (g − m)·(1 − β₁), v + (g² − v)·(1 − β₂).
    change = torch._foreach_sub(gradients, ms)
    torch._foreach_mul_(change, 1 - beta_1)
    torch._foreach_add_(ms, change)
    change = torch._foreach_mul(gradients, gradients)
    torch._foreach_sub_(change, vs)
    torch._foreach_mul_(change, 1 - beta_2)
    torch._foreach_add_(vs, change)
    lr = learning_rate.to(ms[0].dtype) * optimizer.adam_lr_ratio
    t = optimizer.iterations.value.to(ms[0].dtype) + 1
    alpha = lr * torch.sqrt(1 - beta_2**t) / (1 - beta_1**t)
    denominators = torch._foreach_sqrt(vs)
    torch._foreach_add_(denominators, optimizer.epsilon)
    steps = torch._foreach_mul(ms, alpha)
    torch._foreach_div_(steps, denominators)
    _decay(optimizer, entries, steps, lr, optimizer.adam_weight_decay)
    torch._foreach_sub_([e.weights for e in entries], steps)
    for entry in entries:
        entry.store()


def _muon_update(optimizer, entries, learning_rate):
    moms = [e.momentum for e in entries]
    gradients = [e.gradient for e in entries]
    torch._foreach_mul_(moms, optimizer.momentum)
    torch._foreach_add_(moms, gradients)
    directions = moms
    if optimizer.nesterov:
        directions = torch._foreach_mul(moms, optimizer.momentum)
        torch._foreach_add_(directions, gradients)
    groups = {}
    for entry, direction in zip(entries, directions):
        blocks = optimizer._routes[entry.index].view.to_wide_blocks(direction)
        groups.setdefault(tuple(blocks.shape[1:]), []).append((entry, blocks))
    updates = []
    ordered = []
    for group in groups.values():
        stacked = torch.cat([blocks for _, blocks in group])
        orthogonal = orthogonalize(
            optimizer._orthogonalization_input(stacked),
            optimizer._ns_schedule,
            optimizer.ns_dtype,
            optimizer.split_newton_schulz,
        )
        sizes = [blocks.shape[0] for _, blocks in group]
        for (entry, _), blocks in zip(group, torch.split(orthogonal, sizes)):
            view = optimizer._routes[entry.index].view
            if view.d_in > view.d_out:
                blocks = blocks.transpose(-1, -2)
            blocks = optimizer._normalized(entry.index, blocks)
            updates.append(view.from_blocks(_as(blocks, entry.weights.dtype)))
            ordered.append(entry)
    lr = learning_rate.to(ordered[0].weights.dtype)
    _decay(optimizer, ordered, updates, lr, optimizer.weight_decay)
    # `update·(lr·s)`, each variable's factor `lr·s` rounded once.
    scales = torch.tensor(
        [optimizer._scales[e.index] for e in ordered], dtype=lr.dtype, device=lr.device
    )
    torch._foreach_mul_(updates, torch.unbind(lr * scales))
    torch._foreach_sub_([e.weights for e in ordered], updates)
    for entry in ordered:
        entry.store()


def _decay(optimizer, entries, updates, lr, rate):
    """Decoupled weight decay at `rate`, of the entries that decay."""
    decaying = [
        (entry, update)
        for entry, update in zip(entries, updates)
        if optimizer._decay_rate(entry.index, rate)
    ]
    if not decaying:
        return
    weights = [entry.weights for entry, _ in decaying]
    if not optimizer.cautious_weight_decay:
        torch._foreach_mul_(weights, 1 - lr * rate)
        return
    # Cautious (`weight_decay.decayed`): the factor is 1 − rate where the
    # update has the weight's sign (update·W ≥ 0), else 1.
    factors = torch._foreach_mul([update for _, update in decaying], weights)
    torch._foreach_sign_(factors)
    torch._foreach_add_(factors, 1)
    torch._foreach_clamp_max_(factors, 1)  # the mask: 1 where update·W ≥ 0
    torch._foreach_mul_(factors, -(lr * rate))
    torch._foreach_add_(factors, 1)
    torch._foreach_mul_(weights, factors)


def _as(tensor, dtype):
    """`tensor` in `dtype`, without an operation where it is already."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
