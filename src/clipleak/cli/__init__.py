"""The ``clipleak`` command line, a thin layer over :mod:`clipleak.api`.

One file per command group (:mod:`.attack`: the data path; :mod:`.train`: targets and priors;
:mod:`.privacy`: the DP accountant). Exit codes a script can trust: 0 only for a finished run; 2 for a
user error (:class:`~clipleak.errors.ClipleakError`, a bad option, a file that cannot be read or written:
one line, no traceback unless ``clipleak --debug``); 130 for Ctrl-C, with one line saying what the run
kept and how to resume it.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from typing import Annotated

import torch
import typer
from rich.text import Text

from .. import __version__
from ..errors import ClipleakError
from . import attack, audit, fl, privacy, train
from .common import Interrupted, console, helptext

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

_debug = False

app = typer.Typer(
    name="clipleak",
    help=helptext("""How much do CLIP federated-learning updates leak about a client's images?

    Example: clipleak demo --out runs/demo"""),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
attack.register(app)
train.register(app)
privacy.register(app)
audit.register(app)
fl.register(app)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="print the version and exit")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show the traceback of an error (put it before the "
                                        "command: clipleak --debug attack ...)")] = False,
) -> None:
    global _debug
    _debug = debug
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def quiet_warnings() -> None:
    """Silence the warnings a user cannot act on, each by its category, message and the module that raises
    it (every other warning still shows): torch deprecates ``torch.jit.script``, which open_clip's and
    timm's ViT code paths still call."""
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script(_method)?` is (deprecated|not supported)",
                            category=FutureWarning, module=r"torch\.jit\._script")


def _error(text: str) -> int:
    if _debug:
        traceback.print_exc()
    console.print(Text.assemble(("error: ", "red"), text), soft_wrap=True, highlight=False)
    return EXIT_USER_ERROR


def _interrupted(text: str) -> int:
    if _debug:
        traceback.print_exc()
    console.print(Text.assemble(("interrupted: ", "yellow"), text), soft_wrap=True, highlight=False)
    return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """Console entry point: 0 for a finished run, 2 for a user error (one line on stderr), 130 for Ctrl-C
    (one line: what was kept, how to resume)."""
    import click

    global _debug
    _debug = False
    quiet_warnings()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        rv = app(args=argv, standalone_mode=False)
    except ClipleakError as e:
        return _error(str(e))
    except Interrupted as e:
        return _interrupted(str(e))
    except (KeyboardInterrupt, typer.Abort, click.exceptions.Abort):
        return _interrupted("nothing was kept; rerun the command to start over")
    except click.exceptions.ClickException as e:  # usage errors: a bad option or value
        e.show()
        return EXIT_USER_ERROR
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except OSError as e:  # a file the user named cannot be read or written (permissions, a full disk, ...)
        where = f": {e.filename}" if e.filename else ""
        return _error(f"{e.strerror or e}{where}")
    if rv == EXIT_INTERRUPTED:  # typer turns a Ctrl-C outside a command (e.g. while parsing) into 130
        return _interrupted("nothing was kept; rerun the command to start over")
    return rv if isinstance(rv, int) else 0


__all__ = ["app", "main"]


if __name__ == "__main__":
    sys.exit(main())
