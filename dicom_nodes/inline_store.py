"""C-STORE requests served on the DUL thread, as their P-DATA-TF PDUs arrive.

Why: through pynetdicom, every received PDU is decoded into PDU and PDV objects,
queued for the state machine, passed up as a P-DATA primitive, its fragments appended
to the DIMSE message, the whole message queued for the association thread, a pydicom
command Dataset decoded, an event dispatched to the handler, and the response handed
back to the DUL thread to write. For a 512 KiB CT slice that was more Python (and
more thread hand-overs, ~10 context switches) than the fsync that makes it durable
(issue 11's notes have the profiles).

Here a :class:`InlineStoreReader` sees each P-DATA-TF PDU the DUL reads in data
transfer (:attr:`dicom_nodes.reactor.EventDrivenDUL.p_data_reader`) and, for a
C-STORE-RQ on an accepted context for that context's SOP class, collects the data set
fragments (no copy until the last one), calls the handler, and writes the C-STORE-RSP
itself, all on the DUL thread: one thread, no hand-over.

A C-ECHO-RQ on the Verification context is answered here too, when the reader is
given an ``echo`` handler: through pynetdicom it took the same hand-overs, and while
eight associations stored and a model ran, one in twenty echoes waited 25-40 ms for
them (issue 11 asks for 50 ms).

Everything else goes to pynetdicom exactly as before, PDV for PDV in order: any other
command, a C-STORE that announces no data set or names a context or SOP class it was
not negotiated for, a command set that does not decode, a message whose beginning the
reader did not see. Nothing of the state machine changes: P-DATA in data
transfer (Sta6) changes no state (PS3.8 9.2, DT-2), A-RELEASE and A-ABORT PDUs never
come here, and PDUs in any other state go to pynetdicom. A peer that breaks the
message structure inside a C-STORE the reader took (a command fragment amid the data
set, another context) gets what pynetdicom gives an invalid PDU: an A-ABORT (AA-8).
What pynetdicom no longer sees for the PDUs taken here: ``EVT_PDU_RECV``,
``EVT_DATA_RECV``, ``EVT_DIMSE_RECV`` and its C-STORE handler (radnode binds none of
them for C-STORE but the store itself).

DIMSE without an asynchronous operations window (radnode accepts none) means one
request at a time: the peer sends the next request only after this response, so
serving it on the reading thread holds nothing up.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dicom_nodes.c_store import (
    StoreRequest,
    c_echo_rq,
    c_store_rq,
    data_set_follows,
    decode_command,
    encode_c_echo_rsp,
    encode_c_store_rsp,
    fragment_size,
    write_command,
)
from dicom_nodes.reactor import MessageStructureError

#: A PDV item's length field (4 bytes) and, inside it, context ID and control header.
_PDV = struct.Struct(">IBB")
#: The P-DATA-TF PDU header: type, reserved, length (PS3.8 9.3.5).
_PDU_HEADER = struct.Struct(">BBI")
_P_DATA_TF = 0x04
_COMMAND_BIT, _LAST_BIT = 0x01, 0x02

#: Handler: the request, its presentation context, the encoded data set -> status.
StoreHandler = Callable[[StoreRequest, Any, bytes], int]
#: Handler of a C-ECHO: -> status.
EchoHandler = Callable[[], int]

_VERIFICATION = "1.2.840.10008.1.1"


@dataclass
class _Pending:
    """The C-STORE being received: its request and data set fragments so far."""

    context: Any
    request: StoreRequest
    fragments: list[memoryview]


class InlineStoreReader:
    """One association's P-DATA-TF reader. Called on the DUL thread only."""

    def __init__(self, assoc: Any, handler: StoreHandler, echo: EchoHandler | None = None) -> None:
        self._assoc = assoc
        self._handler = handler
        self._echo = echo
        self._contexts: dict[int, Any] | None = None
        # Command fragments so far: their PDV items as received (to pass on) and values.
        self._command_items: list[memoryview] = []
        self._command_value = bytearray()
        self._store: _Pending | None = None
        # Passing on a message to pynetdicom: until its data set's last fragment
        # ("data"), or for good ("all": a message the reader cannot follow;
        # pynetdicom handles the rest of the association).
        self._passing: str | None = None

    @property
    def instance_in_transit(self) -> str | None:
        """The SOP Instance UID of the C-STORE whose request came and whose data set has
        not all come, if one has: an association that ends now lost that instance in
        transit (the PACS's copy is the only one), whatever else it sent."""
        return None if self._store is None else self._store.request.sop_instance_uid

    def __call__(self, pdu: bytearray) -> list[bytes]:
        """Take one P-DATA-TF PDU (header included); return the PDUs for pynetdicom
        (the PDV items not taken, rewrapped in order). Raises
        :class:`MessageStructureError` for a broken C-STORE message."""
        if self._passing == "all":
            return [bytes(pdu)]
        passed: list[memoryview] = []
        view = memoryview(pdu)
        offset = _PDU_HEADER.size
        while offset < len(view):
            if offset + _PDV.size > len(view):
                return self._give_up(passed, view[offset:])
            length, context_id, control = _PDV.unpack_from(view, offset)
            end = offset + 4 + length
            if length < 2 or end > len(view):
                return self._give_up(passed, view[offset:])
            item = view[offset:end]
            self._take(item, context_id, control, view[offset + _PDV.size : end], passed)
            offset = end
        return [_wrap(passed)] if passed else []

    def _take(
        self,
        item: memoryview,
        context_id: int,
        control: int,
        value: memoryview,
        passed: list[memoryview],
    ) -> None:
        is_command, is_last = bool(control & _COMMAND_BIT), bool(control & _LAST_BIT)
        if self._passing is not None:
            passed.append(item)
            if self._passing == "data" and not is_command and is_last:
                self._passing = None
            return
        store = self._store
        if store is not None:
            if is_command or context_id != store.context.context_id:
                self._store = None
                raise MessageStructureError(
                    "a command fragment or another context inside a C-STORE data set"
                )
            store.fragments.append(value)
            if is_last:
                self._store = None
                self._serve(store)
            return
        if not is_command:  # a data set whose command the reader did not see
            passed.append(item)
            self._passing = None if is_last else "data"
            return
        self._command_items.append(item)
        self._command_value += value
        if not is_last:
            return
        items, command = self._command_items, bytes(self._command_value)
        self._command_items, self._command_value = [], bytearray()
        elements = decode_command(command)
        context = self._accepted(context_id)
        if self._echo is not None and elements is not None and context is not None:
            echo = c_echo_rq(elements)
            if echo is not None and echo.sop_class_uid == context.abstract_syntax == _VERIFICATION:
                response = encode_c_echo_rsp(echo.sop_class_uid, echo.message_id, self._echo())
                self._respond(context, response)
                return
        request = c_store_rq(elements) if elements is not None else None
        if request is None or context is None or context.abstract_syntax != request.sop_class_uid:
            passed.extend(items)  # pynetdicom's message, up to its end
            follows = data_set_follows(elements) if elements is not None else None
            if follows is None:
                self._passing = "all"  # where it ends is pynetdicom's to judge
            elif follows:
                self._passing = "data"
            return
        self._store = _Pending(context, request, [])

    def _give_up(self, passed: list[memoryview], rest: memoryview) -> list[bytes]:
        """A PDU whose PDV items do not add up: pynetdicom's decoder judges it (and
        every PDU after it)."""
        if self._store is not None or self._command_items:
            raise MessageStructureError("a P-DATA-TF PDU whose items do not add up")
        self._passing = "all"
        return [_wrap([*passed, rest])]

    def _accepted(self, context_id: int) -> Any:
        if self._contexts is None:  # fixed once the association is established
            self._contexts = {cx.context_id: cx for cx in self._assoc.accepted_contexts}
        return self._contexts.get(context_id)

    def _serve(self, store: _Pending) -> None:
        data_set = b"".join(store.fragments)
        store.fragments.clear()
        status = self._handler(store.request, store.context, data_set)
        request = store.request
        response = encode_c_store_rsp(
            request.sop_class_uid, request.sop_instance_uid, request.message_id, status
        )
        self._respond(store.context, response)

    def _respond(self, context: Any, response: bytes) -> None:
        """Write a response command set on the DUL thread, in the peer's PDU size."""
        size = fragment_size(self._assoc.dimse.maximum_pdu_size)
        try:
            with self._assoc.dul.direct_writes() as sock:
                write_command(sock, context.context_id, response, size)
        except RuntimeError:
            pass  # the association left data transfer: nobody is left to answer
        except OSError:
            pass  # reported to the state machine (Evt17), which ends the association


def _wrap(items: list[memoryview]) -> bytes:
    """PDV items as one P-DATA-TF PDU."""
    body = b"".join(items)
    return _PDU_HEADER.pack(_P_DATA_TF, 0, len(body)) + body
