"""The rollout pool: generation engines (vLLM, transformers), the plain worker with versioned weight
updates, the vLLM worker extension and the Ray pool over the one actor group."""
