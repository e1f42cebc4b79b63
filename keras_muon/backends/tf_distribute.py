"""Muon under a `tf.distribute` strategy.

Under `MirroredStrategy` each replica holds a copy of every variable and
of the optimizer's state. This module sums the gradients over the
replicas, as Keras does, then runs the phases of `Muon._update` once per
replica, in that replica's update context, where reading or assigning a
mirrored variable (optimizer state included) reaches that replica's copy.
With `split_newton_schulz`, each replica orthogonalizes its share of the
blocks: through an all-gather where the strategy runs without
`merge_call` (XLA-compiled steps on GPUs), else in two passes over the
replicas. Other strategies place each variable on a device of its own, and
Keras updates them one at a time, where they live. This module uses the
optimizer's phases only (`Muon` documents them), never its state.
"""

import keras
from keras import ops

from keras_muon.backends.distributed import is_mirrored
from keras_muon.backends.distributed import share


def update(optimizer, grads, variables, learning_rate, update_each_variable):
    """`optimizer._update(grads, variables, learning_rate)` under the
    strategy in scope; `update_each_variable` is Keras's update of the
    variables one at a time (`update_step`), for strategies other than
    MirroredStrategy."""
    import tensorflow as tf

    if not is_mirrored(tf.distribute.get_strategy()):
        update_each_variable(grads, variables, learning_rate)
        return
    # The backend variables: a raw `tf.Variable` is one already.
    variables = [v.value if isinstance(v, keras.Variable) else v for v in variables]
    pairs = optimizer._all_reduce_sum_gradients(list(zip(grads, variables)))
    grads = [g for g, _ in pairs]

    def update_replicas(strategy, grads, learning_rate):
        if not tf.distribute.in_cross_replica_context():
            # The strategy runs without merge_call, so this already runs
            # once per replica, where assigning a mirrored variable writes
            # that replica's copy and Newton–Schulz all-gathers.
            optimizer._update(grads, variables, learning_rate)
        elif optimizer.split_newton_schulz:
            _update_in_two_passes(optimizer, strategy, grads, variables, learning_rate)
        else:
            strategy.extended.update_non_slot(
                strategy.extended.non_slot_devices(variables),
                lambda grads, lr: optimizer._update(grads, variables, lr),
                args=(grads, learning_rate),
                group=False,
            )

    tf.__internal__.distribute.interim.maybe_merge_call(
        update_replicas, optimizer._distribution_strategy, grads, learning_rate
    )


def _update_in_two_passes(optimizer, strategy, grads, variables, learning_rate):
    """`optimizer._update` replica by replica, with the Newton–Schulz work
    split among them. The first pass runs the phases up to
    orthogonalization, of its share of the blocks only; the second reads
    every replica's share (TF copies them between devices) and finishes
    the update."""
    # The replica whose update context this is (not exported by TF).
    from tensorflow.python.distribute.distribute_lib import get_update_replica_id

    devices = strategy.extended.non_slot_devices(variables)
    replicas = len(devices)
    passes = {}

    def first_pass(grads, learning_rate):
        replica = get_update_replica_id()
        adamw, muon = optimizer._entries_by_route(grads, variables)
        optimizer._adamw_update(adamw, learning_rate)
        batches = optimizer._momentum_update(muon)
        # In an update context Newton–Schulz is not split: this is the split.
        shares = [
            optimizer._orthogonalize(batch._replace(blocks=share(batch.blocks, replica, replicas)))
            for batch in batches
        ]
        passes[replica] = batches, shares, learning_rate

    def second_pass():
        replica = get_update_replica_id()
        batches, _, learning_rate = passes[replica]
        orthogonal = [
            ops.concatenate([passes[other][1][i] for other in range(replicas)])[
                : batch.blocks.shape[0]
            ]
            for i, batch in enumerate(batches)
        ]
        optimizer._muon_update(batches, orthogonal, learning_rate)
        optimizer._clip_attention()

    extended = strategy.extended
    extended.update_non_slot(devices, first_pass, args=(grads, learning_rate), group=False)
    extended.update_non_slot(devices, second_pass, group=False)
