"""Task mapping: results in input order, one failing task never takes down the others."""

from __future__ import annotations

import pytest

from pipelines.build.cluster import map_tasks


def _task(x: int) -> dict:
    if x == 2:
        raise ValueError("bad case 2")
    return {"ok": True, "x": x}


def test_serial_map_keeps_order_and_captures_failures():
    seen = []
    out = map_tasks(_task, [(i,) for i in range(4)], client=None, progress=False,
                    on_result=seen.append)
    assert [r.get("x") for r in out] == [0, 1, None, 3]
    assert out[2] == {"ok": False, "exception": "ValueError: bad case 2"}
    assert len(seen) == 4


@pytest.mark.timeout(120)
def test_local_cluster_map_equals_serial():
    from pipelines.build.cluster import dask_client

    with dask_client(2) as client:
        out = map_tasks(_task, [(i,) for i in range(5)], client=client, retries=0, progress=False)
    assert out == map_tasks(_task, [(i,) for i in range(5)], client=None, progress=False)
