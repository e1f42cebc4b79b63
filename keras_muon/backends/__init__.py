"""Speed and scale: the torch multi-tensor update and distribution."""
