"""A Muon variable's update from the blocks of its parts.

Most Muon variables are read by one `MatrixView`: one part. A fused
projection whose matrices differ in shape is read by a `PartsView`, whose
parts each have their own blocks, scale `s`, variant state and Hyperball
radii (a tuple in `VariableState`, one per part); its update is each
part's, joined along the fused axis. For one part, the functions below
compute exactly what they would without parts.
"""

import dataclasses

from keras import ops

from keras_muon.naming import VariableSection
from keras_muon.update import rule


def variant_state_and_scale(optimizer, variable, route):
    """The variant state (`optimizer._add_variant_state`) and the scale `s`
    (`optimizer._block_scale`) of `variable`'s blocks on the Muon `route`:
    for several parts, a tuple of each part's, the variant's states named
    after the parts (`naming.VariableSection`)."""
    view = route.view
    if len(view.parts) == 1:
        return optimizer._add_variant_state(variable, view), optimizer._block_scale(view)
    names = [name for name, *_ in route.parts]
    if len(names) != len(view.parts):  # a rule's own Route: its parts by number
        names = [str(i) for i in range(len(view.parts))]
    sections = [
        VariableSection.of(variable, name, part.shape, view.axis)
        for name, part in zip(names, view.parts)
    ]
    states = tuple(optimizer._add_variant_state(s, p) for s, p in zip(sections, view.parts))
    scales = tuple(optimizer._block_scale(part) for part in view.parts)
    return (None if states[0] is None else states), scales


def entries(entry, blocks):
    """`(entry, its blocks)` per part of the entry's view, each entry with
    the part's state (its view, scale and variant state): `entry` itself
    for one part."""
    view = entry.state.route.view
    if len(view.parts) == 1:
        return [(entry, blocks[0])]
    state = entry.state
    part_entries = [
        entry._replace(
            state=dataclasses.replace(
                state,
                route=dataclasses.replace(state.route, view=part, parts=()),
                variant_state=None if state.variant_state is None else state.variant_state[i],
                scale=state.scale[i],
                radius=None,
            )
        )
        for i, part in enumerate(view.parts)
    ]
    return list(zip(part_entries, blocks))


def update(state, blocks):
    """`(U, s)`: the update `U` of a variable of `state` in its shape, from
    its orthogonalized `blocks` (one tensor per part), and the factor `s`
    left to apply (each part's own scale is applied in `U` when there are
    several)."""
    view = state.route.view
    if len(view.parts) == 1:
        return view.from_blocks(blocks[0]), state.scale
    scaled = [part.from_blocks(b) * s for part, b, s in zip(view.parts, blocks, state.scale)]
    return view.join(scaled), 1.0


def hyperball(state, weights, blocks, learning_rate):
    """`rule.hyperball` on each part of a variable of `state`: its new
    `weights` and radii."""
    view, radius = state.route.view, state.radius
    if len(view.parts) == 1:
        moved, radius = rule.hyperball(view.to_blocks(weights), blocks[0], radius, learning_rate)
        return view.from_blocks(moved), radius
    moved, radii, start = [], [], 0
    for part, section, b in zip(view.parts, view.split(weights), blocks):
        r = radius[start : start + part.num_blocks]
        start += part.num_blocks
        new_blocks, new_radius = rule.hyperball(part.to_blocks(section), b, r, learning_rate)
        moved.append(part.from_blocks(new_blocks))
        radii.append(new_radius)
    return view.join(moved), ops.concatenate(radii)
