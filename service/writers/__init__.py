"""Result writers: turn a pipeline result into standard objects (DICOM, HL7)."""

from service.writers import iod_lookup

iod_lookup.install()
