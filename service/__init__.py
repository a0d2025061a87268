"""radnode's service: everything that runs besides the DICOM network edge.

The module names follow the flow of one study (see ARCHITECTURE.md):
``ingest`` -> ``spool`` + ``index`` -> ``completion`` -> routing, queue, pipeline,
writers, delivery. ``node`` is the only module that wires the others together.
"""

__version__ = "0.1.0"
