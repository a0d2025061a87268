"""Run the fuzz properties of tests/test_fuzz.py (and the header-mutation property of
tests/test_bad_series.py) for much longer, and print every distinct escape found.

    python -m bench.fuzz                       # 20000 examples per property (hypothesis)
    python -m bench.fuzz --examples 100000 --only parse_header
    python -m bench.fuzz --atheris -- -max_total_time=600   # coverage-guided, if installed

An "escape" is an exception other than the ones a property allows (RadnodeError from
parse_header, SeriesRefused from the volume planner). Escapes are grouped by exception
type and the innermost radnode source line, with the smallest input seen for each, so
one bug prints once. Nothing here asserts: it reports.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests import test_bad_series, test_fuzz  # noqa: E402


@dataclass
class Escapes:
    """Distinct escapes: (exception type, innermost radnode frame) -> count, example."""

    found: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    runs: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def run(self, check: Callable[..., str | None], *args: Any) -> None:
        self.runs += 1
        try:
            outcome = check(*args)
        except Exception as exc:  # the point: record whatever escapes
            key = (type(exc).__name__, _where(exc))
            entry = self.found.setdefault(key, [0, args, f"{type(exc).__name__}: {exc}"])
            entry[0] += 1
            if len(repr(args)) < len(repr(entry[1])):
                entry[1] = args
            return
        label = outcome or "ok"
        self.outcomes[label] = self.outcomes.get(label, 0) + 1

    def report(self, name: str, seconds: float) -> None:
        print(f"\n== {name}: {self.runs} inputs in {seconds:.0f} s")
        top = sorted(self.outcomes.items(), key=lambda item: -item[1])[:8]
        print("   outcomes: " + ", ".join(f"{k} {v}" for k, v in top))
        if not self.found:
            print("   no escapes")
        for (kind, where), (count, example, message) in sorted(self.found.items()):
            text = repr(example)
            print(f"   ESCAPE {kind} at {where} ({count}x): {message[:200]}")
            print(f"          smallest input: {text[:300]}{'...' if len(text) > 300 else ''}")


def _where(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/service/" in f.filename]
    if not frames:
        frames = traceback.extract_tb(exc.__traceback__)[-1:]
    frame = frames[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})"


def _hypothesis(
    examples: int, strategy: st.SearchStrategy[Any], body: Callable[[Any], None]
) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def run(case: Any) -> None:
        body(case)

    run()


def _check_series_mutations(changes: Any) -> str:
    test_bad_series.check_load_series(changes)
    return "volume-or-refused"


PROPERTIES: dict[str, tuple[st.SearchStrategy[Any], Callable[[Escapes, Any], None]]] = {
    "parse_header": (
        test_fuzz.damaged(),
        lambda esc, case: esc.run(test_fuzz.check_parse_header, *case),
    ),
    "parse_header_random": (
        st.tuples(st.binary(max_size=2048), st.sampled_from(test_fuzz.TRANSFER_SYNTAXES)),
        lambda esc, case: esc.run(test_fuzz.check_parse_header, *case),
    ),
    "planner_bytes": (
        test_fuzz.damaged_series(),
        lambda esc, files: esc.run(test_fuzz.check_plan, files),
    ),
    "load_series_headers": (
        test_bad_series.mutations(),
        lambda esc, changes: esc.run(_check_series_mutations, changes),
    ),
}


def run_atheris(argv: list[str]) -> int:
    """Coverage-guided fuzzing of parse_header with atheris (libFuzzer)."""
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        print("atheris is not installed (pip install atheris); use the hypothesis mode")
        return 2
    seeds = list(test_fuzz.ENCODINGS.items())

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        transfer_syntax, _ = seeds[fdp.ConsumeIntInRange(0, len(seeds) - 1)]
        payload = fdp.ConsumeBytes(fdp.remaining_bytes())
        if fdp.ConsumeBool() if payload else False:
            payload = test_fuzz.ENCODINGS[transfer_syntax][: len(payload)]
        test_fuzz.check_parse_header(payload, transfer_syntax)  # raises on escape

    atheris.Setup([sys.argv[0], *argv], one_input)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=20000, help="per property")
    parser.add_argument("--only", choices=sorted(PROPERTIES), action="append")
    parser.add_argument("--atheris", action="store_true", help="libFuzzer mode (parse_header)")
    parser.add_argument("rest", nargs="*", help="arguments for libFuzzer after --")
    args = parser.parse_args(argv)
    if args.atheris:
        return run_atheris(args.rest)
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    total = 0
    for name in args.only or list(PROPERTIES):
        strategy, body = PROPERTIES[name]
        escapes = Escapes()
        started = time.monotonic()
        _hypothesis(args.examples, strategy, lambda case, e=escapes, b=body: b(e, case))
        escapes.report(name, time.monotonic() - started)
        total += len(escapes.found)
    print(f"\n{total} distinct escape(s) in all")
    return 1 if total else 0


if __name__ == "__main__":
    raise SystemExit(main())
