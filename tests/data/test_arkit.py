"""The 61 ARKit channels, mappings, the Live Link Face CSV and keyframe interpolation."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest

from facelab.data.arkit import (
    CHANNELS,
    HIGH,
    INDEX,
    LLF_HEADER,
    LOW,
    N_BLENDSHAPES,
    N_CHANNELS,
    REGIONS,
    ArkitError,
    format_llf_csv,
    interpolate_keyframes,
    llf_timecode,
    mapping_from_vector,
    parse_mapping,
    read_llf_csv,
    vector_from_mapping,
    write_llf_csv,
)
from facelab.data.emoava import DataError

SHARED_KF = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "keyframeface"


def _release(name: str) -> Path:
    path = SHARED_KF / name
    if not path.is_file():
        pytest.skip(f"reference data not present: {path}")
    return path


def _full_mapping(**override: float) -> dict:
    d = {name: 0.0 for name in CHANNELS}
    d.update(override)
    return d


# --------------------------------------------------------------------------------------------
# Channel tables
# --------------------------------------------------------------------------------------------


def test_channel_table_layout():
    assert N_CHANNELS == len(CHANNELS) == 61 and N_BLENDSHAPES == 52
    assert len(set(CHANNELS)) == 61
    assert CHANNELS[0] == "EyeBlinkLeft" and CHANNELS[51] == "TongueOut"
    assert CHANNELS[52:] == (
        "HeadYaw",
        "HeadPitch",
        "HeadRoll",
        "LeftEyeYaw",
        "LeftEyePitch",
        "LeftEyeRoll",
        "RightEyeYaw",
        "RightEyePitch",
        "RightEyeRoll",
    )
    assert all(INDEX[name] == i for i, name in enumerate(CHANNELS))
    assert LOW.dtype == HIGH.dtype == np.float32 and LOW.shape == HIGH.shape == (61,)
    assert (LOW[:52] == 0).all() and (LOW[52:] == -1).all() and (HIGH == 1).all()
    with pytest.raises(ValueError):
        LOW[0] = 5.0  # read-only: nobody can corrupt the bounds
    assert LLF_HEADER[:2] == ("Timecode", "BlendshapeCount") and LLF_HEADER[2:] == CHANNELS


def test_channels_match_release_csv_header():
    header = _release("example_result.csv").read_text(encoding="utf-8").split("\n")[0].split(",")
    assert tuple(header) == LLF_HEADER


def test_regions_partition_the_channels():
    members = [c for names in REGIONS.values() for c in names]
    assert sorted(members) == sorted(CHANNELS) and len(members) == 61
    assert set(REGIONS) == {"eyes", "brows", "jaw", "mouth", "cheeks_nose", "tongue", "head", "eye_pose"}
    assert "JawOpen" in REGIONS["jaw"] and "MouthClose" in REGIONS["mouth"] and "LeftEyePitch" in REGIONS["eye_pose"]


def test_arkit_error_is_a_user_facing_data_error():
    assert issubclass(ArkitError, DataError) and issubclass(ArkitError, ValueError)


# --------------------------------------------------------------------------------------------
# Mappings
# --------------------------------------------------------------------------------------------


def test_vector_from_mapping_round_trip_in_release_order():
    d = _full_mapping(EyeBlinkLeft=0.25, TongueOut=1.0, HeadPitch=-0.1, RightEyeRoll=-1.0)
    vec = vector_from_mapping(d)
    assert vec.dtype == np.float32 and vec.shape == (61,)
    assert vec[0] == np.float32(0.25) and vec[51] == 1.0 and vec[53] == np.float32(-0.1) and vec[60] == -1.0
    back = mapping_from_vector(vec)
    assert list(back) == list(CHANNELS)
    assert back["HeadPitch"] == -0.1 and back["EyeBlinkLeft"] == 0.25  # float32 -> shortest decimal, not -0.10000000149
    assert all(type(v) is float for v in back.values())
    # an integer 0/1 is a number too
    assert vector_from_mapping(_full_mapping(JawOpen=1))[INDEX["JawOpen"]] == 1.0


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d.update(Smile=0.1), "unknown channel 'Smile'"),
        (lambda d: d.pop("JawOpen"), "missing channel 'JawOpen'"),
        (lambda d: d.update(JawOpen="0.5"), "channel 'JawOpen': expected a number"),
        (lambda d: d.update(JawOpen=True), "channel 'JawOpen': expected a number"),
        (lambda d: d.update(JawOpen=None), "channel 'JawOpen': expected a number"),
        (lambda d: d.update(JawOpen=float("nan")), "channel 'JawOpen': non-finite"),
        (lambda d: d.update(JawOpen=1.01), "channel 'JawOpen' = 1.01 is out of range [0.0, 1.0]"),
        (lambda d: d.update(JawOpen=-0.2), "channel 'JawOpen' = -0.2 is out of range"),
        (lambda d: d.update(HeadYaw=-1.5), "channel 'HeadYaw' = -1.5 is out of range [-1.0, 1.0]"),
    ],
)
def test_vector_from_mapping_strict_errors_name_where_and_channel(mutate, needle):
    d = _full_mapping()
    mutate(d)
    with pytest.raises(ArkitError) as exc:
        vector_from_mapping(d, where="answers.jsonl:7")
    assert str(exc.value).startswith("answers.jsonl:7: ") and needle in str(exc.value)


def test_vector_from_mapping_rejects_non_mapping():
    with pytest.raises(ArkitError, match="expected an object"):
        vector_from_mapping([0.0] * 61)


def test_pose_accepts_negative_values_blendshapes_do_not():
    assert vector_from_mapping(_full_mapping(HeadYaw=-1.0))[INDEX["HeadYaw"]] == -1.0
    with pytest.raises(ArkitError, match="EyeBlinkLeft"):
        vector_from_mapping(_full_mapping(EyeBlinkLeft=-0.01))


def test_parse_mapping_counts_missing_unknown_clipped():
    d = _full_mapping(JawOpen=1.7, HeadYaw=-3.0, MouthSmileLeft=0.4)
    del d["TongueOut"]
    d["EyeBlinkRight"] = "high"  # not a number -> missing
    d["CheekSquintLeft"] = float("inf")  # non-finite -> missing
    d["Keyframe"] = 3  # unknown, ignored
    d["Smile"] = 0.2  # unknown, ignored
    vec, n_missing, n_unknown, n_clipped = parse_mapping(d)
    assert (n_missing, n_unknown, n_clipped) == (3, 2, 2)
    assert vec[INDEX["JawOpen"]] == 1.0 and vec[INDEX["HeadYaw"]] == -1.0
    assert vec[INDEX["MouthSmileLeft"]] == np.float32(0.4)
    assert vec[INDEX["TongueOut"]] == vec[INDEX["EyeBlinkRight"]] == vec[INDEX["CheekSquintLeft"]] == 0.0
    assert vector_from_mapping(d, strict=False).tolist() == vec.tolist()


def test_parse_mapping_of_garbage_is_all_missing():
    vec, n_missing, n_unknown, n_clipped = parse_mapping("not json")
    assert (vec == 0).all() and (n_missing, n_unknown, n_clipped) == (61, 0, 0)


# --------------------------------------------------------------------------------------------
# Live Link Face CSV
# --------------------------------------------------------------------------------------------


def test_release_csv_round_trips_byte_for_byte(tmp_path):
    path = _release("example_result.csv")
    timecodes, rows = read_llf_csv(path)
    assert timecodes == ["00:00:00:00.000", "00:00:01:00.000"]
    assert rows.shape == (2, 61) and rows.dtype == np.float32
    assert rows[0, INDEX["MouthPressLeft"]] == np.float32(0.4) and rows[0, INDEX["HeadPitch"]] == np.float32(-0.1)
    assert rows[1, INDEX["MouthSmileRight"]] == np.float32(0.4) and rows[1, INDEX["RightEyePitch"]] == np.float32(0.1)
    out = tmp_path / "out.csv"
    write_llf_csv(rows, out)  # default timecodes = the release's
    assert out.read_bytes() == path.read_bytes()
    buf = io.StringIO()
    write_llf_csv(rows, buf, timecodes=timecodes)
    assert buf.getvalue().encode("utf-8") == path.read_bytes()


def test_write_llf_csv_hand_built_bytes():
    rows = np.zeros((2, 61), dtype=np.float64)
    rows[0, 0] = 0.2
    rows[1, 60] = -0.1
    rows[1, 1] = 1
    text = format_llf_csv(rows)
    lines = text.split("\n")
    assert text.endswith("\n") and "\r" not in text and len(lines) == 4 and lines[3] == ""
    assert lines[0] == ",".join(LLF_HEADER)
    assert lines[1] == "00:00:00:00.000,61," + ",".join(["0.2"] + ["0.0"] * 60)
    assert lines[2] == "00:00:01:00.000,61," + ",".join(["0.0", "1.0"] + ["0.0"] * 58 + ["-0.1"])


def test_write_llf_csv_python_float_repr_for_float64():
    rows = np.zeros((1, 61))
    rows[0, 0] = 0.1 + 0.2  # written as Python writes it
    assert format_llf_csv(rows).split("\n")[1].split(",")[2] == "0.30000000000000004"


def test_default_timecodes_one_keyframe_per_second_roll_over_after_a_minute():
    text = format_llf_csv(np.zeros((62, 61)))
    codes = [line.split(",")[0] for line in text.split("\n")[1:-1]]
    assert codes[:3] == ["00:00:00:00.000", "00:00:01:00.000", "00:00:02:00.000"]
    assert codes[59] == "00:00:59:00.000" and codes[60] == "00:01:00:00.000" and codes[61] == "00:01:01:00.000"


@pytest.mark.parametrize(
    "i, fps, expected",
    [
        (0, 60, "00:00:00:00.000"),
        (59, 60, "00:00:00:59.000"),
        (61, 60, "00:00:01:01.000"),
        (3600 * 30, 30, "01:00:00:00.000"),
        (3600 * 30 + 61 * 30 + 7, 30, "01:01:01:07.000"),
        (15, 29.97, "00:00:00:15.000"),
        (30, 29.97, "00:00:01:00.030"),  # t = 1.001 s: frame 0 of second 1 plus 0.03 frame
    ],
)
def test_llf_timecode(i, fps, expected):
    assert llf_timecode(i, fps) == expected


def test_write_llf_csv_fps_timecodes_and_argument_errors(tmp_path):
    rows = np.zeros((3, 61), dtype=np.float32)
    codes = [line.split(",")[0] for line in format_llf_csv(rows, fps=60).split("\n")[1:-1]]
    assert codes == ["00:00:00:00.000", "00:00:00:01.000", "00:00:00:02.000"]
    with pytest.raises(ArkitError, match="not both"):
        format_llf_csv(rows, fps=60, timecodes=["a", "b", "c"])
    with pytest.raises(ArkitError, match="2 timecodes for 3 rows"):
        format_llf_csv(rows, timecodes=["a", "b"])
    with pytest.raises(ArkitError, match="shape"):
        format_llf_csv(np.zeros((2, 60)))
    bad = rows.copy()
    bad[1, INDEX["JawOpen"]] = 1.5
    with pytest.raises(ArkitError, match="row 1, channel 'JawOpen' = 1.5 is out of range"):
        write_llf_csv(bad, tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()
    bad[1, INDEX["JawOpen"]] = np.nan
    with pytest.raises(ArkitError, match="non-finite"):
        format_llf_csv(bad)


def _csv_with(tmp_path, header=None, row=None) -> Path:
    header = header if header is not None else list(LLF_HEADER)
    row = row if row is not None else ["00:00:00:00.000", "61"] + ["0.0"] * 61
    path = tmp_path / "take.csv"
    path.write_text(",".join(header) + "\n" + ",".join(row) + "\n", encoding="utf-8")
    return path


def test_read_llf_csv_validation_names_file_line_column(tmp_path):
    header = list(LLF_HEADER)
    header[5] = "EyeLookOutLeftX"
    with pytest.raises(
        ArkitError, match=r"take\.csv:1: header column 6 is 'EyeLookOutLeftX', expected 'EyeLookOutLeft'"
    ):
        read_llf_csv(_csv_with(tmp_path, header=header))
    with pytest.raises(ArkitError, match=r"take\.csv:1: header has 60 channels"):
        read_llf_csv(_csv_with(tmp_path, header=list(LLF_HEADER)[:-1]))

    row = ["00:00:00:00.000", "61"] + ["0.0"] * 61
    with pytest.raises(ArkitError, match=r"take\.csv:2: 60 channel values, expected 61"):
        read_llf_csv(_csv_with(tmp_path, row=row[:-1]))
    bad = list(row)
    bad[2 + INDEX["JawOpen"]] = "abc"
    with pytest.raises(ArkitError, match=r"take\.csv:2: JawOpen: not a number: 'abc'"):
        read_llf_csv(_csv_with(tmp_path, row=bad))
    bad[2 + INDEX["JawOpen"]] = "1.2"
    with pytest.raises(ArkitError, match=r"take\.csv:2: JawOpen = 1.2 is out of range \[0.0, 1.0\]"):
        read_llf_csv(_csv_with(tmp_path, row=bad))
    bad[2 + INDEX["JawOpen"]] = "nan"
    with pytest.raises(ArkitError, match=r"take\.csv:2: JawOpen: non-finite"):
        read_llf_csv(_csv_with(tmp_path, row=bad))
    bad = list(row)
    bad[1] = "52"
    with pytest.raises(ArkitError, match=r"take\.csv:2: BlendshapeCount is '52'"):
        read_llf_csv(_csv_with(tmp_path, row=bad))
    with pytest.raises(ArkitError, match="missing"):
        read_llf_csv(tmp_path / "nope.csv")


def test_read_llf_csv_accepts_live_link_app_spelling_and_crlf(tmp_path):
    header = list(LLF_HEADER)
    header[1] = "BlendShapeCount"  # as the Live Link Face app writes it
    row = ["12:00:01:05.123", "61"] + ["0.5"] * 52 + ["-0.25"] * 9
    path = tmp_path / "app.csv"
    path.write_bytes((",".join(header) + "\r\n" + ",".join(row) + "\r\n\r\n").encode())
    timecodes, rows = read_llf_csv(path)
    assert timecodes == ["12:00:01:05.123"]
    assert rows.shape == (1, 61) and (rows[0, :52] == 0.5).all() and (rows[0, 52:] == -0.25).all()


# --------------------------------------------------------------------------------------------
# Interpolation
# --------------------------------------------------------------------------------------------


def test_interpolate_two_keyframes_is_linear_on_a_60hz_grid():
    rows = np.zeros((2, 61), dtype=np.float32)
    rows[0, INDEX["JawOpen"]], rows[1, INDEX["JawOpen"]] = 0.2, 0.8
    rows[0, INDEX["HeadYaw"]], rows[1, INDEX["HeadYaw"]] = -0.5, 0.5
    times, frames = interpolate_keyframes(rows, [1.0, 2.0])
    assert times.shape == (61,) and frames.shape == (61, 61) and frames.dtype == np.float32
    np.testing.assert_allclose(times[[0, 30, 60]], [1.0, 1.5, 2.0])
    np.testing.assert_allclose(frames[[0, 60]], rows, atol=1e-6)
    np.testing.assert_allclose(frames[30, INDEX["JawOpen"]], 0.5, atol=1e-6)
    np.testing.assert_allclose(frames[15, INDEX["HeadYaw"]], -0.25, atol=1e-6)
    assert (frames[:, INDEX["TongueOut"]] == 0).all()


def test_interpolate_passes_through_keys_without_overshoot():
    rows = np.zeros((4, 61), dtype=np.float32)
    rows[:, INDEX["MouthSmileLeft"]] = [0.0, 1.0, 0.1, 0.9]  # peaks at the range limit
    rows[:, INDEX["HeadPitch"]] = [-1.0, 1.0, -1.0, 0.0]
    times, frames = interpolate_keyframes(rows, [0.0, 0.5, 1.5, 2.0], fps=60.0)
    assert len(times) == 121
    for t, row in zip([0, 30, 90, 120], rows):
        np.testing.assert_allclose(frames[t], row, atol=1e-6)
    assert (frames >= LOW).all() and (frames <= HIGH).all()
    smile = frames[:, INDEX["MouthSmileLeft"]]
    # monotone between consecutive keyframes: each segment stays between its two key values
    for (a, b), (va, vb) in zip([(0, 30), (30, 90), (90, 120)], [(0.0, 1.0), (1.0, 0.1), (0.1, 0.9)]):
        seg = smile[a : b + 1]
        assert seg.min() >= min(va, vb) - 1e-6 and seg.max() <= max(va, vb) + 1e-6
        assert (np.diff(seg) * np.sign(vb - va) >= -1e-6).all()


def test_interpolate_single_keyframe_and_errors():
    rows = np.full((1, 61), 0.3, dtype=np.float32)
    times, frames = interpolate_keyframes(rows, [2.5])
    assert times.tolist() == [2.5] and frames.shape == (1, 61) and np.allclose(frames, 0.3)
    with pytest.raises(ArkitError, match="strictly increasing"):
        interpolate_keyframes(np.zeros((2, 61)), [1.0, 1.0])
    with pytest.raises(ArkitError, match="2 key times for 3 keyframes"):
        interpolate_keyframes(np.zeros((3, 61)), [0.0, 1.0])
    with pytest.raises(ArkitError, match="fps"):
        interpolate_keyframes(np.zeros((2, 61)), [0.0, 1.0], fps=0)


def test_interpolate_off_grid_last_key_is_not_extrapolated():
    rows = np.zeros((2, 61), dtype=np.float32)
    rows[1, 0] = 1.0
    times, frames = interpolate_keyframes(rows, [0.0, 0.11], fps=60.0)  # 6.6 frames -> 7 frames, last at 0.1 s
    assert len(times) == 7 and math.isclose(times[-1], 0.1)
    assert frames[-1, 0] < 1.0
