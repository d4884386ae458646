"""Value spans of JSON answers and their probabilities from token log-probabilities.

Every expected span below was counted by hand on the text above it; the slice check beside it
says what the span holds, so a wrong count shows up as a wrong slice too.
"""

from __future__ import annotations

import math

import pytest

from goflow_gpu.prompts.confidence import confidences, span_probability, value_spans

# -- value_spans --------------------------------------------------------------------------------


def test_flat_object_string_and_number() -> None:
    text = '{"name": "car", "n": 3}'
    # {0 "1 n2 a3 m4 e5 "6 :7 _8 "9 c10 a11 r12 "13 ,14 _15 "16 n17 "18 :19 _20 3=21 }22
    assert value_spans(text) == {("name",): (10, 13), ("n",): (21, 22)}
    assert text[10:13] == "car" and text[21:22] == "3"


def test_nested_objects_lists_and_literals() -> None:
    text = '{"a":{"b":[1,{"c":null}],"d":-0.5e-3},"e":[true,false]}'
    # {0 "1 a2 "3 :4 {5 "6 b7 "8 :9 [10 1=11 ,12 {13 "14 c15 "16 :17 null=18-21 }22 ]23 ,24
    # "25 d26 "27 :28 -0.5e-3=29-35 }36 ,37 "38 e39 "40 :41 [42 true=43-46 ,47 false=48-52 ]53 }54
    assert value_spans(text) == {
        ("a", "b", 0): (11, 12),
        ("a", "b", 1, "c"): (18, 22),
        ("a", "d"): (29, 36),
        ("e", 0): (43, 47),
        ("e", 1): (48, 53),
    }
    assert text[29:36] == "-0.5e-3" and text[48:53] == "false"


def test_escapes_stay_as_written_and_keys_are_decoded() -> None:
    text = r'{"q": "say \"hi\"", "k\u00e9": "caf\u00e9"}'
    # {0 "1 q2 "3 :4 _5 "6 s7 a8 y9 _10 \11 "12 h13 i14 \15 "16 "17 ,18 _19 "20 k21 \22 u23
    # 0=24 0=25 e26 9=27 "28 :29 _30 "31 c32 a33 f34 \35 u36 0=37 0=38 e39 9=40 "41 }42
    assert value_spans(text) == {("q",): (7, 17), ("k\u00e9",): (32, 41)}
    assert text[7:17] == r"say \"hi\"" and text[32:41] == r"caf\u00e9"


def test_a_surrogate_pair_in_a_key_is_one_character() -> None:
    text = r'{"\ud83d\ude00": 1}'
    # {0 "1 \ud83d=2-7 \ude00=8-13 "14 :15 _16 1=17 }18
    assert value_spans(text) == {("\U0001f600",): (17, 18)}


def test_whitespace_and_new_lines_around_everything() -> None:
    text = '{\n  "w" : 12 ,\n  "x":[ 1 , "y" ]\n}\n'
    # {0 \n1 _2 _3 "4 w5 "6 _7 :8 _9 1=10 2=11 _12 ,13 \n14 _15 _16 "17 x18 "19 :20 [21 _22 1=23
    # _24 ,25 _26 "27 y28 "29 _30 ]31 \n32 }33 \n34
    assert value_spans(text) == {("w",): (10, 12), ("x", 0): (23, 24), ("x", 1): (28, 29)}


def test_a_fenced_answer_gives_offsets_into_the_whole_text() -> None:
    text = '```json\n{"label": "dog"}\n```'
    # `0 `1 `2 j3 s4 o5 n6 \n7 {8 "9 label=10-14 "15 :16 _17 "18 d19 o20 g21 "22 }23 \n24 ```25
    assert value_spans(text) == {("label",): (19, 22)}
    # `0 `1 `2 \r3 \n4 {5 "6 a7 "8 :9 _10 1=11 }12 \r13 \n14 ```15
    assert value_spans('```\r\n{"a": 1}\r\n```\n') == {("a",): (11, 12)}


def test_an_empty_string_has_an_empty_span_and_empty_containers_have_none() -> None:
    # {0 "1 s2 "3 :4 "5 "6 }7
    assert value_spans('{"s":""}') == {("s",): (6, 6)}
    assert value_spans('{"o": {}, "l": []}') == {}


def test_a_repeated_key_keeps_its_last_value_like_json_loads() -> None:
    # {0 "1 a2 "3 :4 1=5 ,6 "7 a8 "9 :10 2=11 }12
    assert value_spans('{"a":1,"a":2}') == {("a",): (11, 12)}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[1, 2]",
        '"just a string"',
        '{"a": 1,}',
        '{"a": 01}',
        '{"a": 1.}',
        '{"a": .5}',
        '{"a": 1e}',
        '{"a": NaN}',
        '{"a": tru}',
        '{"a" 1}',
        "{a: 1}",
        '{"a": "x\\q"}',
        '{"a": "\\u12g4"}',
        '{"a": "line\nbreak"}',
        '{"a": "open}',
        '{"a": [1, 2}',
        '{"a": 1} and more',
        '{"a": 1}{"b": 2}',
        '```json\n{"a": 1}',
        '```json {"a": 1}\n```',
        "[" * 10 + "]" * 10,
        '{"a":' + "[" * 300 + "]" * 300 + "}",
    ],
)
def test_invalid_json_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="not a JSON object"):
        value_spans(text)


# -- span_probability ---------------------------------------------------------------------------


def test_the_tokens_inside_the_span_multiply() -> None:
    tokens = [('{"name": "', -0.1), ("ca", -0.2), ("r", -0.3), ('"}', 0.0)]
    # '{"name": "' is 10 characters, so "car" is [10, 13): tokens "ca" and "r".
    assert span_probability(tokens, 10, 13) == pytest.approx(math.exp(-0.5))
    assert span_probability(tokens, 10, 11) == pytest.approx(math.exp(-0.2))


def test_a_token_that_also_spells_a_neighbour_counts_whole() -> None:
    # '{"n":' [0,5)  '"ca' [5,8)  'r"' [8,10)  '}' [10,11); "car" is [6, 9).
    tokens = [('{"n":', -0.05), ('"ca', -0.4), ('r"', -0.1), ("}", -0.01)]
    assert span_probability(tokens, 6, 9) == pytest.approx(math.exp(-0.5))


def test_a_text_less_token_counts_with_the_next_one() -> None:
    # '{"w":"caf' [0,9), '' (the first byte of é), 'é' [9,10), '"}' [10,12), '' (the stop token)
    tokens = [('{"w":"caf', -0.2), ("", -0.7), ("é", -0.1), ('"}', -0.05), ("", -0.3)]
    assert span_probability(tokens, 6, 10) == pytest.approx(math.exp(-1.0))
    # the stop token after the text belongs to no value
    assert span_probability(tokens, 10, 12) == pytest.approx(math.exp(-0.05))


def test_a_number_span() -> None:
    tokens = [('{"', 0.0), ("n", -0.01), ('":', 0.0), ("4", -1.2), ("2", -0.3), ("}", -0.02)]
    # {0 "1 n2 "3 :4 4=5 2=6 }7
    assert span_probability(tokens, 5, 7) == pytest.approx(math.exp(-1.5))


def test_an_empty_value_takes_the_token_of_its_closing_quote() -> None:
    # '{"s":' [0,5)  '""' [5,7)  '}' [7,8); the empty value is at 6.
    tokens = [('{"s":', -0.1), ('""', -0.6), ("}", -0.2)]
    assert span_probability(tokens, 6, 6) == pytest.approx(math.exp(-0.6))
    # '{"s":"' [0,6)  '"}' [6,8): the closing quote starts the second token.
    tokens = [('{"s":"', -0.1), ('"}', -0.4)]
    assert span_probability(tokens, 6, 6) == pytest.approx(math.exp(-0.4))


def test_tokens_that_stop_short_of_the_span_give_none() -> None:
    tokens = [('{"name": "', -0.1), ("ca", -0.2)]
    assert span_probability(tokens, 10, 13) is None
    assert span_probability([], 0, 1) is None
    assert span_probability(tokens, 5, 3) is None


def test_the_result_is_not_rounded() -> None:
    tokens = [("a", -0.123456789)]
    assert span_probability(tokens, 0, 1) == math.exp(-0.123456789)


# -- confidences --------------------------------------------------------------------------------


def test_confidences_of_one_value_of_a_detection_answer() -> None:
    text = '{"objects_detected":[{"name":"car"},{"name":"bus"}]}'
    tokens = [
        ('{"objects_detected":[{"name":"', -0.3),
        ("car", -0.9),
        ('"},{"name":"', -0.01),
        ("b", -0.2),
        ("us", -0.05),
        ('"}]}', 0.0),
    ]
    assert confidences(text, tokens, ("objects_detected", 0, "name")) == pytest.approx(
        math.exp(-0.9)
    )
    assert confidences(text, tokens, ("objects_detected", 1, "name")) == pytest.approx(
        math.exp(-0.25)
    )


def test_confidences_is_none_without_usable_tokens_or_value() -> None:
    text = '{"name":"car"}'
    tokens = [('{"name":"', -0.1), ("car", -0.2), ('"}', 0.0)]
    assert confidences(text, None, ("name",)) is None
    assert confidences(text, tokens, ("nope",)) is None
    assert confidences(text, tokens, ("name", 0)) is None
    # tokens of another text: offsets would be wrong, so no answer rather than a wrong one
    assert confidences(text, [('{"name":"', -0.1), ("cab", -0.2), ('"}', 0.0)], ("name",)) is None
    with pytest.raises(ValueError, match="not a JSON object"):
        confidences("not json", tokens, ("name",))
