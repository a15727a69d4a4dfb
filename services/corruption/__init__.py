"""Image corruption: the service and its Ray pool; the pure masking math is :mod:`trainer.core.corruption`.

``services.corruption.patch_blackening`` is the documented public path of the masking function.
"""

from trainer.core.corruption import patch_blackening

__all__ = ["patch_blackening"]
