"""The `stg` command line. Thin by design: parse arguments, call the library, print.

Every user mistake is a `UserError`: exit code 2, one line on stderr, no traceback unless
`--debug`. Heavy imports happen inside commands so `stg --help` answers fast.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

import click

from . import __version__
from .errors import UserError


class _State:
    debug = False


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"stg: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stg")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug: bool) -> None:
    """Spatio-temporal video grounding: when and where is what the sentence describes."""
    _State.debug = debug


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: maps library errors to exit codes."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="stg", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("stg: aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except UserError as e:
        if debug:
            traceback.print_exc()
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        click.echo("stg: interrupted", err=True)
        sys.exit(130)




@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Training config (TOML); see examples/train-tiny.toml.")
@click.option("--resume", is_flag=True, help="Continue from OUT_DIR/checkpoint.")
def train(config_path: Path, resume: bool) -> None:
    """Train a SpaceVLLM model on shapes-world clips drawn on the fly."""
    from .train import TrainConfig, train as run

    final = run(TrainConfig.from_toml(config_path), resume=resume)
    click.echo(f"model written to {final}")
