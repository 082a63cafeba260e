"""`signaling-trio user token NAME`: a JWT for a local user, without a browser;
`signaling-trio user invite [NAME]`: a one-time code for the login page (--login invite).

Owns: the `user` command line. The token is signed with the server's local key (the
one `--auth local` with the sqlite store keeps in `--data-dir`), so the server accepts
it; `--write-credentials` also writes the file the sleap-rtc programs read
(`~/.sleap-rtc/credentials.json`: `jwt` and `user`, other keys kept), mode 600.
The token is printed to stdout only (never logged). An invite is written to the store the
server uses (`--store`: sqlite in --data-dir by default, or redis://; not memory, which
only the running server holds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import trio

from .auth import LocalAuthority
from .config import ConfigError, Settings, validate

DEFAULT_CREDENTIALS = os.path.join("~", ".sleap-rtc", "credentials.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="signaling-trio user", description="local users (--auth local)")
    sub = parser.add_subparsers(dest="action", required=True)
    token = sub.add_parser("token", help="print a JWT for user NAME, signed with the server's local key")
    token.add_argument("name", help="the user (the JWT's sub; sleap-rtc's username and client peer id)")
    token.add_argument("--data-dir", default=os.environ.get("SIGNALING_DATA_DIR", "./signaling-data"),
                       help="the server's --data-dir (where its signing key is)")
    token.add_argument("--days", type=float, default=30.0, help="days the token is valid (default 30)")
    token.add_argument("--write-credentials", nargs="?", const=DEFAULT_CREDENTIALS, default=None, metavar="PATH",
                       help=f"also write it into sleap-rtc's credentials file (default {DEFAULT_CREDENTIALS})")
    invite = sub.add_parser("invite", help="print a one-time code to sign in on /login (--login invite)")
    invite.add_argument("name", nargs="?", default=None, help="the only user the code signs in (default: any)")
    invite.add_argument("--store", default=os.environ.get("SIGNALING_STORE", "sqlite"),
                        help="the server's --store (sqlite[:PATH] or redis://)")
    invite.add_argument("--data-dir", default=os.environ.get("SIGNALING_DATA_DIR", "./signaling-data"),
                        help="the server's --data-dir (where the sqlite store is)")
    invite.add_argument("--days", type=float, default=7.0, help="days the code is valid (default 7)")
    return parser


def write_credentials(path: str, name: str, jwt: str) -> str:
    path = os.path.expanduser(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        with open(path, encoding="utf-8") as f:
            creds = json.load(f)
        if not isinstance(creds, dict):
            creds = {}
    except (OSError, ValueError):
        creds = {}
    creds["jwt"] = jwt
    creds["user"] = {"id": name, "username": name}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(creds, f, indent=2)
    os.chmod(path, 0o600)
    return path


def invite(args: argparse.Namespace) -> int:
    from .login import create_invite, valid_name
    from .store import StoreUnavailable, open_store

    if args.store == "memory" or args.days <= 0 or (args.name is not None and not valid_name(args.name)):
        print("signaling-trio user invite: needs the server's sqlite or redis store (a memory store lives in "
              "the server only), positive --days, and a NAME of letters, digits, '.', '_', '-'", file=sys.stderr)
        return 2
    try:
        settings = Settings(store=args.store, data_dir=args.data_dir)
        validate(settings)

        async def go() -> str:
            async with open_store(settings) as store:
                return await create_invite(store, args.name, args.days)

        print(trio.run(go))
    except (ConfigError, StoreUnavailable) as exc:
        print(f"signaling-trio user invite: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "invite":
        return invite(args)
    if not args.name or len(args.name) > 256 or args.days <= 0:
        print("signaling-trio user token: NAME must be 1-256 characters and --days positive", file=sys.stderr)
        return 2
    lifetime = int(args.days * 86400)
    try:
        authority = LocalAuthority.load_or_create(args.data_dir, lifetime=lifetime)
    except ConfigError as exc:
        print(f"signaling-trio user token: {exc}", file=sys.stderr)
        return 2
    jwt = authority.issue(args.name)
    print(jwt)
    if args.write_credentials:
        path = write_credentials(args.write_credentials, args.name, jwt)
        print(f"wrote {path}", file=sys.stderr)
    return 0
