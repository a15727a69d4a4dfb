"""papo's services: the Ray pools (rollout, log-prob, corruption), their one actor group, and the
reward server."""
