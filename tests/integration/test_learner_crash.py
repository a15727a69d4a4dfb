"""A learner rank dies while a two-rank group writes a checkpoint: the group fails fast and loses nothing.

The crash is real: rank 1's process is frozen (SIGSTOP) once the save's temporary folder exists,
so the save is certainly unfinished, then killed (SIGKILL), as an OOM kill or a lost node would.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from tests.helpers_model import MAX_PIXELS, MIN_PIXELS, algo_cfg, learner_cfg, model_and_ray_batch
from trainer.core.checkpoint import CHECKPOINT_MARKER, prune_checkpoints
from trainer.learner.group import LearnerGroup

TIMEOUT = 300.0


@pytest.mark.slow
def test_a_rank_killed_during_save_fails_the_save_and_keeps_the_previous_checkpoint(ray_cluster, tmp_path):
    from transformers import AutoModelForImageTextToText

    path, batch = model_and_ray_batch(ray_cluster, tmp_path / "model")
    ckpts = tmp_path / "checkpoints"
    g = LearnerGroup(
        str(path),
        learner_cfg(num_ranks=2, num_cpus=0.5, zero_stage=2, mini_batch_size=4, micro_batch_size=2),
        algo_cfg(gamma=0.0),
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        get_timeout_s=TIMEOUT,
    )
    try:
        batch.old_logp = g.compute_logprobs(batch)
        g.train_step(batch)
        good = g.save_checkpoint(ckpts / "step_1", keep_last=2)
        before = {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()}
        g.train_step(batch)

        victim = g.pids[1]
        frozen = threading.Event()

        def freeze_rank1_mid_save():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if any(p.name.startswith(".step_2.tmp-") for p in ckpts.iterdir()):
                    os.kill(victim, signal.SIGSTOP)
                    frozen.set()
                    return
                time.sleep(0.002)

        watcher = threading.Thread(target=freeze_rank1_mid_save, daemon=True)
        watcher.start()
        started = time.monotonic()
        errors: list[BaseException] = []

        def run_save():
            try:
                g.save_checkpoint(ckpts / "step_2", keep_last=2)
            except BaseException as e:  # noqa: BLE001 - the test inspects it
                errors.append(e)

        save = threading.Thread(target=run_save, daemon=True)
        save.start()
        assert frozen.wait(120), "the save never created its temporary folder"
        time.sleep(1.0)  # rank 0 is now waiting on the frozen rank
        assert not (ckpts / "step_2").exists()
        os.kill(victim, signal.SIGKILL)
        save.join(TIMEOUT)
        assert not save.is_alive(), "the save hung after a rank died"
        assert errors, "a save with a dead rank reported success"
        elapsed = time.monotonic() - started
    finally:
        g.shutdown()

    assert elapsed < 120, f"the failed save took {elapsed:.0f} s to report"
    assert isinstance(errors[0], RuntimeError) and "died while saving checkpoint" in str(errors[0])
    assert str(ckpts / "step_2") in str(errors[0]) and "--resume" in str(errors[0])
    # Nothing under the new checkpoint's name; the previous checkpoint is byte for byte intact and loads.
    assert not (ckpts / "step_2").exists()
    after = {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()}
    assert after == before
    assert json.loads((good / CHECKPOINT_MARKER).read_text())["world_size"] == 2
    AutoModelForImageTextToText.from_pretrained(str(good))
    # The crashed save's temporary folder is swept by the next prune (the next successful save does one).
    leftovers = [p for p in ckpts.iterdir() if ".tmp-" in p.name]
    assert leftovers, "expected the crashed save's temporary folder"
    prune_checkpoints(ckpts, keep_last=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_1"]
