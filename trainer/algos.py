"""The public algorithm API at its documented path (docs/design.md, "Public Python API").

Acceptance checks and users import ``trainer.algos``; the math itself lives in the core,
:mod:`trainer.core.algos`, which this module only names.
"""

from trainer.core.algos import group_advantages, kl_penalty, papo_loss

__all__ = ["group_advantages", "kl_penalty", "papo_loss"]
