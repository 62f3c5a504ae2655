"""`kh`: images, appliances and single-node boots (more verbs join as the service grows)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from kh import boot as boot_mod
from kh.appliance import builder as appliance_builder
from kh.appliance import spec as appliance_spec
from kh.cli.bill import register as register_bill_commands
from kh.cli.common import entry, handle_errors, setup_logging, stop_on_signals
from kh.cli.fabric import register as register_fabric_commands
from kh.cli.host import register as register_host_commands
from kh.cli.lab import register as register_lab_commands
from kh.cli.outside import register as register_outside_commands
from kh.cli.service import register as register_service_commands
from kh.cli.token import register as register_token_commands
from kh.cli.topo import register as register_topo_commands
from kh.cli.usage import register as register_usage_commands
from kh.errors import UsageError
from kh.hw import framing
from kh.hw.board import parse_mem
from kh.images import build as image_build
from kh.settings import paths


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Log every command kh runs; tracebacks on errors.")
@click.option("--state-dir", type=click.Path(path_type=Path), envvar="KH_STATE_DIR",
              help="khd's state (default /var/lib/kh).")
def main(debug: bool, state_dir: Path | None) -> None:
    """kh: Project Kittyhawk's nodes, domains and control channels on one host."""
    setup_logging(debug)
    if state_dir is not None:
        os.environ["KH_STATE_DIR"] = str(state_dir)


@main.group()
def images() -> None:
    """Build and list guest images (U-Boot, kernel, PPC root, appliances)."""


@images.command("build")
@click.argument("recipes", nargs=-1)
@click.option("--force", is_flag=True, help="Rebuild even what the cache already has.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@handle_errors
def images_build(recipes: tuple[str, ...], force: bool, quiet: bool) -> None:
    """Build every image recipe and appliance (cached by content).

    With RECIPES, build just those recipes and what they depend on, and print where each
    finished build is; nothing is published.
    """
    if recipes:
        for b in image_build.build_recipes(paths(), list(recipes), force=force, quiet=quiet):
            click.echo(f"{b.name}\t{b.dir}")
        return
    published = image_build.build(paths(), force=force, quiet=quiet)
    if not quiet:
        click.echo(f"{len(published)} images in {paths().out}", err=True)


@images.command("prune")
@click.option("-n", "--dry-run", is_flag=True, help="Only show what would be removed.")
@handle_errors
def images_prune(dry_run: bool) -> None:
    """Remove cached builds that no current recipe or appliance uses."""
    gone = image_build.prune(paths(), dry_run=dry_run)
    for p in gone:
        click.echo(f"{'would remove' if dry_run else 'removed'} {p}")
    click.echo(f"{len(gone)} cache entries {'to remove' if dry_run else 'removed'}", err=True)


@images.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def images_list(as_json: bool) -> None:
    """Show each published image with its size and hash."""
    rows = image_build.listing(paths())
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"{'IMAGE':<24} {'SIZE':>10} {'HASH':<16}  RECIPE")
    for r in rows:
        size = "missing" if r.get("missing") else _human(int(str(r["size"])))
        share = f"  ({float(str(r['share'])) * 100:.2f}% of root)" if "share" in r else ""
        click.echo(f"{r['image']!s:<24} {size:>10} {r.get('sha256') or '-'!s:<16}  "
                   f"{r['recipe']}{share}")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@main.group()
def appliance() -> None:
    """Build appliances: small cpio RAM disks extracted from the PPC root."""


@appliance.command("build")
@click.argument("spec")
@click.option("--root", type=click.Path(path_type=Path),
              help="PPC root (default: images/out/root).")
@click.option("--out", type=click.Path(path_type=Path),
              help="Output directory (default: images/out).")
@handle_errors
def appliance_build(spec: str, root: Path | None, out: Path | None) -> None:
    """Build the appliance SPEC (a name from appliance-builder/specs/ or a path)."""
    p = paths()
    sp = appliance_spec.load(appliance_spec.find(spec, p.specs))
    res = appliance_builder.build(sp, root or p.out / "root", out or p.out)
    click.echo(f"{res.path}: {res.size / 1e6:.2f} MB ({res.members} members, "
               f"{res.cpio_size / 1e6:.2f} MB uncompressed), "
               f"{res.share * 100:.2f}% of the {res.root_size / 1e6:.1f} MB root")


@main.command(context_settings={"ignore_unknown_options": False,
                                "allow_interspersed_args": False})
@click.option("--appliance", default="shell", show_default=True, help="Appliance to boot.")
@click.option("--kernel", type=click.Path(path_type=Path), help="Kernel uImage.")
@click.option("--ramdisk", type=click.Path(path_type=Path), help="Ramdisk U-Boot image.")
@click.option("--bios", type=click.Path(path_type=Path), help="U-Boot ELF.")
@click.option("--mem", default="256M", show_default=True, help="Node memory.")
@click.option("--append", "append", default="", help="Extra kernel arguments (khargs).")
@click.option("--timeout", default=90.0, show_default=True,
              help="Seconds from `run kboot` to the appliance's ready line; the command itself "
                   "runs as long as it runs (on the node: timeout S CMD).")
@click.option("--console-log", type=click.Path(path_type=Path),
              help="Keep the console here (default: a new file in ~/.cache/kh/logs/kh-boot/).")
@click.option("--sh", "sh", metavar="'CMD'",
              help="Run this shell command line on the node instead of an ARGV.")
@click.option("--show-command", is_flag=True, help="Print the QEMU command line and exit.")
@click.argument("argv", nargs=-1)
@handle_errors
def boot(appliance: str, kernel: Path | None, ramdisk: Path | None, bios: Path | None, mem: str,
         append: str, timeout: float, console_log: Path | None, sh: str | None,
         show_command: bool, argv: tuple[str, ...]) -> None:
    """Boot one node through U-Boot into an appliance; run ARGV (or --sh 'CMD') there, or attach.

    `kh boot -- ARGV...` runs exactly that argv on the node, as `docker run IMAGE ARGV` would
    (`-- sh -c 'exit 7'` exits 7; `-- exit 7` is the shell's exit builtin); `--sh 'CMD'` runs
    one shell command line. Either runs in a subshell of the node's shell with stdin from
    /dev/null, for as long as it runs; its output is printed as it comes and its exit status
    becomes kh's. If the node powers off, halts, reboots or panics, or its QEMU exits, before
    the command ends, kh says so and exits 125. Without either, the terminal is attached to
    the console (Ctrl-] leaves). SIGTERM, SIGHUP or Ctrl-C tear the node down and exit
    128+signal.
    """
    if sh is not None and argv:
        raise UsageError("give either --sh 'CMD' or -- ARGV..., not both")
    command = sh if sh is not None else framing.argv_command(argv) if argv else None
    p = paths()
    cfg = boot_mod.default_config(p, appliance=appliance, kernel=kernel, ramdisk=ramdisk,
                                  bios=bios, mem_mib=parse_mem(mem), khargs=append,
                                  console_log=console_log, ready_timeout=timeout)
    if show_command:
        click.echo(boot_mod.show_command(cfg))
        return
    with stop_on_signals(), boot_mod.booted(cfg, p) as node:
        if command is not None:
            sys.exit(node.run_streaming(command, _write_out, timeout=None))
        click.echo("kh: attached to the node's console; Ctrl-] leaves", err=True)
        boot_mod.attach(node.console)


def _write_out(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


register_service_commands(main)
register_token_commands(main)
register_bill_commands(main)
register_usage_commands(main)
register_outside_commands(main)
register_fabric_commands(main)
register_host_commands(main)
register_lab_commands(main)
register_topo_commands(main)

run = entry(main, "kh")

if __name__ == "__main__":
    run()
