"""Pure logic, no I/O: weights, strategies, the experiment spec, the round state machine."""
