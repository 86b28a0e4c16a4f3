"""What the tests' shared local Ray holds: to catch work a test leaves behind."""

from __future__ import annotations

import time


def all_cpus_free(ray, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources()["CPU"]:
            return True
        time.sleep(0.2)
    return False


def alive_actors() -> list[str]:
    from ray.util.state import list_actors

    return [actor.class_name for actor in list_actors(filters=[("state", "=", "ALIVE")])]
