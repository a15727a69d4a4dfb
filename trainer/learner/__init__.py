"""The learner: DeepSpeed set-up, the plain one-rank :class:`~trainer.learner.learner.Learner`, and its
Ray group."""
