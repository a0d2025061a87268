"""The ORU^R01 writer: strict HL7 v2.5.1, fields from the DICOM header, escaping."""

from __future__ import annotations

import copy
import string
import warnings

import hl7 as python_hl7
import numpy as np
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from service.delivery import Outbox
from service.hl7 import Hl7DestinationSettings, Hl7Error
from service.pipeline.result import (
    BundleIdentity,
    CodedConcept,
    Label,
    PipelineResult,
    StageTimings,
    TaskKind,
)
from service.testing import make_ct_series
from service.writers.oru import algorithm_code, build_oru, control_id_for, enqueue_oru, escape
from service.writers.provenance import Provenance

DELIMITERS = "^ & \\ ~ |"
SPACING = (0.5, 0.5, 2.0)  # 0.5 mm³ per voxel


def destination(**overrides: object) -> Hl7DestinationSettings:
    values: dict[str, object] = {
        "name": "ris",
        "host": "127.0.0.1",
        "port": 2575,
        "sending_facility": "HOSP",
        "receiving_application": "RIS",
        "receiving_facility": "RAD",
    }
    values.update(overrides)
    return Hl7DestinationSettings(**values)  # type: ignore[arg-type]


def ct_header(**kwargs: str) -> Dataset:
    return make_ct_series(slices=2, rows=16, columns=16, **kwargs)[0]  # type: ignore[arg-type]


def classification() -> PipelineResult:
    return PipelineResult(
        bundle=BundleIdentity("chest_pneumothorax", "1.2.0", TaskKind.CLASSIFICATION),
        labels=(
            Label(0, "Pneumothorax", CodedConcept("36118008", "SCT", "Pneumothorax")),
            Label(1, "Uncoded finding"),
        ),
        device="cpu",
        timings=StageTimings(),
        probabilities=(0.8734, 0.02),
    )


def segmentation() -> PipelineResult:
    label_map = np.zeros((4, 10, 10), dtype=np.uint8)
    label_map[:, :5, :] = 1  # 200 voxels
    label_map[0, 5, :3] = 2  # 3 voxels
    return PipelineResult(
        bundle=BundleIdentity("ct_abdomen_segmentation", "0.3.0", TaskKind.SEGMENTATION),
        labels=(
            Label(1, "Liver", CodedConcept("10200004", "SCT", "Liver")),
            Label(2, "Spleen", CodedConcept("78961009", "SCT", "Spleen")),
            Label(3, "Left kidney", CodedConcept("64033007", "SCT", "Left kidney")),
        ),
        device="cpu",
        timings=StageTimings(),
        label_map=label_map,
    )


def reconstruction() -> PipelineResult:
    return PipelineResult(
        bundle=BundleIdentity("ct_denoise", "0.1.0", TaskKind.RECONSTRUCTION),
        labels=(),
        device="cpu",
        timings=StageTimings(),
        image=np.zeros((2, 4, 4), dtype=np.float32),
    )


def strict(er7: str):
    message = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT)
    assert message.validate()
    return message


def value_at(parsed: python_hl7.Message, key: str) -> str:
    """Unescaped value at ``key``; '' where the field has fewer components."""
    try:
        return str(parsed[key])
    except IndexError:
        return ""


def obx_rows(er7: str) -> list[dict[str, str]]:
    """Each OBX as its (unescaped) fields of interest, via python-hl7."""
    parsed = python_hl7.parse(er7)
    rows = []
    for i in range(1, len(parsed.segments("OBX")) + 1):
        rows.append(
            {
                key: value_at(parsed, f"OBX{i}.F{field}" + suffix)
                for key, field, suffix in (
                    ("type", 2, ""),
                    ("code", 3, ".R1.C1"),
                    ("system", 3, ".R1.C3"),
                    ("sub", 4, ""),
                    ("value", 5, ".R1.C1"),
                    ("value_text", 5, ".R1.C2"),
                    ("value_system", 5, ".R1.C3"),
                    ("units", 6, ".R1.C1"),
                    ("units_system", 6, ".R1.C3"),
                    ("status", 11, ""),
                    ("flag", 8, ""),
                )
            }
        )
    return rows


@pytest.mark.parametrize("make_result", [classification, segmentation, reconstruction])
def test_every_message_parses_under_strict_validation(make_result) -> None:
    message = build_oru(make_result(), ct_header(accession_number="A1"), SPACING, destination())
    parsed = strict(message.er7)
    assert parsed.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert parsed.msh.msh_12.to_er7() == "2.5.1"
    assert parsed.msh.msh_10.to_er7() == message.control_id
    assert message.to_bytes().startswith(b"MSH|^~\\&|RADNODE|HOSP|RIS|RAD|")
    assert message.er7.endswith("\r")  # the last segment ends like every other one
    assert "\r\r" not in message.er7


def test_msh_processing_id_and_character_set_come_from_the_destination() -> None:
    message = build_oru(classification(), ct_header(), SPACING, destination(processing_id="T"))
    parsed = python_hl7.parse(message.er7)
    assert parsed["MSH.F11"] == "T"
    assert parsed["MSH.F18"] == "UNICODE UTF-8"


def test_pid_fields_come_from_the_dicom_header() -> None:
    ds = ct_header(patient_name="Doe^Jane^Q^Dr^III", patient_id="MRN-42")
    ds.IssuerOfPatientID = "HOSPITAL_A"
    ds.IssuerOfPatientIDQualifiersSequence = Sequence([Dataset()])
    qualifiers = ds.IssuerOfPatientIDQualifiersSequence[0]
    qualifiers.UniversalEntityID = "1.2.3.4.5"
    qualifiers.UniversalEntityIDType = "ISO"
    qualifiers.IdentifierTypeCode = "MR"
    ds.PatientBirthDate = "19651231"
    ds.PatientSex = "F"
    parsed = python_hl7.parse(build_oru(classification(), ds, SPACING, destination()).er7)
    assert parsed["PID.F3.R1.C1"] == "MRN-42"
    assert parsed["PID.F3.R1.C4.S1"] == "HOSPITAL_A"
    assert parsed["PID.F3.R1.C4.S2"] == "1.2.3.4.5"
    assert parsed["PID.F3.R1.C4.S3"] == "ISO"
    assert parsed["PID.F3.R1.C5"] == "MR"
    # DICOM family^given^middle^prefix^suffix -> XPN family^given^middle^suffix^prefix
    assert [parsed[f"PID.F5.R1.C{i}"] for i in range(1, 6)] == ["Doe", "Jane", "Q", "III", "Dr"]
    assert parsed["PID.F7"] == "19651231"
    assert parsed["PID.F8"] == "F"


def test_unknown_sex_becomes_u_and_a_malformed_birth_date_is_left_out() -> None:
    ds = ct_header()
    ds.PatientSex = "X"
    with warnings.catch_warnings():  # pydicom warns about the invalid DA we want
        warnings.simplefilter("ignore")
        ds.PatientBirthDate = "1965"
    parsed = python_hl7.parse(build_oru(classification(), ds, SPACING, destination()).er7)
    assert parsed["PID.F8"] == "U"
    assert parsed["PID.F7"] == ""


def test_patient_name_with_every_delimiter_round_trips() -> None:
    ds = ct_header(patient_name="O'Brien^Anne-Marie^&Co~X|Y\\Z")
    # pydicom would split a PN on the backslash (VM); keep it one value on purpose
    ds.PatientName = "O'Brien^Anne-Marie^&Co~X|Y\\Z"
    message = build_oru(classification(), ds, SPACING, destination())
    strict(message.er7)
    pid = next(s for s in message.er7.split("\r") if s.startswith("PID|"))
    assert "\\T\\Co\\R\\X\\F\\Y" in pid  # escaped on the wire, not structure
    parsed = python_hl7.parse(message.er7)
    assert parsed["PID.F5.R1.C1"] == "O'Brien"
    assert parsed["PID.F5.R1.C2"] == "Anne-Marie"
    assert parsed["PID.F5.R1.C3"] in ("&Co~X|Y\\Z", "&Co~X|Y")  # VM split keeps the first


def test_study_and_series_descriptions_with_delimiters_round_trip() -> None:
    ds = ct_header(series_description=f"Axial {DELIMITERS} 1.25")
    ds.StudyDescription = f"CT {DELIMITERS} abdomen"
    ds.SeriesDescription = f"Axial {DELIMITERS} 1.25"
    message = build_oru(segmentation(), ds, SPACING, destination(universal_service_id="procedure"))
    strict(message.er7)
    parsed = python_hl7.parse(message.er7)
    assert parsed["OBR.F4.R1.C2"] == f"CT {DELIMITERS} abdomen"
    summary = " ".join(row["value"] for row in obx_rows(message.er7) if row["type"] == "TX")
    assert f'"Axial {DELIMITERS} 1.25"' in summary


def test_text_that_looks_like_an_escape_sequence_is_escaped_too() -> None:
    ds = ct_header()
    ds.StudyDescription = "a\\F\\b \\E\\ c\\"
    message = build_oru(
        classification(), ds, SPACING, destination(universal_service_id="procedure")
    )
    strict(message.er7)
    assert python_hl7.parse(message.er7)["OBR.F4.R1.C2"] == "a\\F\\b \\E\\ c\\"


@settings(max_examples=40, deadline=None)
@given(
    family=st.text(alphabet=string.ascii_letters + " '-&~|", min_size=1, max_size=40),
    description=st.text(alphabet=string.ascii_letters + " ^&\\~|", min_size=1, max_size=60),
)
def test_any_name_and_description_round_trip(family: str, description: str) -> None:
    # ^ and \ are PN syntax in DICOM (components, values), so names cannot hold them
    assume(description.strip())  # an empty description falls back to the modality
    ds = ct_header()
    ds.PatientName = f"{family}^Given"
    ds.StudyDescription = description
    message = build_oru(
        classification(), ds, SPACING, destination(universal_service_id="procedure")
    )
    strict(message.er7)
    parsed = python_hl7.parse(message.er7)
    assert value_at(parsed, "PID.F5.R1.C1") == family.strip()
    assert value_at(parsed, "OBR.F4.R1.C2") == description.strip()


def test_a_patient_without_a_name_is_sent_with_name_type_unspecified() -> None:
    ds = ct_header()
    ds.PatientName = ""
    message = build_oru(classification(), ds, SPACING, destination())
    strict(message.er7)
    parsed = python_hl7.parse(message.er7)
    assert value_at(parsed, "PID.F5.R1.C1") == ""
    assert value_at(parsed, "PID.F5.R1.C7") == "U"


def test_escape_maps_each_delimiter_and_drops_control_characters() -> None:
    assert escape("|^&~\\") == "\\F\\\\S\\\\T\\\\R\\\\E\\"
    assert escape("a\rb\nc") == "a b c"


def test_classification_gives_a_coded_finding_and_its_probability_per_label() -> None:
    rows = obx_rows(build_oru(classification(), ct_header(), SPACING, destination()).er7)
    coded = [r for r in rows if r["type"] == "CWE"]
    numbers = [r for r in rows if r["type"] == "NM"]
    # the finding is the observation, Present / Absent its value (as the SR's
    # qualitative evaluation): the finding as the value read as a positive result
    # a label the bundle gives no code has radnode's private one, as in the SR (review:
    # a text with no identifier could not be matched by a RIS)
    assert [(r["code"], r["system"]) for r in coded] == [
        ("36118008", "SCT"),
        ("label-1", "99RADNODE"),
    ]
    assert [(r["value"], r["value_text"], r["value_system"]) for r in coded] == [
        ("52101004", "Present", "SCT"),
        ("272519000", "Absent", "SCT"),
    ]
    assert [(r["code"], r["value"], r["units"], r["units_system"]) for r in numbers] == [
        ("122157", "87.3", "%", "UCUM"),
        ("122157", "2.0", "%", "UCUM"),
    ]
    # the finding and its probability are paired by OBX-4 sub-ID
    assert [r["sub"] for r in coded] == [r["sub"] for r in numbers] == ["1", "2"]
    assert {r["status"] for r in rows} == {"F"}


def test_a_result_that_replaces_a_reported_one_is_sent_as_a_correction() -> None:
    """OBR-25 (table 0123) and every OBX-11 (table 0085) say C, so the RIS replaces the
    result it has for the order rather than filing a second final one."""
    er7 = build_oru(segmentation(), ct_header(), SPACING, destination(), correction=True).er7
    parsed = python_hl7.parse(er7)
    assert (parsed["ORC.F1"], parsed["OBR.F25"]) == ("RE", "C")
    assert {r["status"] for r in obx_rows(er7)} == {"C"}


@pytest.mark.parametrize(
    ("flags", "status"),
    [
        ({}, "F"),
        ({"correction": True}, "C"),
        ({"preliminary": True}, "P"),
        ({"correction": True, "preliminary": True}, "C"),  # never P after F
        ({"correction": True, "preliminary": True, "after_preliminary": True}, "P"),
        ({"correction": True, "after_preliminary": True}, "F"),
    ],
)
def test_result_status_says_preliminary_final_or_correction(flags: dict, status: str) -> None:
    """P while the study lacks an instance lost in transit; the result that replaces a
    preliminary one is F (how a result becomes final), not C (a final one was wrong);
    only a preliminary result's summary says why it is preliminary."""
    er7 = build_oru(segmentation(), ct_header(), SPACING, destination(), **flags).er7
    assert python_hl7.parse(er7)["OBR.F25"] == status
    assert {r["status"] for r in obx_rows(er7)} == {status}
    note = "PRELIMINARY: an image of this study was lost" in er7
    assert note is bool(flags.get("preliminary"))


def test_a_destination_can_take_every_result_as_preliminary() -> None:
    """A RIS that must not file an unverified AI result as final before a radiologist
    reads it (integrator pass): result_status = "preliminary" sends P, revisions too,
    without the sentence about a lost image."""
    dest = destination(result_status="preliminary")
    for correction in (False, True):
        er7 = build_oru(segmentation(), ct_header(), SPACING, dest, correction=correction).er7
        assert python_hl7.parse(er7)["OBR.F25"] == "P"
        assert {r["status"] for r in obx_rows(er7)} == {"P"}
        assert "lost" not in er7


def test_segmentation_gives_one_volume_in_ml_per_segment() -> None:
    rows = obx_rows(build_oru(segmentation(), ct_header(), SPACING, destination()).er7)
    volumes = [r for r in rows if r["type"] == "NM"]
    sites = [r for r in rows if r["type"] == "CWE"]
    assert [r["value"] for r in sites] == ["10200004", "78961009", "64033007"]
    assert {(r["code"], r["system"], r["units"], r["units_system"]) for r in volumes} == {
        ("118565006", "SCT", "mL", "UCUM")
    }
    # 200 and 3 voxels of 0.5 mm³; the empty segment is reported as 0
    assert [r["value"] for r in volumes] == ["0.10", "0.00", "0.00"]
    assert [r["sub"] for r in volumes] == ["1", "2", "3"]


def test_segment_volume_uses_the_voxel_spacing() -> None:
    rows = obx_rows(build_oru(segmentation(), ct_header(), (1.0, 1.0, 5.0), destination()).er7)
    assert next(r["value"] for r in rows if r["type"] == "NM") == "1.00"  # 200 x 5 mm³


def test_summary_names_the_algorithm_and_says_it_is_not_a_diagnosis() -> None:
    rows = obx_rows(build_oru(segmentation(), ct_header(), SPACING, destination()).er7)
    summary = " ".join(r["value"] for r in rows if r["type"] == "TX")
    assert "ct_abdomen_segmentation version 0.3.0" in summary
    assert "not a diagnosis on its own" in summary
    assert "Liver: volume 0.10 mL." in summary
    assert all(len(r["value"]) <= 199 for r in rows)


def test_summary_lines_end_where_phrases_end() -> None:
    """The radiologist pass saw "(classification)" alone on a line of the summary: the
    sentence naming the algorithm wrapped at 80 columns mid-phrase."""
    rows = obx_rows(build_oru(classification(), ct_header(), SPACING, destination()).er7)
    lines = [r["value"] for r in rows if r["type"] == "TX"]
    assert lines[0] == "AI classification: chest_pneumothorax version 1.2.0."
    assert lines[1].startswith("Run by radnode on series ") and lines[1].endswith(".")


def test_study_and_series_instance_uids_are_sent_so_the_pacs_can_find_them() -> None:
    ds = ct_header(study_uid="1.2.826.0.1.3680043.10.1", series_uid="1.2.826.0.1.3680043.10.2")
    rows = obx_rows(build_oru(reconstruction(), ds, SPACING, destination()).er7)
    uids = {(r["code"], r["system"]): r["value"] for r in rows if r["type"] == "ST"}
    assert uids == {
        ("110180", "DCM"): "1.2.826.0.1.3680043.10.1",
        ("112002", "DCM"): "1.2.826.0.1.3680043.10.2",
    }


@pytest.mark.parametrize(
    ("field", "placer", "filler"),
    [("filler", "", "ACC-7"), ("placer", "ACC-7", ""), ("both", "ACC-7", "ACC-7")],
)
def test_accession_number_is_the_configured_order_number(field, placer, filler) -> None:
    message = build_oru(
        classification(),
        ct_header(accession_number="ACC-7"),
        SPACING,
        destination(order_number_field=field),
    )
    parsed = python_hl7.parse(message.er7)
    assert (parsed["ORC.F1"], parsed["OBR.F25"]) == ("RE", "F")
    assert (parsed["ORC.F2.R1.C1"], parsed["OBR.F2.R1.C1"]) == (placer, placer)
    assert (parsed["ORC.F3.R1.C1"], parsed["OBR.F3.R1.C1"]) == (filler, filler)


def test_accession_issuer_goes_into_the_entity_identifier() -> None:
    ds = ct_header(accession_number="ACC-8")
    ds.IssuerOfAccessionNumberSequence = Sequence([Dataset()])
    ds.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID = "RIS_A"
    parsed = python_hl7.parse(build_oru(classification(), ds, SPACING, destination()).er7)
    assert (parsed["OBR.F3.R1.C1"], parsed["OBR.F3.R1.C2"]) == ("ACC-8", "RIS_A")


def _with_requested_procedure(ds: Dataset) -> Dataset:
    ds.StudyDescription = "CT ABDOMEN"
    item = Dataset()
    item.CodeValue = "RPID17"
    item.CodingSchemeDesignator = "RADLEX"
    item.CodeMeaning = "CT abdomen with contrast"
    ds.RequestedProcedureCodeSequence = Sequence([item])
    return ds


def test_universal_service_id_names_the_pipeline_and_keeps_the_procedure_in_obr_44() -> None:
    """Two pipelines on one order are two services, not one final result twice."""
    ds = _with_requested_procedure(ct_header(accession_number="ACC-9"))
    messages = [
        build_oru(result, ds, SPACING, destination())
        for result in (classification(), segmentation())
    ]
    for message in messages:
        strict(message.er7)
    parsed = [python_hl7.parse(m.er7) for m in messages]
    assert [p["OBR.F4.R1.C1"] for p in parsed] == [
        "chest_pneumothorax",
        algorithm_code("ct_abdomen_segmentation"),
    ]
    assert algorithm_code("ct_abdomen_segmentation").startswith("ct_abdomen_segm-")
    assert len(algorithm_code("ct_abdomen_segmentation")) == 20  # CWE.1's limit
    assert algorithm_code("ct_abdomen_segmentation_v2") != algorithm_code("ct_abdomen_segmentation")
    assert parsed[1]["OBR.F4.R1.C2"] == "AI segmentation: ct_abdomen_segmentation 0.3.0"
    assert parsed[0]["OBR.F4.R1.C2"] == "AI classification: chest_pneumothorax 1.2.0"
    assert {p["OBR.F4.R1.C3"] for p in parsed} == {"99RADNODE"}
    assert {p["OBR.F3.R1.C1"] for p in parsed} == {"ACC-9"}  # still the one order
    assert [parsed[0][f"OBR.F44.R1.C{i}"] for i in (1, 2, 3)] == [
        "RPID17",
        "CT abdomen with contrast",
        "RADLEX",
    ]


def test_universal_service_id_prefers_the_requested_procedure_code() -> None:
    ds = _with_requested_procedure(ct_header())
    message = build_oru(
        classification(), ds, SPACING, destination(universal_service_id="procedure")
    )
    strict(message.er7)
    parsed = python_hl7.parse(message.er7)
    assert [parsed[f"OBR.F4.R1.C{i}"] for i in (1, 2, 3)] == [
        "RPID17",
        "CT abdomen with contrast",
        "RADLEX",
    ]
    assert len(parsed.segment("OBR")) <= 44  # no OBR-44: the procedure is in OBR-4


def test_observation_date_time_comes_from_the_study_date_and_time() -> None:
    ds = ct_header()
    ds.StudyDate = "20240229"
    ds.StudyTime = "174502.123456"
    ds.TimezoneOffsetFromUTC = "+0100"
    message = build_oru(classification(), ds, SPACING, destination())
    strict(message.er7)
    parsed = python_hl7.parse(message.er7)
    assert parsed["OBR.F7"] == "20240229174502.1234+0100"
    assert parsed["OBR.F22"] != ""  # results date/time: when the message was made


def test_control_ids_are_unique_and_fit_msh_10() -> None:
    ids = {build_oru(classification(), ct_header(), SPACING, destination()).control_id}
    ids.add(build_oru(classification(), ct_header(), SPACING, destination()).control_id)
    assert len(ids) == 2
    assert control_id_for("job-1", "ris") == control_id_for("job-1", "ris")
    assert control_id_for("job-1", "ris") != control_id_for("job-1", "ris2")
    assert all(len(i) <= 20 for i in (*ids, control_id_for("job-1", "ris")))


def test_missing_patient_id_stops_the_build() -> None:
    ds = ct_header()
    ds.PatientID = ""
    with pytest.raises(Hl7Error, match="PatientID"):
        build_oru(classification(), ds, SPACING, destination())


def test_an_identifier_that_does_not_fit_is_refused_without_quoting_it() -> None:
    ds = ct_header()
    ds.IssuerOfPatientID = "A_VERY_LONG_ISSUER_NAME_OVER_20"
    with pytest.raises(Hl7Error) as raised:
        build_oru(classification(), ds, SPACING, destination())
    assert "A_VERY_LONG" not in str(raised.value)
    assert 'issuers = "leave_out"' in str(raised.value)  # what to do about it
    # ... which sends the patient ID without an assigning authority
    ds.AccessionNumber = "ACC-8"
    ds.IssuerOfAccessionNumberSequence = Sequence([Dataset()])
    ds.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID = "A_VERY_LONG_ORDER_DOMAIN_NAME"
    only_order = copy.deepcopy(ds)
    del only_order.IssuerOfPatientID
    with pytest.raises(Hl7Error, match="Issuer of Accession Number"):
        build_oru(classification(), only_order, SPACING, destination())
    er7 = build_oru(classification(), ds, SPACING, destination(issuers="leave_out")).er7
    parsed = python_hl7.parse(er7)
    assert (parsed["PID.F3"], parsed["OBR.F3"]) == (ds.PatientID, "ACC-8")


def test_a_long_issuer_that_is_an_oid_or_has_a_universal_id_still_names_the_authority() -> None:
    """An OID issuer (IHE PIX domains use them) is longer than HD.1's 20 characters: it
    is sent as the universal ID, type ISO. A long local name with a universal ID beside
    it is left out: the universal ID names the authority. The acceptance pass saw every
    study of such a site go without its ORU."""
    ds = ct_header()
    ds.IssuerOfPatientID = "1.2.276.0.76.3.1.123.4.5.6"
    parsed = python_hl7.parse(build_oru(classification(), ds, SPACING, destination()).er7)
    assert [str(parsed[f"PID.F3.R1.C4.S{i}"]) for i in (1, 2, 3)] == [
        "", "1.2.276.0.76.3.1.123.4.5.6", "ISO"
    ]  # fmt: skip
    ds.IssuerOfPatientID = "UNIVERSITAETSKLINIKUM MUENSTER"
    ds.IssuerOfPatientIDQualifiersSequence = Sequence([Dataset()])
    ds.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID = "2.16.840.1.113883.3.72"
    ds.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityIDType = "ISO"
    parsed = python_hl7.parse(build_oru(classification(), ds, SPACING, destination()).er7)
    assert [str(parsed[f"PID.F3.R1.C4.S{i}"]) for i in (1, 2, 3)] == [
        "", "2.16.840.1.113883.3.72", "ISO"
    ]  # fmt: skip
    # the accession's issuer alike (EI.2-4)
    ds = ct_header(accession_number="ACC-8")
    ds.IssuerOfAccessionNumberSequence = Sequence([Dataset()])
    ds.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID = "1.2.276.0.76.3.1.123.4.5.7"
    parsed = python_hl7.parse(build_oru(classification(), ds, SPACING, destination()).er7)
    assert [str(parsed[f"OBR.F3.R1.C{i}"]) for i in (1, 2, 3, 4)] == [
        "ACC-8", "", "1.2.276.0.76.3.1.123.4.5.7", "ISO"
    ]  # fmt: skip


def test_latin1_destination_sends_latin1_bytes() -> None:
    ds = ct_header()
    ds.PatientName = "Müller^Jürgen"
    message = build_oru(classification(), ds, SPACING, destination(character_set="8859/1"))
    assert "Müller".encode("latin-1") in message.to_bytes()
    assert b"|8859/1" in message.to_bytes()


def test_letters_a_latin1_destination_cannot_hold_go_as_their_base_letters_and_are_counted():
    """A Polish name went to a Latin-1 RIS as "W?sowski^?ukasz", silently (acceptance
    pass): now as its base letters, and the caller learns how many were replaced."""
    ds = ct_header()
    ds.PatientName = "Wąsowski^Łukasz"
    ds.StudyDescription = "Jama brzuszna – „kontrast”"  # Polish quotes: „ went as ?
    latin1 = destination(character_set="8859/1", universal_service_id="procedure")
    message = build_oru(classification(), ds, SPACING, latin1)
    payload, replaced = message.encoded()
    assert b"Wasowski^Lukasz" in payload and b'Jama brzuszna - "kontrast"' in payload
    assert replaced == 5
    assert message.encoded() == (message.to_bytes(), 5)
    utf8 = build_oru(classification(), ds, SPACING, destination())
    assert utf8.encoded()[1] == 0 and "Wąsowski".encode() in utf8.to_bytes()


def test_destination_names_must_fit_hd() -> None:
    with pytest.raises(ValueError, match="delimiters"):
        destination(receiving_application="RIS^X")
    with pytest.raises(ValueError, match="20 characters"):
        destination(sending_facility="X" * 21)


def test_enqueue_oru_is_idempotent_per_job_and_destination(tmp_path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    kwargs = {
        "job_id": "job-9",
        "result": classification(),
        "source": ct_header(),
        "spacing_mm": SPACING,
        "destination": destination(),
    }
    first = enqueue_oru(outbox, **kwargs)  # type: ignore[arg-type]
    second = enqueue_oru(outbox, **kwargs)  # type: ignore[arg-type]
    assert first.id == second.id
    assert first.kind == "hl7" and first.message_id == control_id_for("job-9", "ris")
    assert first.payload is not None and first.message_id.encode() in first.payload
    assert len(outbox.list()) == 1


def test_a_classification_says_present_or_absent_as_the_sr_does() -> None:
    """A RIS listing coded findings showed "Solitary nodule of lung" on a normal chest,
    only the 0.2 % beside it telling otherwise (acceptance pass). The sentence says
    present or absent, and both OBX of a finding carry the abnormal flag (A / N)."""
    er7 = build_oru(classification(), ct_header(), SPACING, destination()).er7
    rows = obx_rows(er7)
    flags = {(r["sub"], r["type"]): r["flag"] for r in rows if r["sub"]}
    assert flags == {("1", "CWE"): "A", ("1", "NM"): "A", ("2", "CWE"): "N", ("2", "NM"): "N"}
    summary = " ".join(r["value"] for r in rows if r["type"] == "TX")
    assert "Pneumothorax: present (probability 87.3 %)." in summary
    assert "Uncoded finding: absent (probability 2.0 %)." in summary
    strict(er7)


def test_a_reconstructions_summary_names_the_derived_series_to_open() -> None:
    """The summary of a denoising said which algorithm ran, not which series it made
    (acceptance pass): the RIS reader is told its number and description."""
    er7 = build_oru(reconstruction(), ct_header(), SPACING, destination()).er7
    summary = " ".join(r["value"] for r in obx_rows(er7) if r["type"] == "TX")
    assert "Derived image series 9" in summary
    assert '"AI derived, not for diagnosis: ct_denoise 0.1.0" (2 images)' in summary
    # a correction names the revision's series, as the DICOM writer numbers it
    corrected = build_oru(reconstruction(), ct_header(), SPACING, destination(), correction=True)
    text = " ".join(r["value"] for r in obx_rows(corrected.er7) if r["type"] == "TX")
    provenance = Provenance.of(reconstruction().bundle, "", revised_from=2)
    assert f"Derived image series {provenance.series_number('DERIVED')} " in text
    assert "ct_denoise 0.1.0 revised 2 img" in text


def test_a_name_with_only_its_ideographic_group_is_sent_not_unnamed() -> None:
    """ "=山田^太郎=やまだ^たろう" (ISO 2022 IR 87, no alphabetic group) went to the RIS as
    an unnamed patient (conformance audit)."""
    ds = ct_header()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "=山田^太郎=やまだ^たろう"
    message = build_oru(classification(), ds, SPACING, destination(character_set="UNICODE UTF-8"))
    strict(message.er7)
    parsed = python_hl7.parse(message.er7)
    assert value_at(parsed, "PID.F5.R1.C1") == "山田"
    assert value_at(parsed, "PID.F5.R1.C2") == "太郎"
    assert value_at(parsed, "PID.F5.R1.C7") != "U"


def test_a_normal_class_present_is_no_abnormal_result() -> None:
    """Acceptance pass: "Normal" present was sent as 52101004^Present with flag A."""
    from dataclasses import replace

    result = classification()
    labels = (Label(0, "Normal", CodedConcept("17621005", "SCT", "Normal"), normal=True),
              result.labels[1])  # fmt: skip
    normal = replace(result, labels=labels, probabilities=(0.6, 0.4), exclusive=True)
    rows = [r for r in obx_rows(build_oru(normal, ct_header(), SPACING, destination()).er7)
            if r["type"] in ("CWE", "NM")]  # fmt: skip
    assert [(r["type"], r["value"], r["flag"]) for r in rows] == [
        ("CWE", "52101004", "N"), ("NM", "60.0", "N"),
        ("CWE", "272519000", "N"), ("NM", "40.0", "N"),
    ]  # fmt: skip
