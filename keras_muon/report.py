"""What the optimizer tells of itself: the routing table, and its summary
as text (with QK-Clip's layers)."""

import math

from keras_muon.naming import variable_path


def format_table(rows):
    """`rows` (tuples of strings, the header first) as lines of columns
    two spaces apart, each as wide as its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def routing_summary(name, rows):
    """The text of `Muon.summary()` from `Muon.routing_table()`'s rows."""
    header = ("Variable", "Shape", "Route", "Matrix × blocks", "Scale", "Reason")
    lines = [header]
    for row in rows:
        matrix = scale = ""
        if row["route"] == "muon":
            matrix = matrices(row)
            scales = row["scale"] if isinstance(row["scale"], tuple) else (row["scale"],)
            scale = ", ".join(dict.fromkeys(f"{s:.3g}" for s in scales))
        lines.append((row["path"], str(row["shape"]), row["route"], matrix, scale, row["reason"]))
    text = format_table(lines)
    rule = "─" * len(max(text, key=len))
    counts = {}
    for row in rows:
        count, size = counts.get(row["route"], (0, 0))
        counts[row["route"]] = (count + 1, size + math.prod(row["shape"]))
    totals = ", ".join(
        f"{route}: {count} variables, {size:,} parameters"
        for route, (count, size) in sorted(counts.items(), reverse=True)
    )
    return "\n".join([f'Optimizer "{name}" routing', rule, text[0], rule, *text[1:], rule, totals])


def matrices(row):
    """The "Matrix × blocks" cell: `d_in×d_out ×blocks`, and for a fused
    kernel its parts, those of one shape together (`q|k|v 16×16 ×3`)."""
    parts = row["parts"] or ((None, row["matrix_shape"], row["num_blocks"]),)
    cells = {}
    for name, shape, blocks in parts:
        names, count = cells.get(tuple(shape), ([], 0))
        cells[tuple(shape)] = (names + [name] if name else names, count + blocks)
    return ", ".join(
        " ".join(
            filter(None, ["|".join(names), f"{d_in}×{d_out}", f"×{count}" if count > 1 else ""])
        )
        for (d_in, d_out), (names, count) in cells.items()
    )


def routing_row(path, shape, state):
    """One row of `Muon.routing_table()`: the variable at `path`, of
    `shape`, and its `VariableState`."""
    view = state.route.view
    return {
        "path": path,
        "shape": tuple(shape),
        "route": state.route.name,
        "reason": state.route.reason,
        "matrix_shape": _matrix_shape(state.route),
        "num_blocks": view.num_blocks if view else None,
        "scale": state.scale,
        "parts": state.route.parts,
    }


def _matrix_shape(route):
    """`(d_in, d_out)` of the blocks of `route`; of its largest part where
    its parts differ; None for AdamW."""
    if route.view is None:
        return None
    if not route.parts:
        return route.view.matrix_shape
    return max((shape for _, shape, _ in route.parts), key=lambda s: s[0] * s[1])


def routing_table(optimizer):
    """`optimizer.routing_table()`: a `routing_row` per trained variable,
    QK-Clip's logit probes left out (they are not the model's)."""
    if not optimizer.built:
        raise ValueError(
            "The optimizer is not built yet, so nothing is routed. It is built by "
            "`model.fit`, or call `optimizer.build(model.trainable_variables)`."
        )
    qk_clip = optimizer._qk_clip
    return [
        routing_row(variable_path(variable), variable.shape, state)
        for variable, state in zip(optimizer._trainable_variables, optimizer._states)
        if not (qk_clip and qk_clip.is_probe(variable))
    ]


def summary(optimizer):
    """The text `optimizer.summary()` prints."""
    text = routing_summary(optimizer.name, routing_table(optimizer))
    if optimizer._qk_clip is not None:
        text += "\n\n" + optimizer._qk_clip.summary()
    return text
