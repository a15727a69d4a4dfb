"""Forward-only log-prob pools: the masked-image (perception) and reference passes, a plain scorer under
the one actor group."""
