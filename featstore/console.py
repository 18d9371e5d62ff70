"""How the command-line tools end: one ``error: …`` line and an exit code, never a traceback
(unless ``--debug``). Shared by ``featstore`` and ``probe``."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections import Counter

import click

from .errors import FeatstoreError


class OptionsOnce(click.Command):
    """A command that refuses an option given twice when it takes one value: click would keep the
    last silently (``--model a --model b`` extracting b alone, a dropped without a word)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if ctx.resilient_parsing:  # shell completion: nothing is run, nothing to refuse
            return super().parse_args(ctx, args)
        # click's parser lists a parameter each time it is seen; repeatable options and counters are left alone
        _, _, seen = self.make_parser(ctx).parse_args(args=list(args))
        for param, times in Counter(seen).items():
            # --help / --version act as they are read: twice is harmless
            if isinstance(param, click.Option) and not (param.multiple or param.count or param.is_eager) and times > 1:
                names = "/".join([*param.opts, *param.secondary_opts])
                listed = (param.metavar or "").strip("[]") in ("LIST", "GRID") or "comma" in (param.help or "").lower()
                fix = "pass its values once, as one comma-separated list" if listed else "pass it once"
                raise click.UsageError(f"{names} given {times} times; it takes one value ({fix})", ctx)
        return super().parse_args(ctx, args)


class OneLineErrors(click.Group):
    """A click group whose ``main`` reports every failure as one line and exits with its code, and
    whose commands refuse a single-value option given twice (:class:`OptionsOnce`)."""

    interrupted = "interrupted"
    out_of_memory = "use less memory: a smaller --batch-size"
    command_class = OptionsOnce

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        sys.exit(run_cli(self, prog_name or self.name, args))

    # click turns a closed pipe into exit 1 on its own; caught before it (--help is printed while
    # the context is made, a command's output while it is invoked), it ends as a closed pipe does
    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except BrokenPipeError:
            raise click.exceptions.Exit(closed_pipe_exit()) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise click.exceptions.Exit(closed_pipe_exit()) from None


def run_cli(group: click.Group, prog_name: str | None, args: list[str] | None = None) -> int:
    """Run ``group`` on ``args``; return the exit code after printing any error as ``error: …``."""
    args = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in args or os.environ.get("FEATSTORE_DEBUG") == "1"
    try:
        # ctx.obj["argv"]: the command line as typed, for the records that repeat a run (probe's protocol.json)
        argv = [prog_name or group.name or "", *args]
        result = click.Group.main(group, args=args, prog_name=prog_name, standalone_mode=False, obj={"argv": argv})
        return result if isinstance(result, int) else 0
    except FeatstoreError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {e.one_line()}", err=True)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        # usage mistakes: one line naming the problem, pointing to --help (exit 2)
        if debug:
            traceback.print_exc()
        command = next((a for a in args if a in group.commands), None)  # e.ctx is not always set
        sub = f" {command}" if command else ""
        message = " ".join(e.format_message().split())
        click.echo(f"error: {message} (see `{prog_name}{sub} --help`)", err=True)
        return e.exit_code
    except BrokenPipeError:
        return closed_pipe_exit()
    except (KeyboardInterrupt, click.Abort):
        click.echo(f"error: {getattr(group, 'interrupted', 'interrupted')}", err=True)
        return 130
    except Exception as e:  # a bug or an unexpected environment problem: still one line by default
        if debug:
            traceback.print_exc()
        if out_of_memory(e):
            click.echo(
                f"error: out of memory ({' '.join(str(e).split())[:200]}) ({getattr(group, 'out_of_memory', 'use less memory')})", err=True
            )
            return 1
        click.echo(
            f"error: unexpected {type(e).__name__}: {' '.join(str(e).split())[:500]} (rerun with --debug for the traceback)", err=True
        )
        return 1


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation that failed: Python's MemoryError, torch's CUDA OutOfMemoryError,
    or the RuntimeError of its CPU allocator (matched by name and text: this module imports no torch)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and ("DefaultCPUAllocator: can't allocate memory" in str(e) or "CUDA out of memory" in str(e))


def closed_pipe_exit() -> int:
    """The reader of stdout went away (``probe compare … | head``): end as ``cat`` or ``yes`` do,
    silently with 128 + SIGPIPE. Python ignores SIGPIPE, so the write raised instead of killing
    the process; stdout is pointed at /dev/null so that the interpreter's final flush of the
    unwritten buffer does not print "Exception ignored … BrokenPipeError" on the way out."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (a test runner's stream): nothing to flush later
        pass
    return 128 + signal.SIGPIPE


def parse_triple(ctx, param, value):
    """Click callback: '0.5,0.5,0.5' → (0.5, 0.5, 0.5)."""
    if value is None:
        return None
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not three comma-separated numbers, e.g. 0.485,0.456,0.406") from None
    if len(parts) != 3:
        raise click.BadParameter(f"needs 3 values (R,G,B), got {len(parts)}")
    return parts
