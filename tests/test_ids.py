import pytest

from stores.ids import MAX_ID_BYTES, check_id, id_problem, safe_component


@pytest.mark.parametrize("value", ["v001", "4010069381", "clip-1_a", "é" * 100, "a" * 200])
def test_valid_ids_pass(value):
    assert id_problem(value) is None
    assert check_id(value) == value


@pytest.mark.parametrize(
    "value, reason",
    [
        ("a/b", "'/'"),
        ("a\\b", "'\\'"),
        ("..", "'..'"),
        ("x..y", "'..'"),
        ("bad\x00id", "control"),
        ("tab\tid", "control"),
        ("bell\x07", "control"),
        ("", "empty"),
        (" padded", "whitespace"),
        ("a" * 201, "200 bytes"),
        ("é" * 101, "200 bytes"),  # 202 bytes of UTF-8
        (42, "string"),
    ],
)
def test_unsafe_ids_are_refused_with_the_reason(value, reason):
    problem = id_problem(value)
    assert problem is not None and reason in problem
    with pytest.raises(ValueError, match="video id"):
        check_id(value, what="video id")


def test_dots_are_refused_only_where_they_split_webdataset_keys():
    assert id_problem("clip.v2") is None
    assert "'.'" in id_problem("clip.v2", allow_dot=False)


@pytest.mark.parametrize("stem", ["a/b.c", "x\\y", "..", "dots.in.name", "ctl\x01", "a" * 300])
def test_safe_component_always_yields_a_valid_video_id(stem):
    out = safe_component(stem)
    assert id_problem(out, allow_dot=False) is None
    assert len(out.encode()) <= MAX_ID_BYTES


def test_safe_component_keeps_the_path_readable():
    assert safe_component("cooking/day1.part2") == "cooking__day1_part2"
