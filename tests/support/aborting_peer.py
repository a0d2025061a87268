"""A pynetdicom Storage SCP, in its own process, that A-ABORTs the association when
request ``--abort-at`` arrives (every association alike).

In its own process because the race it shows needs two interpreters: run in the test's
own process, the GIL ordered the peer's abort and the SCU's next look at its state
machine the same way every time, and the SCU's mislabelling (an aborted association
reported as accepted, 8 of 20 runs) never showed.

    python -m tests.support.aborting_peer PORT --abort-at 3
"""

from __future__ import annotations

import argparse

from pynetdicom import AE, StoragePresentationContexts, evt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--abort-at", type=int, required=True)
    args = parser.parse_args()
    seen: dict[int, int] = {}

    def on_store(event: evt.Event) -> int:
        n = seen[id(event.assoc)] = seen.get(id(event.assoc), 0) + 1
        if n == args.abort_at:
            event.assoc.abort()
        return 0x0000

    ae = AE(ae_title="ABORTER")
    ae.supported_contexts = StoragePresentationContexts
    ae.start_server(("127.0.0.1", args.port), evt_handlers=[(evt.EVT_C_STORE, on_store)])


if __name__ == "__main__":
    main()
