"""The pipeline host: a DICOM series becomes a volume, a volume meets a MONAI bundle.

``volume`` turns a series into an array with its patient geometry (or refuses it with a
reason an operator can act on); ``bundle`` and ``inference`` run the model on it.
"""
