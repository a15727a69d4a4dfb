"""Layer 0: the algorithm, the batch, config, modeling, weights layout, checkpoints, data and image
corruption. Nothing here imports Ray or any higher layer (tests/unit/test_layers.py checks it)."""
