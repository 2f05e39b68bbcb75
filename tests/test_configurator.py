"""
Settings as every script reads them (soft_tokenizer.configurator), in-process: --help, config
files, --key=value and the one sentence a mistake ends in. How a script prints that sentence
and exits is checked once, in a subprocess, in test_errors.py.
"""
import ast

import pytest

from helpers import REPO
from soft_tokenizer.configurator import SCRIPTS, UserError, check, configure, settings_of

SETTINGS = {"model": "smollm2", "batch_size": 64, "learning_rate": 1e-3, "compile": True, "log_file": "", "PAD": 258}


def script_globals(script):
    """What a script's configure(globals()) sees, without running the script: its settings' values."""
    source = (REPO / script).read_text()
    values = {"__file__": str(REPO / script), "__doc__": ast.get_docstring(ast.parse(source))}
    for node in settings_of(source):
        for target in node.targets:
            try:
                values[target.id] = ast.literal_eval(node.value)
            except ValueError:  # computed defaults (2**18, a choice by device): their name is what --help shows
                values[target.id] = None
    return values


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_docstring_and_every_setting(script, capsys):
    config = script_globals(script)
    with pytest.raises(SystemExit) as stop:
        configure(config, ["--help"])
    assert stop.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith(config["__doc__"].strip()[:60])
    names = [k for k in config if not k.startswith("_")]
    assert len(names) >= 3
    for name in names:
        assert f"\n{name} = " in shown, name


def test_overrides_keep_the_type_of_the_default():
    config = dict(SETTINGS)
    configure(config, ["--batch_size=128", "--learning_rate=3e-4", "--compile=False", "--log_file=run.jsonl"])
    assert config == {**SETTINGS, "batch_size": 128, "learning_rate": 3e-4, "compile": False, "log_file": "run.jsonl"}
    assert isinstance(config["batch_size"], int) and isinstance(config["learning_rate"], float)


def test_a_config_file_sets_what_a_script_declares(tmp_path):
    config_file = tmp_path / "recipe.py"
    config_file.write_text("batch_size = 32\nmax_seconds = 60.0  # another script's option: allowed, not applied here\n")
    config = dict(SETTINGS)
    configure(config, [str(config_file), "--batch_size=16"])
    assert config["batch_size"] == 16 and "max_seconds" not in config


@pytest.mark.parametrize("argv, words", [
    (["--no_such_option=1"], ["unknown option --no_such_option=1", "batch_size", "model"]),
    (["--batch_size=many"], ["--batch_size takes a number, not 'many'"]),
    (["--compile=maybe"], ["--compile takes True or False"]),
    (["config/nope.py"], ["config file config/nope.py does not exist"]),
])
def test_a_mistake_is_one_sentence(argv, words):
    with pytest.raises(UserError) as error:
        configure(dict(SETTINGS), argv)
    for word in words:
        assert word in str(error.value)
    assert "PAD" not in str(error.value)  # a constant is never offered as an option


@pytest.mark.parametrize("source, words", [("batch_sise = 32\n", ["sets batch_sise, which no script declares"]),
                                           ("batch_size = 1 / 0\n", ["failed to run (ZeroDivisionError"])])
def test_a_bad_config_file_is_one_sentence(source, words, tmp_path):
    config_file = tmp_path / "recipe.py"
    config_file.write_text(source)
    with pytest.raises(UserError) as error:
        configure(dict(SETTINGS), [str(config_file)])
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("value, bounds, ok", [(0, {"low": 0}, True), (0, {"low": 0, "low_open": True}, False),
                                               (float("nan"), {"low": 0}, False), (1.0, {"low": 0, "high": 1, "high_open": True}, False)])
def test_check_ranges(value, bounds, ok):
    if ok:
        check({"x": value}, "x", **bounds)
    else:
        with pytest.raises(UserError, match="x=.* is out of range"):
            check({"x": value}, "x", **bounds)
