"""Who made a result, said the same way in every DICOM object radnode writes.

The one place for algorithm identification (ARCHITECTURE.md, "Write"): the SEG, the SR,
the Secondary Capture images and the derived series all take their identity from a
:class:`Provenance`, so they cannot disagree about it.

* **Contributing Equipment Sequence** (SOP Common): one item per object naming the
  algorithm as IHE AI Results (AIR) asks: Purpose of Reference (Newcode1, 99IHE,
  "Processing Algorithm"), Manufacturer ``radnode``, Manufacturer's Model Name = bundle
  name, Software Versions = bundle version, a Device UID that changes with every model
  version, and the banner as Contribution Description.
* **Algorithm Identification Sequence** (SEG segments) and TID 4019 Algorithm
  Identification (SR measurement groups).
* **Device observer** (TID 1004) of the SR observation context.
* **Deterministic UIDs**: :func:`result_uid` derives every result UID from (source
  series, the source instances, pipeline, version, kind, index) with uuid5 and
  highdicom's ``UID.from_uuid``, so running a job again (or resending it) writes the
  same SOP Instance UIDs and the PACS keeps one copy. A result made from other
  instances of the series (it grew after its first result was sent) has other content,
  so it gets UIDs of its own: a PACS keeps the first object it got under a UID (Orthanc
  does by default), and one UID must never name two contents. Only the Tracking UIDs,
  which name a finding across reports, stay the same.
* **Series descriptions** and the **banner** ("<bundle> <version> — AI result, not for
  diagnostic use on its own").

Objects carrying the banner are written with Specific Character Set ``ISO_IR 192``
(UTF-8): the em dash is not in ISO 8859-1.
"""

from __future__ import annotations

import hashlib
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from service.pipeline.result import BundleIdentity, CodedConcept, Label

#: Manufacturer of every object radnode creates.
MANUFACTURER = "radnode"
#: Coding scheme of radnode's own codes (a private one: "99" + name, PS3.16 8.2; HL7
#: table 0396 local "99zzz"): an uncoded label's finding, a pipeline in HL7 OBR-4.
RADNODE_CODING_SCHEME = "99RADNODE"
#: Every object radnode writes is encoded in UTF-8 (the banner's em dash needs it).
CHARACTER_SET = "ISO_IR 192"

#: IHE AIR: Purpose of Reference of the algorithm's Contributing Equipment item.
PROCESSING_ALGORITHM = hd.sr.CodedConcept("Newcode1", "99IHE", "Processing Algorithm")
#: DCM 121322: why a result references its source images.
SOURCE_IMAGE_PURPOSE = hd.sr.CodedConcept(
    "121322", "DCM", "Source image for image processing operation"
)

#: Namespace of radnode's uuid5 UIDs (itself a uuid5 of a fixed name: stable forever).
RADNODE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://radnode.invalid/dicom-uids")

#: Series Numbers of result series: high, so they sort after the modality's series.
#: A "not analyzed" report takes the block's ninth number: under the SR's, the series'
#: later report showed next to it under the same number (acceptance pass).
SERIES_NUMBERS: dict[str, int] = {
    "SR": 9901, "SEG": 9902, "SC": 9903, "DERIVED": 9904, "NOT_ANALYZED": 9909
}  # fmt: skip
#: Pipelines get blocks of ten series numbers below :data:`SERIES_NUMBERS`' (9001-9899).
_SERIES_BLOCKS = 90
#: Where a revised result's series numbers sit in its pipeline's block (x1-x4 -> x5-x8).
_REVISION_OFFSET = 4

#: What each result kind is called in its Series Description.
_SERIES_LABELS: dict[str, str] = {
    "SR": "AI report",
    "NOT_ANALYZED": "AI report",
    "SEG": "AI segmentation",
    "SC": "AI overlay",
    # A derived series looks like any other in a viewer's series list, which shows only
    # this: it says it is not for diagnosis there (acceptance pass: the denoised CT read
    # as a diagnostic CT; the warning was in Image Comments only). Kept first, so a
    # revision's shortening does not cut it.
    "DERIVED": "AI derived, not for diagnosis:",
}

_LO_MAX = 64  # Long String, e.g. Series Description, Manufacturer's Model Name


def _uuid5_uid(*parts: str) -> str:
    """``2.25.<decimal uuid5>`` of the parts, joined by NUL (no part can contain one)."""
    name = "\x00".join(parts)
    return str(hd.UID.from_uuid(str(uuid.uuid5(RADNODE_NAMESPACE, name))))


def result_uid(
    source_series_uid: str,
    pipeline: str,
    version: str,
    kind: str,
    index: int = 0,
    *,
    sources: str = "",
) -> str:
    """A result UID that is the same every time the same job is written.

    ``kind`` names what the UID is for (``"sr"``, ``"seg"``, ``"sc"``, ``"derived"``,
    ``"series:sc"``, ``"tracking"`` ...), ``index`` tells apart several of one kind (SC
    image number, derived slice, segment), ``sources`` is :func:`sources_digest` of the
    source instances (empty for UIDs that do not depend on them). A new model version
    gives new UIDs, so its results sit next to the old version's instead of replacing
    them.
    """
    parts = ("result", source_series_uid, pipeline, version, kind, str(index))
    return _uuid5_uid(*parts, *((sources,) if sources else ()))


def sources_digest(sop_instance_uids: Sequence[str]) -> str:
    """A short digest of a result's source instances (order does not matter)."""
    joined = "\0".join(sorted(set(sop_instance_uids)))
    return hashlib.sha256(joined.encode()).hexdigest()[:32]


def device_uid(name: str, version: str) -> str:
    """Device UID of one bundle version: changes with every model version."""
    return _uuid5_uid("device", name, version)


def clip_lo(text: str) -> str:
    """Text shortened to fit a Long String (64 characters)."""
    return text if len(text) <= _LO_MAX else text[: _LO_MAX - 1] + "…"


def label_finding(label: Label) -> CodedConcept:
    """The label's coded finding, or radnode's private code naming it (``label-<value>``,
    ``99RADNODE``, the label's name its meaning) for a bundle that gives none: the SR and
    the HL7 result name the finding with the same code (the ORU sent a text without an
    identifier, which a RIS matching observations by identifier could not follow)."""
    if label.finding is not None:
        return label.finding
    return CodedConcept(f"label-{label.value}", RADNODE_CODING_SCHEME, label.name)


def label_code(label: Label) -> hd.sr.CodedConcept:
    """:func:`label_finding` as highdicom's concept, its meaning fitted to a Long String:
    the SR's finding, the SEG's segmented property type."""
    concept = label_finding(label)
    return hd.sr.CodedConcept(concept.value, concept.scheme, clip_lo(concept.meaning))


def code(concept: CodedConcept) -> hd.sr.CodedConcept:
    """A bundle's :class:`CodedConcept` as highdicom's."""
    return hd.sr.CodedConcept(concept.value, concept.scheme, concept.meaning)


@dataclass(frozen=True)
class Provenance:
    """The identity of one bundle version and the source series it ran on."""

    bundle: BundleIdentity
    source_series_uid: str
    #: :func:`sources_digest` of the source instances ("" when they are not known).
    sources: str = ""
    #: For a result that replaces an earlier one of the same series (it grew): how many
    #: source images (slices or frames) it was made from; said in every series
    #: description.
    revised_from: int = 0
    #: Made while the study lacked an instance lost in transit: every series description
    #: says "preliminary", and the SR's Preliminary Flag does.
    preliminary: bool = False

    @classmethod
    def of(
        cls,
        bundle: BundleIdentity,
        source_series_uid: str,
        source_instance_uids: Sequence[str] = (),
        *,
        revised_from: int = 0,
        preliminary: bool = False,
    ) -> Provenance:
        digest = sources_digest(source_instance_uids) if source_instance_uids else ""
        return cls(
            bundle=bundle,
            source_series_uid=source_series_uid,
            sources=digest,
            revised_from=revised_from,
            preliminary=preliminary,
        )

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def model_name(self) -> str:
        """Manufacturer's Model Name: the bundle name (LO)."""
        return clip_lo(self.bundle.name)

    @property
    def software_versions(self) -> str:
        return clip_lo(self.bundle.version)

    @property
    def device_uid(self) -> str:
        return device_uid(self.bundle.name, self.bundle.version)

    @property
    def banner(self) -> str:
        """The sentence every object carries (Contribution Description, Image Comments)."""
        identity = f"{self.bundle.name} {self.bundle.version}"
        return f"{identity} — AI result, not for diagnostic use on its own"

    def uid(self, kind: str, index: int = 0) -> str:
        """:func:`result_uid` for this bundle version and these source instances; a
        ``"tracking"`` UID names the finding, whatever instances it was found on. A
        preliminary result's UIDs are its own: the final result made later from the
        same instances (the lost one belonged to another series) is another object."""
        if kind == "tracking":
            return result_uid(self.source_series_uid, self.name, self.version, kind, index)
        if self.preliminary:
            kind = f"preliminary:{kind}"
        return result_uid(
            self.source_series_uid, self.name, self.version, kind, index, sources=self.sources
        )

    def series_number(self, kind: str) -> int:
        """The Series Number of ``kind`` (SR, SEG, SC, DERIVED) for this pipeline: in a
        block of ten of its own, chosen by a stable hash of the pipeline name, so the
        results of two pipelines in one study do not share numbers (the acceptance run
        saw two "9901" report series). Results still sort after the source's series;
        two pipelines share a block one time in ninety. A revised result takes the
        upper half of the block (x5-x8): next to the one it replaces, it showed the
        same numbers and only a clipped description told them apart (acceptance pass)."""
        block = zlib.crc32(self.name.encode()) % _SERIES_BLOCKS
        revision = _REVISION_OFFSET if self.revised_from else 0
        return SERIES_NUMBERS[kind] - 900 + 10 * block + revision

    def series_description(self, kind: str, detail: str = "") -> str:
        """e.g. ``AI segmentation ct_abdomen_segmentation 0.1.0`` (kind: SR, SEG, SC, DERIVED)."""
        # A revised result sits next to the one it replaces (a Storage SCU cannot remove
        # that): the second acceptance pass could not tell them apart. A preliminary one
        # must say so where a radiologist looks first. The label and the marks are
        # kept whole, the version too where the bundle name can be shortened to make
        # room (cutting the end lost the version, or showed 0.1.0 as "0.1": acceptance
        # pass, review); else the version goes (Software Versions has it).
        label = _SERIES_LABELS[kind]
        marks = [f"revised {self.revised_from} img"] * bool(self.revised_from)
        marks += ["preliminary"] * self.preliminary
        for version, least in ((self.version, 12), ("", 4)):  # least of the name shown
            tail = " ".join(p for p in (version, detail, *marks) if p)
            room = _LO_MAX - len(label) - len(tail) - 2  # for the bundle name
            if len(self.name) <= room:
                return f"{label} {self.name} {tail}".strip()
            if room >= least:
                return f"{label} {self.name[: room - 1]}… {tail}"
        return clip_lo(f"{label} {self.name} {self.version} {detail}".strip())

    # -- the forms highdicom wants ---------------------------------------------------

    def contributing_equipment(self) -> hd.ContributingEquipment:
        """The algorithm's Contributing Equipment Sequence item (IHE AIR).

        highdicom only accepts DCM purposes of reference, so the item is built as
        (DCM 109103 Processing Equipment) and its purpose then replaced by the
        (Newcode1, 99IHE, "Processing Algorithm") code that IHE AIR asks for.
        """
        item = hd.ContributingEquipment(
            manufacturer=MANUFACTURER,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.model_name,
            software_versions=self.software_versions,
            contribution_description=self.banner,
        )
        item.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
        item.DeviceUID = self.device_uid
        return item

    def algorithm_identification(self) -> hd.AlgorithmIdentificationSequence:
        """For SEG segment descriptions (family: DCM 123110 Artificial Intelligence)."""
        return hd.AlgorithmIdentificationSequence(
            name=clip_lo(self.name),
            family=codes.cid7162.ArtificialIntelligence,
            version=self.software_versions,
            source=MANUFACTURER,
        )

    def sr_algorithm(self) -> hd.sr.AlgorithmIdentification:
        """TID 4019 for SR measurement groups."""
        return hd.sr.AlgorithmIdentification(
            name=clip_lo(self.name), version=self.software_versions, manufacturer=MANUFACTURER
        )

    def device_observer(self) -> hd.sr.ObserverContext:
        """TID 1002 observer context naming the algorithm as a device (TID 1004)."""
        return hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=self.device_uid,
                name=clip_lo(self.name),
                manufacturer_name=MANUFACTURER,
                model_name=f"{clip_lo(self.name)} {self.software_versions}"[:_LO_MAX],
            ),
        )

    def common_kwargs(self, kind: str) -> dict[str, object]:
        """Keyword arguments every highdicom SOP class constructor gets from us."""
        return {
            "series_description": self.series_description(kind),
            "manufacturer_model_name": self.model_name,
            "software_versions": self.software_versions,
            "specific_character_set": CHARACTER_SET,
            "contributing_equipment": [self.contributing_equipment()],
        }


def procedure_code(modality: str, body_part: str) -> hd.sr.CodedConcept:
    """TID 1500 Procedure Reported from the source study's modality and body part."""
    modality, body_part = modality.upper(), body_part.upper()
    if modality == "CT":
        if "ABDOMEN" in body_part:
            return hd.sr.CodedConcept("169070004", "SCT", "CT of abdomen")
        if "CHEST" in body_part or "THORAX" in body_part:
            return hd.sr.CodedConcept("169069000", "SCT", "CT of chest")
        return hd.sr.CodedConcept("77477000", "SCT", "Computerized axial tomography")
    if modality in ("DX", "CR"):
        if "CHEST" in body_part or "THORAX" in body_part or not body_part:
            return hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
        return hd.sr.CodedConcept("363680008", "SCT", "Radiographic imaging procedure")
    if modality == "MR":
        return hd.sr.CodedConcept("113091000", "SCT", "Magnetic resonance imaging")
    return hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")


def patient_orientation(
    header: Dataset, frame_orientation: Sequence[float] | None = None
) -> tuple[str, str]:
    """Patient Orientation (row, column direction letters) of an image.

    From ImageOrientationPatient where present (LPS: +x L, +y P, +z H), or
    ``frame_orientation`` (an Enhanced image's frame keeps it in its functional groups),
    else the source's own Patient Orientation, else ("L", "F"), the usual PA chest
    display.
    """
    iop = header.get("ImageOrientationPatient") or frame_orientation
    if iop is not None and len(iop) == 6:
        vectors = np.asarray([float(v) for v in iop]).reshape(2, 3)
        return (_direction_letters(vectors[0]), _direction_letters(vectors[1]))
    existing = header.get("PatientOrientation")
    if existing is not None and len(existing) == 2 and all(existing):
        return (str(existing[0]), str(existing[1]))
    return ("L", "F")


def _direction_letters(vector: np.ndarray) -> str:
    letters = (("R", "L"), ("A", "P"), ("F", "H"))
    order = np.argsort(-np.abs(vector))
    out = ""
    for axis in order:
        if abs(vector[axis]) < 1e-3 or len(out) == 3:
            break
        out += letters[axis][1 if vector[axis] > 0 else 0]
    return out or "L"
