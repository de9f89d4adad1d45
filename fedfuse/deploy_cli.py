"""The deployment commands of ``fedfuse``: certs, server run/connect, site run. Thin wrappers."""

from __future__ import annotations

import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from fedfuse.common.config import RunConfig
from fedfuse.common.deploy.certs import CA_CERT, make_certs
from fedfuse.common.deploy.flower import (
    SiteOptions,
    SuperLinkOptions,
    flower_env,
    superlink_command,
    supernode_command,
    wait_for_superlink,
    write_connection,
)
from fedfuse.common.errors import DataValidationError, FedfuseError

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

server_app = typer.Typer(
    help="Coordinator: run the SuperLink, add a `flwr` connection to it.", no_args_is_help=True
)
site_app = typer.Typer(help="Site: run this site's SuperNode.", no_args_is_help=True)


def _fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _exec(cmd: list[str], *, dry_run: bool) -> None:
    """Print the command; replace this process with it (signals then reach Flower directly)."""
    console.print("$ " + shlex.join(cmd))
    if dry_run:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, flower_env())


def _build(fn, *args):  # noqa: ANN001, ANN202
    """Call a command builder; show its warnings as warnings and its errors as errors."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn(*args)
        except FedfuseError as exc:
            _fail(str(exc))
    for w in caught:
        err_console.print(f"[bold yellow]WARNING:[/] {w.message}")
    return result


def certs(
    out: Path = typer.Option(..., "--out", help="Folder to write the CA, certificates, keys."),
    server_host: str = typer.Option(
        ..., "--server-host", help="Name or IP address sites use to reach the SuperLink."
    ),
    sites: int = typer.Option(3, "--sites", min=0, help="Number of site key pairs to make."),
    force: bool = typer.Option(False, "--force", help="Replace existing keys and certificates."),
) -> None:
    """Make a CA, the SuperLink's TLS certificate and one SuperNode key pair per site."""
    try:
        b = make_certs(out, server_host=server_host, sites=sites, force=force)
    except FedfuseError as exc:
        _fail(str(exc))
    console.print(f"CA:        {b.ca_cert}  (key {b.ca_key}: keep it offline)")
    console.print(f"SuperLink: {b.server_cert}, {b.server_key}")
    for k in b.node_keys:
        console.print(f"site key:  {k}  (public: {k.with_suffix('.pub')})")
    console.print(
        "Give each site ca.crt and its own .key; register every .pub at the SuperLink with "
        "`flwr supernode register KEY.pub CONNECTION`."
    )


@server_app.command("run")
def server_run(
    certs_dir: Path | None = typer.Option(
        None, "--certs", help="Folder from `fedfuse certs` (ca.crt, superlink.crt/.key)."
    ),
    database: Path = typer.Option(
        Path("superlink-state.db"), "--database", help="SQLite file: runs and nodes survive."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: all)."),
    port: int = typer.Option(9092, "--port", help="Port of the SuperLink (all its APIs)."),
    log_file: Path | None = typer.Option(None, "--log-file", help="Also log to this file."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS. Local tests only."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the command, do not run it."),
) -> None:
    """Run the SuperLink with TLS, SuperNode authentication and a state database."""
    opts = SuperLinkOptions(certs_dir, database, host, port, insecure, log_file)
    _exec(_build(superlink_command, opts), dry_run=dry_run)


@server_app.command("connect")
def server_connect(
    name: str = typer.Argument("fedfuse", help="Connection name for `flwr run . NAME`."),
    superlink: str = typer.Option(..., "--superlink", help="HOST:PORT of the SuperLink."),
    certs_dir: Path | None = typer.Option(None, "--certs", help="Folder holding ca.crt."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS. Local tests only."),
    default: bool = typer.Option(False, "--default", help="Make it `flwr`'s default."),
    wait: float = typer.Option(
        30.0, "--wait", min=0, help="Seconds to wait for the SuperLink to answer (0: no check)."
    ),
) -> None:
    """Add the SuperLink to `flwr`'s connections ($FLWR_HOME/config.toml), after checking it."""
    ca = certs_dir / CA_CERT if certs_dir is not None else None

    def write() -> Path:
        return write_connection(
            name, address=superlink, root_certificates=ca, insecure=insecure, make_default=default
        )

    path = _build(write)
    console.print(f"connection '{name}' -> {superlink} written to {path}")
    if wait > 0:
        try:
            wait_for_superlink(superlink, ca_cert=None if insecure else ca, timeout=wait)
        except FedfuseError as exc:
            _fail(str(exc))
        how = "answers (no TLS)" if insecure else "answers with a certificate the CA vouches for"
        console.print(f"SuperLink at {superlink} {how}")


@site_app.command("run")
def site_run(
    superlink: str = typer.Option(..., "--superlink", help="HOST:PORT of the SuperLink."),
    data: Path = typer.Option(..., "--data", help="This site's data folder (manifest.csv)."),
    ledger: Path = typer.Option(..., "--ledger", help="This site's privacy ledger file."),
    epsilon_budget: float = typer.Option(
        ..., "--epsilon-budget", help="This site's total epsilon, over all runs."
    ),
    delta: float = typer.Option(1e-5, "--delta", help="This site's delta."),
    certs_dir: Path | None = typer.Option(None, "--certs", help="Folder holding ca.crt."),
    key: Path | None = typer.Option(None, "--key", help="This site's private key (.key)."),
    name: str = typer.Option(
        "", "--name", help="Site name (default: the data folder's name).", show_default=False
    ),
    runtime_port: int = typer.Option(
        9094, "--runtime-port", help="Local port of the SuperNode's ClientApp API."
    ),
    max_retries: int | None = typer.Option(
        None, "--max-retries", help="Give up after this many failed connection attempts."
    ),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS. Local tests only."),
    share_site_metrics: bool = typer.Option(
        False,
        "--share-site-metrics",
        help="Also send this site's own test figures and privacy internals in the clear "
        "(outside any epsilon; README: What crosses the wire).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the command, do not run it."),
) -> None:
    """Check the site's data, then run its SuperNode (TLS, authenticated by the site key)."""
    # lazy: the manifest loader loads torch (seconds); the other deploy commands start without it
    from fedfuse.common.data.manifest import load_manifest

    opts = SiteOptions(
        superlink=superlink,
        data=data,
        ledger=ledger,
        epsilon_budget=epsilon_budget,
        delta=delta,
        certs=certs_dir,
        key=key,
        site_name=name,
        runtime_port=runtime_port,
        insecure=insecure,
        max_retries=max_retries,
        share_site_metrics=share_site_metrics,
    )
    cmd = _build(supernode_command, opts)
    # The same validation as `fedfuse data check`: a bad folder fails here, with every problem
    # listed, not in the middle of the first round.
    if not data.is_dir():
        _fail(f"--data '{data}' is not a folder (give the site folder holding manifest.csv)")
    try:
        m = load_manifest(data, classes=None, split_seed=RunConfig().seed)
    except DataValidationError as exc:
        err_console.print(str(exc))
        raise typer.Exit(1) from None
    console.print(f"{m.path}: {len(m.records)} records, all valid")
    _exec(cmd, dry_run=dry_run)


def register(app: typer.Typer) -> None:
    """Add the deployment commands to the ``fedfuse`` app."""
    app.command("certs")(certs)
    app.add_typer(server_app, name="server")
    app.add_typer(site_app, name="site")
