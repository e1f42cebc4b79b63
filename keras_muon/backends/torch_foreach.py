"""The torch backend's multi-tensor twins of the update's element-wise phases.

Keras runs torch eagerly, where every `keras.ops` call launches at least
one kernel and each Python number it meets becomes a tensor first. On
torch, the phases `Muon._adamw_update`, `_momentum_update` and
`_muon_update` run the functions of the same names below instead: the same
formulas in the same order of operations, written with `torch._foreach_*`
operations over all the variables of a phase at once, so that each costs a
few launches per step, not a few per variable. On CPU they give the
generic phases' results bit for bit.

Each formula of `update/rule.py` that these phases use has a twin of the
same name here, on lists of tensors, in place where the generic one
returns new values; `tests/backends/test_torch_foreach.py` compares each
pair, and the phases. Newton–Schulz, the batching by block shape and the
variants' hooks are shared with the generic phases. The phases read the
optimizer's hyperparameters, the `Entry`s they are given and its hooks.
"""

import dataclasses

import torch
from keras import ops

from keras_muon.update import batching
from keras_muon.update import momentum_storage
from keras_muon.update import parts

# The formulas: twins of those of update/rule.py.


def momentum_and_direction(momentums, gradients, beta, nesterov):
    """`M ← β·M + G` in place; returns the directions: new tensors
    `β·M + G` with Nesterov momentum, else the momentums themselves."""
    torch._foreach_mul_(momentums, beta)
    torch._foreach_add_(momentums, gradients)
    if not nesterov:
        return momentums
    directions = torch._foreach_mul(momentums, beta)
    torch._foreach_add_(directions, gradients)
    return directions


def adamw_moments(ms, vs, gradients, beta_1, beta_2):
    """`m ← m + (g − m)·(1 − β₁)` and `v ← v + (g² − v)·(1 − β₂)` in place."""
    change = torch._foreach_sub(gradients, ms)
    torch._foreach_mul_(change, 1 - beta_1)
    torch._foreach_add_(ms, change)
    change = torch._foreach_mul(gradients, gradients)
    torch._foreach_sub_(change, vs)
    torch._foreach_mul_(change, 1 - beta_2)
    torch._foreach_add_(vs, change)


def adamw_step(ms, vs, lr, step, beta_1, beta_2, epsilon):
    """AdamW's steps before weight decay, `lr·α·m / (sqrt(v) + ε)`."""
    alpha = lr * torch.sqrt(1 - beta_2**step) / (1 - beta_1**step)
    denominators = torch._foreach_sqrt(vs)
    torch._foreach_add_(denominators, epsilon)
    steps = torch._foreach_mul(ms, alpha)
    torch._foreach_div_(steps, denominators)
    return steps


def decayed(weights, updates, rate, cautious=False):
    """Decoupled weight decay of `weights` at `rate`, in place."""
    if not cautious:
        torch._foreach_mul_(weights, 1 - rate)
        return
    # `where` has no multi-tensor form: the factor is 1 − rate·mask, the
    # mask sign(update·W) + 1 clamped to 1 (1 where update·W ≥ 0, else 0).
    factors = torch._foreach_mul(updates, weights)
    torch._foreach_sign_(factors)
    torch._foreach_add_(factors, 1)
    torch._foreach_clamp_max_(factors, 1)
    torch._foreach_mul_(factors, -rate)
    torch._foreach_add_(factors, 1)
    torch._foreach_mul_(weights, factors)


def descended(weights, updates, step_sizes):
    """`W ← W − step_size·U` in place, one step size (a scalar tensor)
    per weight; `updates` are scaled in place."""
    torch._foreach_mul_(updates, step_sizes)
    torch._foreach_sub_(weights, updates)


# The phases: twins of Muon's.


@torch.no_grad()
def adamw_update(optimizer, entries, learning_rate):
    """`Muon._adamw_update`."""
    learning_rate = ops.convert_to_tensor(learning_rate)
    for dtype, group in _by_state_dtype(entries):
        ms = [entry.state.momentum.value for entry in group]
        vs = [entry.state.velocity.value for entry in group]
        gradients = [_as(ops.convert_to_tensor(entry.gradient), dtype) for entry in group]
        lr = learning_rate.to(dtype) * optimizer.adam_lr_ratio
        # A tensor, not a variable, with gradient accumulation.
        step = ops.convert_to_tensor(optimizer.iterations).to(dtype) + 1
        beta_1, beta_2 = optimizer.adam_beta_1, optimizer.adam_beta_2
        adamw_moments(ms, vs, gradients, beta_1, beta_2)
        steps = adamw_step(ms, vs, lr, step, beta_1, beta_2, optimizer.epsilon)
        weights = [_as(entry.variable.value, dtype) for entry in group]
        _decay(optimizer, group, weights, steps, lr, optimizer.adam_weight_decay)
        torch._foreach_sub_(weights, steps)
        _store(group, weights)


@torch.no_grad()
def momentum_update(optimizer, entries):
    """`Muon._momentum_update`."""
    directions = {}
    for dtype, group in _by_state_dtype(entries):
        # A float32 momentum is updated in place; a rounded one in a copy.
        momentums = [_value(momentum_storage.read(entry.state)) for entry in group]
        gradients = [_as(ops.convert_to_tensor(entry.gradient), dtype) for entry in group]
        new = momentum_and_direction(momentums, gradients, optimizer.momentum, optimizer.nesterov)
        directions.update(zip(map(id, group), new))
        for entry, momentum in zip(group, momentums):
            if momentum is not entry.state.momentum.value:
                for variable, value in momentum_storage.stored(entry.state, momentum):
                    variable.value.copy_(value)
    wide_blocks = [e.state.route.view.to_wide_blocks(directions[id(e)]) for e in entries]
    return batching.stack_by_shape(entries, wide_blocks)


@torch.no_grad()
def muon_update(optimizer, batches, orthogonal, learning_rate):
    """`Muon._muon_update`."""
    learning_rate = ops.convert_to_tensor(learning_rate)
    entries, updates, factors = [], {}, {}
    for entry, blocks in batching.by_variable(batches, orthogonal):
        dtype = _state_dtype(entry)
        blocks = [_as(optimizer._normalized(e, b), dtype) for e, b in parts.entries(entry, blocks)]
        if entry.state.radius is not None:
            _hyperball(entry, blocks, learning_rate)
            continue
        entries.append(entry)
        updates[id(entry)], factors[id(entry)] = parts.update(entry.state, blocks)
    for dtype, group in _by_state_dtype(entries):
        lr = learning_rate.to(dtype)
        weights = [_as(entry.variable.value, dtype) for entry in group]
        group_updates = [updates[id(entry)] for entry in group]
        _decay(optimizer, group, weights, group_updates, lr, optimizer.weight_decay)
        # `lr·s` per variable, each rounded once, as `rule.descended` takes it.
        scales = torch.tensor(
            [factors[id(entry)] for entry in group], dtype=dtype, device=lr.device
        )
        descended(weights, group_updates, torch.unbind(lr * scales))
        _store(group, weights)


def _hyperball(entry, blocks, learning_rate):
    """`rule.hyperball`'s step of one variable. It normalizes each block,
    and has no multi-tensor form (as the variants' normalizations)."""
    weights, dtype, radius = entry.variable.value, _state_dtype(entry), entry.state.radius.value
    state = dataclasses.replace(entry.state, radius=radius)
    new_weights, new_radius = parts.hyperball(
        state, _as(weights, dtype), blocks, learning_rate.to(dtype)
    )
    radius.copy_(new_radius)
    weights.copy_(new_weights)


def _by_state_dtype(entries):
    """`(dtype, entries)` per torch dtype of the optimizer's state, in
    order: a multi-tensor operation takes one scalar (the learning rate,
    cast to the state's dtype) for all its tensors."""
    groups = {}
    for entry in entries:
        groups.setdefault(_state_dtype(entry), []).append(entry)
    return list(groups.items())


def _state_dtype(entry):
    """The torch dtype of `entry`'s update (`VariableState.dtype`)."""
    momentum = entry.state.momentum.value
    return momentum.dtype if entry.state.dtype == entry.state.momentum.dtype else torch.float32


def _value(momentum):
    """A momentum's torch tensor: the variable's own, or a computed one."""
    return momentum.value if hasattr(momentum, "value") else momentum


def _decay(optimizer, entries, weights, updates, lr, rate):
    """`decayed` at `rate` for the weights whose variable decays."""
    decaying = [(w, u) for e, w, u in zip(entries, weights, updates) if rate and e.state.decays]
    if decaying:
        weights, updates = zip(*decaying)
        decayed(list(weights), list(updates), lr * rate, optimizer.cautious_weight_decay)


def _store(entries, weights):
    """Writes the new weights back where they are float32 copies of 16-bit
    variables, rounding once."""
    for entry, new_weights in zip(entries, weights):
        tensor = entry.variable.value
        if new_weights is not tensor:
            tensor.copy_(new_weights)


def _as(tensor, dtype):
    """`tensor` in `dtype`, without an operation where it is already."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
