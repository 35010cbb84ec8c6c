"""The bench CLIs' --help: every flag says what it does, and the defaults are shown. bench.speed's bad values are
usage errors (exit 2) before anything is built."""

import argparse

import pytest

from bench import digits, speed, voc

PARSERS = {"bench.speed": speed.parser, "bench.voc": voc.build_parser, "bench.digits": digits.build_parser}


@pytest.mark.parametrize("name", list(PARSERS))
def test_every_flag_has_help_and_help_shows_defaults(name, capsys):
    parser = PARSERS[name]()
    missing = [a.option_strings[0] for a in parser._actions
               if a.option_strings and a.help != argparse.SUPPRESS and not a.help]
    assert missing == []
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "(default:" in text
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: True)" not in text


@pytest.mark.parametrize("flags, message", [
    (["--classes", "0"], "--classes: expected an integer >= 1"),
    (["--repeats", "0"], "--repeats: expected an integer >= 1"),
    (["--batch", "0"], "--batch: expected an integer >= 1"),
    (["--size", "-3"], "--size: expected an integer >= 1"),
    (["--warmup", "-1"], "--warmup: expected an integer >= 0"),
    (["--model", "resnet500"], "not a torchvision model name"),
    (["--json", "/no/such/folder/out.json"], "does not exist"),
])
def test_speed_bad_values_are_usage_errors(flags, message, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("bench.speed started work on a bad command line")

    monkeypatch.setattr(speed, "run", never)
    with pytest.raises(SystemExit) as exit_info:
        speed.main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
