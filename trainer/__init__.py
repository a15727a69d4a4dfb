"""papo's trainer: the core (no Ray), weight transports, the learner, the demo fixture, and on top
the driver, evaluation and CLI (docs/design.md, "Layout")."""
