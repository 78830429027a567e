import pytest

from rayfarm import InvalidSpec, parse_frames
from rayfarm.frames import MAX_FRAME, MAX_FRAMES_PER_JOB


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("1-8", [1, 2, 3, 4, 5, 6, 7, 8]),
        ("1,3,5-7", [1, 3, 5, 6, 7]),
        ("1-20x5", [1, 6, 11, 16]),
        ("1-10x3,20,30-40x5", [1, 4, 7, 10, 20, 30, 35, 40]),
        ("7", [7]),
        (7, [7]),
        ("0", [0]),
        (" 3 , 1-2 ", [1, 2, 3]),
        ("5,5,4-6", [4, 5, 6]),
        (f"{MAX_FRAME}", [MAX_FRAME]),
    ],
)
def test_parse_valid(spec, expected):
    assert parse_frames(spec) == expected


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("", "empty"),
        ("8-1", "backwards"),
        ("1-10x0", "step"),
        ("a-b", "is not N"),
        ("1-", "is not N"),
        ("-3", "is not N"),
        ("1,,2", "is not N"),
        ("1.5", "is not N"),
        (f"1-{MAX_FRAME + 1}", "maximum frame"),
        (f"0-{MAX_FRAMES_PER_JOB}", "more than"),
        ("1" * 5000, "longer than"),
        (True, "boolean"),
        (None, "must be a string"),
    ],
)
def test_parse_invalid(spec, fragment):
    with pytest.raises(InvalidSpec) as err:
        parse_frames(spec)
    assert fragment in str(err.value)
