"""The `tlpipe` command describes every subcommand and every argument in its --help."""

import argparse
import subprocess
import sys

from tlpipe.tools import cli


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_argument_of_every_subcommand_has_a_help_text():
    commands = subcommands()
    assert set(commands) == {"compare", "lr-find", "predict", "summary"}
    for name, parser in commands.items():
        assert parser.description, name
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help and len(action.help) > 10, (name, action.dest)


def test_predict_help_describes_its_arguments():
    out = subprocess.run([sys.executable, "-m", "tlpipe.tools.cli", "predict", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for words in ("folders searched recursively", "the fine-tuned network", "most probable first",
                  "(default: preds.csv)"):
        assert words in " ".join(out.split()), words
