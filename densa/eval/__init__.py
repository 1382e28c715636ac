"""`densa eval` and `densa audit`: the Intelligence Density x Token Value report card (docs/eval.md)."""
