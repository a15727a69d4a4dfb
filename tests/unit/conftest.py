"""Unit-test fixtures shared by the demo-asset and data-loading tests.

The tiny model + synthetic dataset are built once per session (about 2-4 s at these sizes) and
read by both test_demo.py and test_data.py; tests must not modify the folder.
"""

from __future__ import annotations

import pytest

from trainer.demo.assets import DemoAssets, build_demo_assets
from trainer.demo.dataset import TEMPLATES, DatasetSizes

#: Small splits: enough rows per question text for the balance checks, fast to build. All
#: templates (the demo's default is a subset), so every template's labels get checked.
TEST_SIZES = DatasetSizes(train=480, validation=120, sft=120, sft_eval=120, sft_easy=120)


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    return build_demo_assets(tmp_path_factory.mktemp("demo") / "assets", seed=0, sizes=TEST_SIZES, templates=TEMPLATES)
