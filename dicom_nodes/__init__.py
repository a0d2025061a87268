"""The DICOM network edge of radnode.

Knows DICOM networking (associations, presentation contexts, DIMSE statuses) and
nothing about models or the study index. It never imports :mod:`service`: what to do
with a received instance is decided by a :class:`~dicom_nodes.scp.Receiver`.
"""
