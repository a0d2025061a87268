"""Result writers: turn a pipeline result into standard objects (DICOM, HL7)."""
