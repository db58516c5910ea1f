"""KeyframeFace schema, the on-disk split format, and the release importers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facelab.data import emoava
from facelab.data.arkit import CHANNELS, INDEX, read_llf_csv, write_llf_csv
from facelab.data.keyframeface import (
    FORMAT,
    NUMBER_WORDS,
    DataError,
    Keyframe,
    Script,
    _last_json_object,
    import_chat_jsonl,
    import_llf_csv,
    keyframe_text,
    load_dataset,
    load_meta,
    load_split,
    parse_request,
    validate_dir,
    write_dataset,
)

SHARED_KF = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "keyframeface"

SYSTEM = "You are a professional facial animator."


def _release(name: str) -> Path:
    path = SHARED_KF / name
    if not path.is_file():
        pytest.skip(f"reference data not present: {path}")
    return path


def _vec(**values: float) -> np.ndarray:
    v = np.zeros(61, dtype=np.float32)
    for name, x in values.items():
        v[INDEX[name]] = x
    return v


def _script(sid: str = "s1", k: int = 2, **kw) -> Script:
    kfs = tuple(
        Keyframe(
            index=i,
            descriptions={"original": f"keyframe {i} of {sid}", "arkit": f"JawOpen {i / 10}"},
            values=_vec(JawOpen=i / 10, HeadYaw=-i / 10),
        )
        for i in range(1, k + 1)
    )
    fields = dict(script_id=sid, actor="actor01", background="A waiter waits.", emotion="Quiet sadness.")
    fields.update(kw)
    return Script(keyframes=kfs, **fields)


def _user(descs, background="B.", emotion="E.", target="Two", task=True) -> str:
    lines = ["Keyframe Description Sequence:"]
    lines += [f"- Keyframe {NUMBER_WORDS[i]}: {d}" for i, d in enumerate(descs)]
    lines += ["", f"Background: {background}", f"Emotion: {emotion}"]
    if task:
        lines += ["", f"Task Instruction: Generate the facial expression parameters for Keyframe {target}."]
    return "\n".join(lines)


def _answer(k_word: str, values: np.ndarray) -> str:
    body = {name: round(float(x), 2) for name, x in zip(CHANNELS, values)}
    return json.dumps({f"Keyframe_{k_word.lower()}": body}, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


def test_data_error_is_the_cli_user_error():
    assert issubclass(DataError, emoava.DataError)


def test_keyframe_and_script_validate_on_construction():
    kf = Keyframe(index=1, descriptions={"image": "a smile", "original": "smiles"}, values=[0.0] * 61)
    assert kf.values.dtype == np.float32 and not kf.values.flags.writeable
    assert list(kf.descriptions) == ["original", "image"]  # canonical annotation order
    with pytest.raises(DataError, match="missing the 'original' description"):
        Keyframe(index=1, descriptions={"arkit": "x"}, values=np.zeros(61))
    with pytest.raises(DataError, match="unknown annotation 'video'"):
        Keyframe(index=1, descriptions={"original": "x", "video": "y"}, values=np.zeros(61))
    with pytest.raises(DataError, match=r"descriptions\.original: expected a string"):
        Keyframe(index=1, descriptions={"original": 3}, values=np.zeros(61))
    with pytest.raises(DataError, match="expected 61 channel values"):
        Keyframe(index=1, descriptions={"original": "x"}, values=np.zeros(60))
    with pytest.raises(DataError, match=r"values\[52\] \(HeadYaw\) = -1.5 is out of range"):
        Keyframe(index=1, descriptions={"original": "x"}, values=_vec(HeadYaw=-1.5))
    with pytest.raises(DataError, match="index must be an integer >= 1"):
        Keyframe(index=0, descriptions={"original": "x"}, values=np.zeros(61))
    with pytest.raises(DataError, match=r"keyframes\[1\]\.index is 3, expected 2"):
        Script("s", "a", "", "", (kf, Keyframe(index=3, descriptions={"original": "x"}, values=np.zeros(61))))
    with pytest.raises(DataError, match="expected 1 to 5 keyframes, got 0"):
        Script("s", "a", "", "", ())
    with pytest.raises(DataError, match="script_id must be a non-empty string"):
        Script("", "a", "", "", (kf,))


def test_equality_compares_values():
    assert _script() == _script()
    other = _script()
    changed = Keyframe(
        index=2, descriptions=dict(other.keyframes[1].descriptions), values=_vec(JawOpen=0.21, HeadYaw=-0.2)
    )
    assert Script(other.script_id, other.actor, other.background, other.emotion, (other.keyframes[0], changed)) != other
    np.testing.assert_array_equal(_script(k=3).values[:, INDEX["JawOpen"]], np.float32([0.1, 0.2, 0.3]))


def test_keyframe_text_is_emotion_then_description():
    s = _script()
    assert keyframe_text(s, 2) == "Quiet sadness. keyframe 2 of s1"
    assert keyframe_text(s, 1, "arkit") == "Quiet sadness. JawOpen 0.1"
    assert keyframe_text(_script(emotion=""), 1) == "keyframe 1 of s1"
    with pytest.raises(DataError, match="no 'image' description"):
        keyframe_text(s, 1, "image")
    with pytest.raises(DataError, match="keyframe 3 out of range 1..2"):
        keyframe_text(s, 3)


# --------------------------------------------------------------------------------------------
# Dataset directories
# --------------------------------------------------------------------------------------------


def test_write_load_round_trip_and_meta(tmp_path):
    splits = {"train": [_script("a", 1), _script("b", 3)], "val": [_script("c", 2)], "test": [_script("d", 5)]}
    summary = write_dataset(tmp_path / "ds", splits, {"source": "synthetic", "params": {"seed": 0}})
    for name, scripts in splits.items():
        assert load_split(tmp_path / "ds", name) == scripts
    assert load_dataset(tmp_path / "ds") == splits
    meta = load_meta(tmp_path / "ds")
    assert meta["format"] == FORMAT and meta["channels"] == list(CHANNELS)
    assert meta["splits"] == {"train": 2, "val": 1, "test": 1}
    assert meta["annotations"] == ["original", "arkit"] and meta["source"] == "synthetic"
    assert summary == validate_dir(tmp_path / "ds")
    assert summary["total"]["keyframes_per_script"] == {"1": 1, "2": 1, "3": 1, "4": 0, "5": 1}
    assert summary["total"]["keyframes"] == 11
    assert summary["total"]["mean_active_channels"] == 2.0  # JawOpen and HeadYaw, |v| >= 0.05
    assert summary["splits"]["train"]["scripts"] == 2 and summary["splits"]["train"]["mean_keyframes"] == 2.0


def test_files_are_byte_stable_sorted_and_rounded(tmp_path):
    kf = Keyframe(
        index=1,
        descriptions={"original": "Zoë lächelt 😀"},
        values=_vec(JawOpen=0.123456, HeadYaw=-0.00001, EyeBlinkLeft=0.2),
    )
    s = Script("x", "a", "bg", "em", (kf,))
    write_dataset(tmp_path / "one", {"train": [s]}, {"source": "test"})
    write_dataset(tmp_path / "two", {"train": [s]}, {"source": "test"})
    for name in ("train.jsonl", "meta.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    line = (tmp_path / "one" / "train.jsonl").read_text(encoding="utf-8")
    assert line.endswith("}\n") and line.count("\n") == 1 and "Zoë lächelt 😀" in line
    assert line.startswith('{"actor":"a","background":"bg","emotion":"em","keyframes":[{"descriptions":')
    values = json.loads(line)["keyframes"][0]["values"]
    assert values[INDEX["JawOpen"]] == 0.1235 and values[INDEX["EyeBlinkLeft"]] == 0.2
    assert '"values":[0.2,' in line and "-0.0" not in line  # -0.00001 rounds to 0.0, not -0.0
    assert values[INDEX["HeadYaw"]] == 0.0


def test_write_is_atomic_and_replaces_an_existing_dataset(tmp_path):
    out = tmp_path / "ds"
    write_dataset(out, {"train": [_script("a")]}, {"source": "v1"})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match="duplicate script_id 'a' in train\\[0\\] and val\\[0\\]"):
        write_dataset(out, {"train": [_script("a")], "val": [_script("a")]}, {"source": "v2"})
    with pytest.raises(DataError, match="extra_meta may not set 'splits'"):
        write_dataset(out, {"train": [_script("b")]}, {"splits": 3})
    with pytest.raises(DataError, match="not JSON-serialisable"):
        write_dataset(out, {"train": [_script("b")]}, {"when": object()})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    write_dataset(out, {"train": [_script("b")], "test": [_script("c")]}, {"source": "v2"})
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.jsonl", "train.jsonl"]
    assert load_meta(out)["source"] == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary leftovers


def _good_line() -> dict:
    return {
        "script_id": "s9",
        "actor": "a",
        "background": "b",
        "emotion": "e",
        "keyframes": [
            {"index": 1, "descriptions": {"original": "one"}, "values": [0.0] * 61},
            {"index": 2, "descriptions": {"original": "two"}, "values": [0.0] * 61},
        ],
    }


def _set(path, value):
    def mutate(obj):
        target = obj
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (
            _set(["keyframes", 1, "values"], [0.0] * 60),
            r"train\.jsonl:2: keyframes\[1\]\.values: expected 61 channel values",
        ),
        (
            _set(["keyframes", 0, "values", 17], 1.5),
            r"train\.jsonl:2: keyframes\[0\]\.values\[17\] \(JawOpen\) = 1\.5 is out of range",
        ),
        (
            _set(["keyframes", 0, "values", 3], float("nan")),
            r"train\.jsonl:2: keyframes\[0\]\.values\[3\] \(EyeLookOutLeft\): non-finite",
        ),
        (
            _set(["keyframes", 0, "values", 3], "0.1"),
            r"train\.jsonl:2: keyframes\[0\]\.values\[3\] \(EyeLookOutLeft\): expected a number",
        ),
        (_set(["keyframes"], []), r"train\.jsonl:2: field 'keyframes': expected 1 to 5 keyframes, got 0"),
        (
            _set(["keyframes", 0, "descriptions", "original"], 7),
            r"train\.jsonl:2: keyframes\[0\]\.descriptions\.original: expected a string",
        ),
        (
            _set(["keyframes", 1, "descriptions"], {"arkit": "x"}),
            r"train\.jsonl:2: keyframes\[1\]\.descriptions: missing the 'original'",
        ),
        (_set(["keyframes", 1, "index"], 3), r"train\.jsonl:2: keyframes\[1\]\.index is 3, expected 2"),
        (_set(["emotion"], None), r"train\.jsonl:2: field 'emotion' must be a string"),
        (lambda obj: obj.pop("actor"), r"train\.jsonl:2: missing field 'actor'"),
        (_set(["extra"], 1), r"train\.jsonl:2: unknown field 'extra'"),
    ],
)
def test_validate_dir_errors_name_file_line_and_field(tmp_path, mutate, needle):
    out = tmp_path / "ds"
    write_dataset(out, {"train": [_script("s1"), _script("s2")]}, {})
    lines = (out / "train.jsonl").read_text().split("\n")
    obj = _good_line()
    mutate(obj)
    lines[1] = json.dumps(obj)
    (out / "train.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataError, match=needle):
        validate_dir(out)


def test_validate_dir_cross_file_checks(tmp_path):
    out = tmp_path / "ds"
    write_dataset(out, {"train": [_script("s1")], "val": [_script("s2")]}, {})
    val = out / "val.jsonl"
    val.write_text(val.read_text().replace('"s2"', '"s1"'))
    with pytest.raises(DataError, match=r"val\.jsonl: script 1 \('s1'\) also appears in train\.jsonl"):
        validate_dir(out)

    write_dataset(out, {"train": [_script("s1"), _script("s2")]}, {})
    train = out / "train.jsonl"
    train.write_text(train.read_text().split("\n")[0] + "\n")
    with pytest.raises(DataError, match=r"1 scripts, but meta\.json field 'splits\.train' says 2"):
        validate_dir(out)

    write_dataset(out, {"train": [_script("s1"), _script("s2")]}, {})
    train.write_text(train.read_text().replace('"s2"', '"s1"'))
    with pytest.raises(DataError, match=r"train\.jsonl:2: field 'script_id': duplicate 's1' \(first on line 1\)"):
        validate_dir(out)

    write_dataset(out, {"train": [_script("s1")]}, {})
    meta = json.loads((out / "meta.json").read_text())
    meta["channels"][3] = "EyeLookOut"
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"meta\.json: field 'channels\[3\]' is 'EyeLookOut'"):
        validate_dir(out)
    meta["channels"][3] = CHANNELS[3]
    meta["annotations"] = ["original"]
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="annotation 'arkit' not listed"):
        validate_dir(out)
    (out / "train.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"train\.jsonl:1: invalid JSON"):
        load_split(out, "train")
    with pytest.raises(DataError, match="missing"):
        load_meta(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------
# Release: chat requests
# --------------------------------------------------------------------------------------------


def test_parse_request_hand_built():
    msgs = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": _user(["Eyes down.", "A small smile."], "A room.", "Calm.", "Two")},
    ]
    assert parse_request(msgs) == {
        "system": SYSTEM,
        "descriptions": ["Eyes down.", "A small smile."],
        "background": "A room.",
        "emotion": "Calm.",
        "target": 2,
    }
    # digits, no system prompt, no task line (the Target Frame Instruction ablation)
    user = (
        _user(["x", "y", "z"], task=False)
        .replace("Keyframe One", "Keyframe 1")
        .replace("Keyframe Three", "Keyframe three")
    )
    got = parse_request([{"role": "user", "content": user}])
    assert got["system"] is None and got["target"] is None and got["descriptions"] == ["x", "y", "z"]


@pytest.mark.parametrize(
    "content, needle",
    [
        (
            _user(["a", "b"]).replace("Keyframe Two:", "Keyframe Three:"),
            "user message line 3: Keyframe Three out of order",
        ),
        (_user(["a"]).replace("Background: B.\n", ""), "missing 'Background:' line"),
        (_user(["a"]).replace("Emotion: E.\n", ""), "missing 'Emotion:' line"),
        (_user(["a"]).replace("Keyframe One", "Keyframe Six"), "unknown keyframe number 'Six'"),
        (_user(["a", "b"], target="Four"), "targets keyframe 4, but the sequence has 2 keyframes"),
        (_user(["a"]) + "\nPS: thanks", "unexpected text 'PS: thanks'"),
        ("Describe a face", "user message line 1: expected 'Keyframe Description Sequence:'"),
        (_user(["a"]).replace("- Keyframe One: a\n", ""), "no '- Keyframe One: ...' lines"),
    ],
)
def test_parse_request_errors(content, needle):
    with pytest.raises(DataError, match=needle) as exc:
        parse_request([{"role": "user", "content": content}], where="req.jsonl:4")
    assert str(exc.value).startswith("req.jsonl:4: ")


def test_parse_request_release_example():
    lines = [json.loads(x) for x in _release("example.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    first, second = (parse_request(x["messages"]) for x in lines)
    assert first["target"] == 1 and second["target"] == 2
    assert first["descriptions"] == second["descriptions"] and len(first["descriptions"]) == 2
    assert first["descriptions"][0].startswith("The gaze is lowered, the inner brows lift slightly")
    assert first["background"] == "A student waits outside an interview room and tries to hide their anxiety."
    assert first["emotion"] == "Anxiety concealed by a restrained smile."
    assert first["system"].startswith("You are a professional facial animator.")


def test_last_json_object():
    assert _last_json_object('noise {"a": 1} more {"b": {"c": "}{"}} tail') == {"b": {"c": "}{"}}
    assert _last_json_object('```json\n{"Keyframe_one": {"x": 1}}\n```') == {"Keyframe_one": {"x": 1}}
    assert _last_json_object("no json here") is None
    assert _last_json_object('{"a": 1') is None
    assert _last_json_object("[1, 2]") is None


def test_import_release_example_matches_csv(tmp_path):
    req, res, csv = _release("example.jsonl"), _release("example_result.jsonl"), _release("example_result.csv")
    scripts = import_chat_jsonl(req, res)
    assert len(scripts) == 1
    s = scripts[0]
    assert [kf.index for kf in s.keyframes] == [1, 2] and s.actor == "unknown"
    assert s.emotion == "Anxiety concealed by a restrained smile."
    _, rows = read_llf_csv(csv)
    np.testing.assert_array_equal(s.values, rows)
    out = tmp_path / "kf.csv"
    write_llf_csv(s.values, out)
    assert out.read_bytes() == csv.read_bytes()
    # the CSV importer with the request's texts gives the same script (same id: same texts)
    texts = [kf.descriptions["original"] for kf in s.keyframes]
    assert import_llf_csv(csv, descriptions=texts, background=s.background, emotion=s.emotion) == s
    # and the dataset format holds it
    write_dataset(tmp_path / "ds", {"test": scripts}, {"source": "release"})
    assert load_split(tmp_path / "ds", "test") == scripts


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _chat_files(tmp_path, answers, descs=("d1", "d2"), targets=("One", "Two")):
    reqs = [
        {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _user(list(descs), target=t)}]}
        for t in targets
    ]
    return _write_jsonl(tmp_path / "req.jsonl", reqs), _write_jsonl(tmp_path / "res.jsonl", answers)


def test_import_groups_scripts_and_reads_assistant_messages(tmp_path):
    v1, v2, v3 = _vec(JawOpen=0.3), _vec(HeadYaw=-0.4), _vec(BrowInnerUp=0.5)
    reqs = [
        {"messages": [{"role": "user", "content": _user(["a", "b"], target="Two")}]},
        {"messages": [{"role": "user", "content": _user(["solo"], target="One")}]},
        {"messages": [{"role": "user", "content": _user(["a", "b"], target="One")}]},
    ]
    answers = [
        {"response": "Sure! " + _answer("Two", v2)},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": _answer("one", v3)}]},
        {"response": json.dumps({name: float(x) for name, x in zip(CHANNELS, v1)})},  # bare mapping
    ]
    req = _write_jsonl(tmp_path / "req.jsonl", reqs)
    res = _write_jsonl(tmp_path / "res.jsonl", answers)
    scripts = import_chat_jsonl(req, res, annotation="arkit", actor="actor07")
    assert [len(s.keyframes) for s in scripts] == [2, 1]
    np.testing.assert_array_equal(scripts[0].values, np.stack([v1, v2]))
    np.testing.assert_array_equal(scripts[1].values, v3[None])
    assert scripts[0].keyframes[0].descriptions == {"original": "a", "arkit": "a"}
    assert scripts[0].actor == "actor07" and scripts[0].script_id != scripts[1].script_id
    assert scripts[0].script_id.startswith("kf-") and len(scripts[0].script_id) == 15


def test_import_errors_name_file_and_line(tmp_path):
    good = [{"response": _answer("One", _vec())}, {"response": _answer("Two", _vec())}]
    req, res = _chat_files(tmp_path, good)
    assert len(import_chat_jsonl(req, res)) == 1

    bad = [{"response": _answer("One", _vec())}, {"response": _answer("Two", _vec(MouthClose=2.0))}]
    req, res = _chat_files(tmp_path, bad)
    with pytest.raises(DataError, match=r"res\.jsonl:2: channel 'MouthClose' = 2\.0 is out of range"):
        import_chat_jsonl(req, res)

    wrong = [{"response": _answer("One", _vec())}, {"response": _answer("Three", _vec())}]
    req, res = _chat_files(tmp_path, wrong)
    with pytest.raises(
        DataError, match=r"res\.jsonl:2: field 'Keyframe_three' answers keyframe 3, but the request asks for keyframe 2"
    ):
        import_chat_jsonl(req, res)

    req, res = _chat_files(tmp_path, good[:1], targets=("One",))
    with pytest.raises(DataError, match="has no answer for keyframe 2"):
        import_chat_jsonl(req, res)

    req, res = _chat_files(tmp_path, good[:1])
    with pytest.raises(DataError, match=r"res\.jsonl: 1 answers for 2 requests"):
        import_chat_jsonl(req, res)

    req, res = _chat_files(tmp_path, [good[0], {"response": "I cannot do that."}])
    with pytest.raises(DataError, match=r"res\.jsonl:2: the answer contains no JSON object"):
        import_chat_jsonl(req, res)

    req, res = _chat_files(tmp_path, [good[0], good[0]], targets=("One", "One"))
    with pytest.raises(DataError, match=r"res\.jsonl:2: second answer for keyframe 1"):
        import_chat_jsonl(req, res)

    missing = json.loads(good[1]["response"])
    del missing["Keyframe_two"]["TongueOut"]
    req, res = _chat_files(tmp_path, [good[0], {"response": json.dumps(missing)}])
    with pytest.raises(DataError, match=r"res\.jsonl:2: missing channel 'TongueOut'"):
        import_chat_jsonl(req, res)


def test_import_llf_csv_hand_built(tmp_path):
    rows = np.stack([_vec(JawOpen=0.5), _vec(HeadRoll=-0.25)])
    write_llf_csv(rows, tmp_path / "t.csv")
    s = import_llf_csv(
        tmp_path / "t.csv",
        descriptions=["open", {"original": "tilt", "image": "a tilted head"}],
        background="bg",
        emotion="em",
        script_id="take-1",
        actor="a3",
    )
    assert s.script_id == "take-1" and s.actor == "a3"
    np.testing.assert_array_equal(s.values, rows)
    assert s.keyframes[1].descriptions == {"original": "tilt", "image": "a tilted head"}
    with pytest.raises(DataError, match="2 keyframe rows but 1 descriptions"):
        import_llf_csv(tmp_path / "t.csv", descriptions=["x"])
