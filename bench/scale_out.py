"""Studies per hour with one and with two `radnode worker` processes behind Redis.

    .venv/bin/python bench/scale_out.py [--studies 6] [--slices 80] [--rows 256]

For each worker count: a real redis-server, one edge (`radnode serve`,
``queue.local_workers = 0``) and N workers sharing its data dir, the shipped CT
segmentation bundle routed for CT. ``--studies`` phantom CT studies are sent at once
(DCMTK storescu, one after the other); the clock runs from the first send to the last
``job.recorded``. Prints studies per hour and which worker ran how many jobs.

On this 2-core machine two workers share the same two cores, so the figure shows the
overhead of the queue and what parallel reading/writing buys, not GPU scaling: run it
on the target machines for sizing (docs/deployment.md). Prints; never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from service.testing import make_ct_phantom, write_ct_phantom  # noqa: E402
from tests.conftest import RadnodeProcess, free_port, storescu  # noqa: E402
from tests.support.scale_out import Worker, running_redis  # noqa: E402


def run(workers: int, studies: list[list[Path]], work: Path) -> None:
    routes = [{"name": "ct", "pipeline": "ct_abdomen_segmentation", "match": {"Modality": "CT"}}]
    with running_redis(work) as url:
        shared = {
            "RADNODE_QUEUE__URL": url,
            "RADNODE_MODELS__DIR": str(REPO / "models"),
            "RADNODE_ROUTES": json.dumps(routes),
            "RADNODE_STUDY__COMPLETION_TIMEOUT_S": "2",
        }
        edge = RadnodeProcess(
            data_dir=work / f"data-{workers}",
            port=free_port(),
            http_port=free_port(),
            extra_env={**shared, "RADNODE_QUEUE__LOCAL_WORKERS": "0"},
        ).start()
        env = {**os.environ, **shared, "RADNODE_NODE__DATA_DIR": str(edge.data_dir)}
        pool = [Worker(env) for _ in range(workers)]
        try:
            deadline = time.monotonic() + 120
            while sum(len(w.events("worker.started")) for w in pool) < workers:
                if time.monotonic() > deadline:
                    print("workers did not start")
                    return
                time.sleep(0.1)
            started = time.monotonic()
            for series in studies:
                storescu(edge.port, series)
            edge.wait_for_event("job.recorded", count=len(studies), timeout=1800)
            seconds = time.monotonic() - started
        finally:
            for w in pool:
                w.stop()
            edge.stop()
    per_worker = [len(w.events("job.finished")) for w in pool]
    states = [e["state"] for e in edge.events("job.recorded")]
    print(
        f"{workers} worker(s): {len(studies)} studies in {seconds:.1f} s = "
        f"{len(studies) * 3600 / seconds:.0f} studies/hour; jobs per worker {per_worker}; "
        f"states {sorted(set(states))}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--slices", type=int, default=80)
    parser.add_argument("--rows", type=int, default=256)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="radnode-scale-"))
    print(f"work folder: {work}; {args.studies} CT studies of {args.slices} x {args.rows}²")
    studies = [
        write_ct_phantom(
            work / f"ct{k}",
            make_ct_phantom(seed=10600 + k, rows=args.rows, slices=args.slices, slice_spacing=3.0),
        )
        for k in range(args.studies)
    ]
    for workers in (1, 2):
        run(workers, studies, work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
