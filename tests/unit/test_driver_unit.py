"""Driver pieces that need no cluster: the prompt sampler, the image checks before a rollout, dynamic sampling
and the start-up of the pools (the pools and the grader as test doubles)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from trainer.core.data import BadPrompt, PromptExample, prompt_images
from trainer.core.sampler import PromptSampler


def example(tmp_path, name: str, size=(56, 56)) -> PromptExample:
    path = tmp_path / name
    if size is not None:
        Image.fromarray(np.zeros((size[1], size[0], 3), dtype=np.uint8)).save(path)
    return PromptExample(row_id=7, messages=[], image_paths=[path], answer="red")


def test_prompt_images_checks_headers_before_decoding(tmp_path):
    assert prompt_images(example(tmp_path, "ok.png"), max_raw_pixels=56 * 56)[0].size == (56, 56)
    with pytest.raises(BadPrompt, match=r"row 7: .*big.png has 100x60 pixels > data.max_raw_pixels=5000"):
        prompt_images(example(tmp_path, "big.png", size=(100, 60)), max_raw_pixels=5000)
    with pytest.raises(BadPrompt, match="row 7: .*missing.png: FileNotFoundError"):
        prompt_images(example(tmp_path, "missing.png", size=None), max_raw_pixels=5000)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(BadPrompt, match="row 7: .*junk.png: UnidentifiedImageError"):
        prompt_images(PromptExample(row_id=7, messages=[], image_paths=[tmp_path / "junk.png"], answer="x"), 5000)


def test_sampler_is_a_seeded_permutation_per_epoch():
    a, b = PromptSampler(5, seed=3), PromptSampler(5, seed=3)
    first = a.take(7)
    assert first == b.take(7)
    assert sorted(i for i, e in first[:5]) == list(range(5)) and {e for _, e in first[:5]} == {0}
    assert [e for _, e in first[5:]] == [1, 1]
    assert [i for i, _ in PromptSampler(4, seed=0, shuffle=False).take(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="no usable rows"):
        PromptSampler(0, seed=0)


def test_sampler_state_round_trip_continues_the_same_order():
    straight = PromptSampler(7, seed=11)
    expected = straight.take(20)  # crosses two epoch boundaries
    first = PromptSampler(7, seed=11)
    head = first.take(9)
    resumed = PromptSampler(7, seed=11)
    resumed.load_state_dict(first.state_dict())
    assert head + resumed.take(11) == expected
    with pytest.raises(ValueError, match="would not continue the same data order"):
        PromptSampler(7, seed=12).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="over 7 rows"):
        PromptSampler(8, seed=11).load_state_dict(first.state_dict())


def _checkpoint(folder, step: int, state: bool = True):
    import json

    folder.mkdir(parents=True)
    (folder / "papo_checkpoint.json").write_text("{}")
    if state:
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    return folder


def test_latest_checkpoint_picks_the_newest_complete_one(tmp_path):
    from trainer.rundir import latest_checkpoint

    run = tmp_path / "run"
    _checkpoint(run / "checkpoints" / "step_000010", 10)
    newest = _checkpoint(run / "checkpoints" / "step_000020", 20)
    (run / "checkpoints" / ".step_000030.tmp-abcd1234").mkdir()  # a crashed save: no marker
    _checkpoint(run / "checkpoints" / "step_000025", 25, state=False)  # not written by papo train
    assert latest_checkpoint(run) == newest
    assert latest_checkpoint(newest) == newest
    with pytest.raises(FileNotFoundError, match="without trainer_state.json"):
        latest_checkpoint(run / "checkpoints" / "step_000025")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint under"):
        latest_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        latest_checkpoint(tmp_path / "missing")


def test_check_model_paths_accepts_model_folders_and_hub_ids(tmp_path):
    from trainer.core.config import resolve_config
    from trainer.rundir import check_model_paths

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    (tmp_path / "empty").mkdir()

    def check(path: str) -> None:
        check_model_paths(resolve_config([], [f"model.path={path}"]))

    check(str(tmp_path / "model"))
    check("demo://model")  # built by the demo fixture after the check
    check("Qwen/Qwen2.5-VL-3B-Instruct")  # a hub id: loaded (or refused offline) by from_pretrained later
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        check(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        check(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        check("./relative/typo")
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        check(f"{tmp_path}/missing/model")
    (tmp_path / "model" / "weights.bin").write_text("")
    with pytest.raises(FileNotFoundError, match="is a file, not a model folder"):
        check(str(tmp_path / "model" / "weights.bin"))


def test_check_model_paths_treats_org_name_with_a_local_first_folder_as_a_typo(tmp_path, monkeypatch):
    from trainer.core.config import resolve_config
    from trainer.rundir import check_model_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(FileNotFoundError, match="models/qwen: no such model folder"):
        check_model_paths(resolve_config([], ["model.path=models/qwen"]))


def test_a_new_run_moves_an_earlier_run_of_the_same_name_aside(tmp_path):
    from trainer.rundir import archive_earlier_run, run_dir_of

    run = tmp_path / "demo"
    assert archive_earlier_run(run) is None  # nothing there
    _checkpoint(run / "checkpoints" / "step_000250", 250)
    moved = archive_earlier_run(run)
    assert moved is not None and moved.name.startswith("demo.prev-") and not run.exists()
    assert (moved / "checkpoints" / "step_000250" / "trainer_state.json").is_file()  # nothing deleted
    _checkpoint(run / "checkpoints" / "step_000010", 10)
    assert archive_earlier_run(run) != moved  # a second earlier run gets its own name
    assert run_dir_of(run / "checkpoints" / "step_000010") == run and run_dir_of(run / "best") == run


def test_a_live_run_folder_is_locked_and_a_dead_runs_lock_is_gone(tmp_path):
    import subprocess
    import sys

    from trainer.rundir import RunDirInUse, RunDirLock

    run_dir = tmp_path / "runs" / "demo"
    lock = RunDirLock(run_dir)
    with pytest.raises(RunDirInUse, match=rf"runs/demo is in use by a running papo train \(pid {os.getpid()}"):
        RunDirLock(run_dir)
    RunDirLock(tmp_path / "runs" / "other").release()  # another name is free
    lock.release()
    RunDirLock(run_dir).release()  # free again once released
    # A driver that dies without releasing (kill -9) leaves no stale lock: the kernel drops it.
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from pathlib import Path; "
        "from trainer.driver import RunDirLock; lock = RunDirLock(Path(sys.argv[1])); print('held', flush=True); "
        "time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir), os.getcwd()], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUse, match=f"pid {proc.pid}"):
            RunDirLock(run_dir)
    finally:
        proc.kill()
        proc.wait()
    RunDirLock(run_dir).release()


def test_papo_train_on_a_busy_run_folder_exits_2_before_any_work(tmp_path, capsys):
    from trainer.core.config import named_config, resolve_config
    from trainer.driver import train
    from trainer.rundir import RunDirLock

    cfg = resolve_config(
        [named_config("demo")], [f"trainer.output_dir={tmp_path}", "trainer.name=busy", "model.path=/nonexistent/model"]
    )
    lock = RunDirLock(tmp_path / "busy")
    try:
        assert train(cfg) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert "is in use by a running papo train" in err and "trainer.name" in err
    assert not (tmp_path / "busy").exists()  # nothing was created or moved


# ---- DAPO dynamic sampling (Trainer._generate) with a rollout pool and a grader as test doubles ----------------


class _Rollout:
    """Serves each request n times; prompt ``row`` is all right (row % 3 == 0), all wrong (1) or half right (2)."""

    def __init__(self):
        self.calls: list[int] = []

    def generate(self, requests, spec):
        from services.rollout.types import RolloutResult
        from trainer.core.batch import RolloutBatch

        self.calls.append(len(requests))
        rows = [(g, row) for g, (row, _epoch) in enumerate(requests) for _ in range(spec.n)]
        text = [
            ("right" if row % 3 == 0 or (row % 3 == 2 and k % 2 == 0) else "wrong") for k, (_g, row) in enumerate(rows)
        ]
        batch = RolloutBatch.from_sequences(
            [[1, 2]] * len(rows),
            [[3]] * len(rows),
            [[-0.5]] * len(rows),
            group_ids=[g for g, _ in rows],
            row_ids=[row for _, row in rows],
            weight_version=0,
            image_refs=[[]] * len(rows),
            answers=["right"] * len(rows),
            response_text=text,
        )
        return RolloutResult(batch=batch, errors={}, weight_version=0, num_requests=len(requests))


class _Grader:
    def score(self, items):
        return [{"overall": float(t == a), "accuracy": float(t == a)} for t, a in items]


def _dapo_trainer(overrides: list[str]):
    from types import SimpleNamespace

    from trainer.core.config import resolve_config
    from trainer.driver import Trainer

    cfg = resolve_config(
        overrides=[
            "algo.name=dapo",
            "rollout.batch_size=4",
            "rollout.n=4",
            "learner.mini_batch_size=16",
            "learner.micro_batch_size=4",
            *overrides,
        ]
    )
    trainer = Trainer.__new__(Trainer)  # no cluster: only the pieces _generate uses
    trainer.cfg, trainer.version = cfg, 0
    trainer.sampler = PromptSampler(30, seed=0, shuffle=False)
    trainer.services = SimpleNamespace(rollout=_Rollout(), reward=_Grader(), corruption=None)
    trainer._requests = lambda picks: (picks, None)
    return trainer


@pytest.mark.parametrize("gen_batch, calls", [(None, [4, 4, 4]), (12, [12])])
def test_dynamic_sampling_keeps_only_mixed_groups_in_rounds_of_the_generation_batch(gen_batch, calls):
    trainer = _dapo_trainer([] if gen_batch is None else [f"algo.dynamic_sampling_gen_batch_size={gen_batch}"])
    batch, stats = trainer._generate(step=1, timings={})
    # Prompts 0..11 in order: only rows 2, 5, 8, 11 have mixed answers; one round of 12 finds them all.
    assert trainer.services.rollout.calls == calls
    assert sorted(set(batch.row_ids.tolist())) == [2, 5, 8, 11]
    assert [g.tolist() for g in batch.groups()] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert stats["generated_groups"] == 12 and stats["kept_groups"] == 4
    assert trainer.sampler.take(1) == [(12, 0)]  # every generated prompt was drawn from the sampler once


def test_dynamic_sampling_in_chunks_smaller_than_the_batch_counts_tries_in_chunks():
    trainer = _dapo_trainer(["algo.dynamic_sampling_gen_batch_size=2"])
    batch, stats = trainer._generate(step=1, timings={})
    # Chunks of 2 prompts: rows 2, 5, 8, 11 are the mixed ones; the sixth chunk (10, 11) fills the batch.
    assert trainer.services.rollout.calls == [2] * 6
    assert sorted(set(batch.row_ids.tolist())) == [2, 5, 8, 11]
    assert stats["generated_groups"] == 12 and stats["kept_groups"] == 4 and stats["generated_per_kept"] == 3.0
    trainer = _dapo_trainer(["algo.dynamic_sampling_gen_batch_size=2", "algo.dynamic_sampling_max_tries=5"])
    with pytest.raises(RuntimeError, match=r"kept 3 of 4 groups after algo.dynamic_sampling_max_tries=5 tries"):
        trainer._generate(step=1, timings={})


def test_the_fill_fallback_draws_on_every_chunks_uninformative_groups():
    # Chunks of 1 prompt: each try has at most one flat group, fewer than the shortfall of 3.
    trainer = _dapo_trainer(
        [
            "algo.dynamic_sampling_gen_batch_size=1",
            "algo.dynamic_sampling_max_tries=4",
            "algo.dynamic_sampling_exhausted=fill",
        ]
    )
    batch, stats = trainer._generate(step=1, timings={})
    assert stats["kept_groups"] == 4 and stats["filled_groups"] == 3 and stats["generated_groups"] == 4
    rows = [int(batch.row_ids[g[0]]) for g in batch.groups()]
    assert rows == [2, 3, 1, 0]  # the mixed group, then the flat ones, latest try first


def test_dynamic_sampling_that_finds_no_mixed_group_stops_with_a_clear_error():
    trainer = _dapo_trainer(["algo.dynamic_sampling_max_tries=2"])
    trainer.sampler = PromptSampler(2, seed=0, shuffle=False)  # rows 0 and 1: all right, all wrong
    with pytest.raises(
        RuntimeError,
        match=r"dynamic sampling kept 0 of 4 groups after "
        r"algo.dynamic_sampling_max_tries=2 tries",
    ):
        trainer._generate(step=1, timings={})


def test_exhausted_dynamic_sampling_can_fill_the_batch_with_uninformative_groups():
    trainer = _dapo_trainer(["algo.dynamic_sampling_max_tries=2", "algo.dynamic_sampling_exhausted=fill"])
    trainer.sampler = PromptSampler(3, seed=0, shuffle=False)  # rows 0, 1, 2: only row 2 has mixed answers
    batch, stats = trainer._generate(step=1, timings={})
    assert stats["kept_groups"] == 4 and stats["filled_groups"] == 2 and stats["generated_groups"] == 8
    groups = batch.groups()
    assert len(groups) == 4 and len(batch) == 16
    rows = [int(batch.row_ids[g[0]]) for g in groups]
    accuracy = [batch.accuracy[g].tolist() for g in groups]
    # The two mixed groups first (one per try), then the last try's uninformative ones (all alike).
    assert rows[:2] == [2, 2] and all(r != 2 for r in rows[2:])
    assert all(len(set(a)) == 1 for a in accuracy[2:]) and all(len(set(a)) == 2 for a in accuracy[:2])


# ---- start-up (Trainer._start_services) with the pools as test doubles -----------------------------------------


def _startup_doubles(monkeypatch, fail: str | None):
    """Each pool double waits at one barrier for all the others: start-up passes only if they start side by side."""
    import threading

    from trainer import driver

    names = ["rollout", "learner", "corruption", "perception", "reference"]
    barrier = threading.Barrier(len(names), timeout=10)
    started: list[str] = []
    stopped: list[str] = []

    class Pool:
        def __init__(self, name: str):
            self.name = name
            started.append(name)
            barrier.wait()
            if name == fail:
                raise RuntimeError(f"{name} could not load the model")

        def shutdown(self):
            stopped.append(self.name)

    class Client:
        def __init__(self, url, token=None):
            pass

        def health(self):
            return {"status": "ok"}

        def close(self):
            pass

    monkeypatch.setattr(driver, "RewardClient", Client)
    monkeypatch.setattr(driver.RolloutPool, "from_config", classmethod(lambda cls, *a, **k: Pool("rollout")))
    monkeypatch.setattr(driver, "LearnerGroup", lambda *a, **k: Pool("learner"))
    monkeypatch.setattr(driver, "CorruptionPool", lambda *a, **k: Pool("corruption"))
    monkeypatch.setattr(driver, "LogProbPool", lambda *a, role, **k: Pool(role))
    return started, stopped


def _startup_trainer():
    from trainer.core.config import resolve_config
    from trainer.driver import Trainer

    trainer = Trainer.__new__(Trainer)
    # image_resize=processor: the pixel limits come from the config, not from a model folder
    # (demo://model is not built here).
    trainer.cfg = resolve_config(
        overrides=[
            "algo.name=papo",
            "algo.beta=0.04",
            "reward.url=http://127.0.0.1:9",
            "model.image_resize=processor",
        ]
    )
    trainer.startup = {}
    return trainer


def test_services_start_side_by_side(monkeypatch):
    started, stopped = _startup_doubles(monkeypatch, fail=None)
    trainer = _startup_trainer()
    services = trainer._start_services()
    # The summary's start-up split: the reward server, then the engines and pools side by side.
    assert set(trainer.startup) == {"reward_server_s", "engines_s"} and min(trainer.startup.values()) >= 0
    assert sorted(started) == ["corruption", "learner", "perception", "reference", "rollout"]
    assert [getattr(services, n).name for n in ("rollout", "learner", "corruption", "perception", "reference")] == [
        "rollout",
        "learner",
        "corruption",
        "perception",
        "reference",
    ]
    assert stopped == []


def test_a_pool_that_fails_to_start_leaves_no_other_pool_running(monkeypatch):
    started, stopped = _startup_doubles(monkeypatch, fail="learner")
    with pytest.raises(RuntimeError, match="learner could not load the model"):
        _startup_trainer()._start_services()
    assert sorted(stopped) == ["corruption", "perception", "reference", "rollout"]


def test_the_start_up_line_names_each_part():
    from trainer.driver import startup_line

    line = startup_line({"assets_s": 31.96, "data_s": 0.4, "ray_s": 4.0, "reward_server_s": 8.0, "engines_s": 20.04})
    assert line == "demo assets 32.0 s, data 0.4 s, Ray 4.0 s, reward server 8.0 s, engines and pools 20.0 s"
