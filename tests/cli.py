"""A helper shared by the command-line tests (bench.py's and data.py's options)."""
import pytest


def usage_error(capsys, parse, argv):
    """The one-line argparse error that parse(argv) gets (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    return err.strip().splitlines()[-1]
