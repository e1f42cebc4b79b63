"""Which variables are matrices, how each is read as `(d_in, d_out)`
blocks, and which are output heads."""
