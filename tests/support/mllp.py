"""A real MLLP listener for tests: python-hl7's asyncio server, in a thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import hl7 as python_hl7
import pytest
from hl7.mllp import start_hl7_server

from tests.conftest import free_port


class MllpListener:
    """python-hl7's MLLP server in a thread, answering each message with the next scripted
    acknowledgement code (the last repeats) and recording what it received."""

    def __init__(self, port: int, *answers: str, error_text: str = "") -> None:
        self.port = port
        self.answers = list(answers)
        self.error_text = error_text
        self.received: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def start(self) -> MllpListener:
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("MLLP listener did not start")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            start_hl7_server(self._serve, "127.0.0.1", self.port, encoding="utf-8")
        )
        self._ready.set()
        self._loop.run_forever()
        self._server.close()
        self._loop.run_until_complete(self._server.wait_closed())
        self._loop.close()

    async def _serve(self, reader, writer) -> None:
        try:
            while not reader.at_eof():
                block = await reader.readblock()
                text = block.decode("utf-8")
                self.received.append(text)
                control_id = python_hl7.parse(text)["MSH.F10"]
                code = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
                writer.writeblock(self._ack(code, control_id).encode("utf-8"))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass  # the client closed the connection after its ACK
        finally:
            writer.close()

    def _ack(self, code: str, control_id: str) -> str:
        segments = [
            f"MSH|^~\\&|RIS|RAD|RADNODE|HOSP|20250101120000||ACK^R01^ACK|A{len(self.received)}"
            "|P|2.5.1",
            f"MSA|{code}|{control_id}" + (f"|{self.error_text}" if code != "AA" else ""),
        ]
        if code != "AA":
            segments.append(f"ERR||||E||||{self.error_text}")
        return "\r".join(segments) + "\r"


@pytest.fixture
def listener_factory() -> Iterator[Callable[..., MllpListener]]:
    started: list[MllpListener] = []

    def make(*answers: str, port: int | None = None, error_text: str = "") -> MllpListener:
        listener = MllpListener(port or free_port(), *answers, error_text=error_text).start()
        started.append(listener)
        return listener

    yield make
    for listener in started:
        listener.stop()
