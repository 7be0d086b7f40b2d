"""The ``clipleak`` command line, a thin layer over :mod:`clipleak.api`.

One file per command group (:mod:`.attack`: the data path; :mod:`.train`: targets and priors;
:mod:`.privacy`: the DP accountant). User errors (:class:`~clipleak.errors.ClipleakError`) print one
line and exit with code 2.
"""

from __future__ import annotations

import sys
from typing import Annotated

import torch
import typer
from rich.text import Text

from .. import __version__
from ..errors import ClipleakError
from . import attack, audit, fl, privacy, train
from .common import console, helptext

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
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors -> one line on stderr, exit code 2."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        app(args=argv, standalone_mode=False)
    except ClipleakError as e:
        console.print(Text.assemble(("error: ", "red"), str(e)), soft_wrap=True, highlight=False)
        return 2
    except typer.Abort:
        return 130
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return 2
        if isinstance(e, click.exceptions.Exit):
            return int(e.exit_code)
        raise
    return 0


__all__ = ["app", "main"]


if __name__ == "__main__":
    sys.exit(main())
