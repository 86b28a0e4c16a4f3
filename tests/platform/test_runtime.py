"""Ray Data jobs give their actors back when they fail, even while the error is kept."""

from __future__ import annotations

import traceback

import pytest

from tests.helpers.ray_state import alive_actors, all_cpus_free
from wsss.platform.runtime import job_batches


def job(ray, fail: bool):
    class FailsOnThree:  # defined here so the workers get it by value, not from this test module
        def __call__(self, batch):
            if fail and 3 in batch["id"]:
                raise ValueError("row 3 is bad")
            return batch

    # Two actors beside the read tasks on 2 CPUs; each actor holds a share of a CPU while it lives
    return ray.data.range(6, override_num_blocks=6).map_batches(
        FailsOnThree, batch_size=1, num_cpus=0.5, compute=ray.data.ActorPoolStrategy(size=2))


def test_a_failed_job_frees_its_actors_while_its_error_is_kept(ray_local):
    ray = ray_local
    assert all_cpus_free(ray, 60), "an earlier test left work running"
    with pytest.raises(Exception, match="row 3 is bad") as kept:
        for _ in job_batches(job(ray, fail=True), batch_size=1):
            pass
    # Ray Data alone can keep a failed job's actor alive (holding its CPU) while `kept` lives
    assert all_cpus_free(ray, 60), f"CPUs still held by {alive_actors()}"
    raised_in = [frame.filename for frame in traceback.extract_tb(kept.value.__traceback__)]
    assert any("/ray/data/" in name for name in raised_in), \
        "the error lost Ray Data's frames: the CPUs were not freed while the whole error was kept"
    rows = [int(x) for batch in job_batches(job(ray, fail=False), batch_size=2) for x in batch["id"]]
    assert sorted(rows) == list(range(6))
