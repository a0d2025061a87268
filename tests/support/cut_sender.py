"""A sending PACS that aborts its association in the middle of an instance.

The instances before the last are sent by pynetdicom's Storage SCU and acknowledged; of
the last, the C-STORE command and the first kilobyte of its data set go out, then the
association is aborted (A-ABORT): what a PACS, or the network under it, does when it
fails mid-transfer. The receiver never gets that instance whole.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import AE

from dicom_nodes import c_store, reactor
from dicom_nodes.c_store import encode_c_store_rq

CONTROL_DATA = 0  # a PDV of data set bytes, not the last fragment (PS3.8 E.2)


def pdv(context_id: int, control: int, value: bytes) -> bytes:
    """One presentation data value item."""
    return struct.pack(">IBB", len(value) + 2, context_id, control) + value


def pdu(*pdvs: bytes) -> bytearray:
    """A P-DATA-TF PDU of ``pdvs``."""
    body = b"".join(pdvs)
    return bytearray(struct.pack(">BBI", 0x04, 0, len(body)) + body)


def encoded(instance: pydicom.Dataset) -> bytes:
    """The data set as sent on an Explicit VR Little Endian context (no file meta)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, instance)
    return buffer.getvalue()


def begin_store_then_abort(assoc, instance: pydicom.Dataset, message_id: int = 1) -> None:
    """Send the C-STORE-RQ of ``instance`` and its first kilobyte on ``assoc`` (one
    accepted Explicit VR Little Endian context), then abort the association."""
    (context,) = assoc.accepted_contexts
    command = encode_c_store_rq(str(instance.SOPClassUID), str(instance.SOPInstanceUID), message_id)
    with reactor.reactor_paused(assoc), assoc.dul.direct_writes() as sock:
        c_store.write_command(sock, context.context_id, command, 16384)
        sock.sendall(pdu(pdv(context.context_id, CONTROL_DATA, encoded(instance)[:1000])))
    time.sleep(0.2)  # the fragment is read before the abort
    assoc.abort()


def send_then_cut(port: int, paths: Sequence[str], ae_title: str = "RADNODE") -> int:
    """Send every file of ``paths`` but the last, then begin the last and abort; return
    how many were acknowledged with Success."""
    instances = [pydicom.dcmread(p) for p in paths]
    reactor.install()  # the raw writes below go through radnode's association class
    ae = AE(ae_title="PACS")
    ae.add_requested_context(str(instances[0].SOPClassUID), "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established, "the receiver did not accept the association"
    acknowledged = sum(assoc.send_c_store(instance).Status == 0x0000 for instance in instances[:-1])
    begin_store_then_abort(assoc, instances[-1], message_id=len(instances))
    return acknowledged
