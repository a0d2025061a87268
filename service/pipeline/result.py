"""What a pipeline run hands to the result writers (SR, SEG, SC, derived series, HL7).

These types are the seam between the pipeline host and everything downstream: a writer
never sees MONAI, torch or the bundle config, only a :class:`PipelineResult` next to the
:class:`~service.pipeline.volume.Volume` it was computed from. Arrays use the volume's
layout (``[slice, row, column]``) and its geometry, so a mask voxel lands on the source
image pixel it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
from numpy.typing import NDArray


class TaskKind(StrEnum):
    """What a bundle does, and so which result objects it leads to."""

    CLASSIFICATION = "classification"
    SEGMENTATION = "segmentation"
    RECONSTRUCTION = "reconstruction"


#: The probability at or above which an independent finding is present, unless its
#: label says otherwise (``radnode.labels[].threshold``).
PRESENT_THRESHOLD = 0.5


@dataclass(frozen=True)
class CodedConcept:
    """A code as DICOM and HL7 carry it: value, coding scheme designator, meaning.

    ``scheme`` is a DICOM coding scheme designator (``SCT`` for SNOMED CT, ``DCM``,
    ``99RADNODE`` for private codes); HL7 maps it to its own coding system names.
    """

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Label:
    """One output class of a bundle.

    For segmentation, ``value`` is the voxel value in the label map and ``finding`` the
    segmented property type (e.g. SCT 10200004 Liver) with ``category`` its property
    category (e.g. SCT 123037004 Anatomical structure). For classification, ``value`` is
    the output channel and ``finding`` the coded finding whose probability it gives.
    Background (value 0 of a segmentation) is not listed.
    """

    value: int
    name: str
    finding: CodedConcept | None = None
    category: CodedConcept | None = None
    #: Classification: the class is a normal finding ("no finding"): present, it is not
    #: abnormal (HL7 abnormal flag N), and absent it is.
    normal: bool = False
    #: Classification of independent findings: the probability at or above which the
    #: finding is present (None: :data:`PRESENT_THRESHOLD`).
    threshold: float | None = None


@dataclass(frozen=True)
class BundleIdentity:
    """Who made a result: the bundle's name and version, as every output must say."""

    name: str
    version: str
    kind: TaskKind
    description: str = ""
    authors: str = ""


@dataclass(frozen=True)
class StageTimings:
    """Seconds spent in each stage of one run, for logs, metrics and benchmarks."""

    load_s: float = 0.0
    preprocess_s: float = 0.0
    inference_s: float = 0.0
    postprocess_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.load_s + self.preprocess_s + self.inference_s + self.postprocess_s


@dataclass(frozen=True, eq=False)
class PipelineResult:
    """The output of one bundle on one series, in the source series' geometry.

    Exactly the field of its ``kind`` is set:

    * classification: ``probabilities`` (one per label, same order, in [0, 1]) and,
      where the pipeline can make one, ``heatmap`` (``[slice, row, column]``, in [0, 1]).
    * segmentation: ``label_map`` (``[slice, row, column]``, integer label values).
    * reconstruction: ``image`` (``[slice, row, column]``, float32 in modality units,
      e.g. HU).
    """

    bundle: BundleIdentity
    labels: tuple[Label, ...]
    device: str
    timings: StageTimings
    probabilities: tuple[float, ...] | None = None
    heatmap: NDArray[np.float32] | None = None
    label_map: NDArray[Any] | None = None
    image: NDArray[np.float32] | None = None
    #: Free facts for the operator's log and the model card (never patient data).
    notes: dict[str, Any] = field(default_factory=dict)
    #: Classification: the labels are mutually exclusive classes (a softmax): the most
    #: probable one is present and no other; else each finding is present on its own
    #: at its threshold.
    exclusive: bool = False

    @property
    def kind(self) -> TaskKind:
        return self.bundle.kind

    def findings_present(self) -> tuple[bool, ...]:
        """Per label of a classification, whether its finding is present, as the SR's
        qualitative evaluation, the HL7 result and the overlay all say it.

        Why not 0.5 for all: three exclusive classes at 34 / 33 / 33 % were each
        "absent", and a normal radiograph's "Normal" class was an abnormal result
        (acceptance pass).
        """
        probabilities = self.probabilities or ()
        if self.exclusive and len(probabilities) > 1:
            top = max(range(len(probabilities)), key=probabilities.__getitem__)
            return tuple(i == top for i in range(len(probabilities)))
        return tuple(
            p >= (label.threshold if label.threshold is not None else PRESENT_THRESHOLD)
            for label, p in zip(self.labels, probabilities, strict=True)
        )

    def findings_abnormal(self) -> tuple[bool, ...]:
        """Per label, whether the result is abnormal: a finding present, or a normal
        class absent (HL7 abnormal flag A; N otherwise)."""
        return tuple(
            present != label.normal
            for label, present in zip(self.labels, self.findings_present(), strict=True)
        )

    def voxel_counts(self) -> dict[int, int]:
        """Voxels per label value of a segmentation (labels with no voxel give 0).

        Counted once per result (the summary, the SEG and the SR each ask; three
        passes took 0.5 s of a 300-slice CT job): the label map is not changed after
        the pipeline made it."""
        if self.label_map is None:
            return {}
        counts = self.__dict__.get("_voxel_counts")
        if counts is None:
            # Slice by slice, one comparison per label: a slice stays in the cache, and
            # bincount would first widen the whole map to int64 (0.1 s -> 0.03 s for
            # four labels over 300 x 512 x 512).
            counts = {
                label.value: sum(
                    int(np.count_nonzero(plane == label.value)) for plane in self.label_map
                )
                for label in self.labels
            }
            object.__setattr__(self, "_voxel_counts", counts)
        return dict(counts)

    def segment_volumes_ml(self, spacing_mm: tuple[float, float, float]) -> dict[int, float]:
        """Volume of each segment in millilitres, for voxels of ``spacing_mm`` (x, y, z)."""
        voxel_ml = float(np.prod(spacing_mm)) / 1000.0
        return {value: count * voxel_ml for value, count in self.voxel_counts().items()}
