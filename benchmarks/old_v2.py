"""Run the upstream v2 server beside ours, for benchmarks/connect.py --old.

    OLD_PYTHON benchmarks/old_v2.py SERVER_DIR WS_PORT HTTP_PORT MOTO_URL [LOG_LEVEL]
    OLD_PYTHON benchmarks/old_v2.py SERVER_DIR WS_PORT HTTP_PORT memory:TOKENS [LOG_LEVEL]

SERVER_DIR is `webRTC_external/` of a talmolab/webRTC-connect checkout (its `server.py`
and `ice_config.py`; nothing of it is copied here). OLD_PYTHON is a venv with what that
server imports plus moto (docs/PERFORMANCE.md has the commands).

Two stand-ins for AWS:
- MOTO_URL: a moto server, a separate process whose CPU is not counted. This process does
  what the old server does against AWS (boto3 calls, SigV4 signing, JWT checks) except
  TLS: a lower bound on its real cost.
- `memory:TOKENS`: no AWS client at all. Cognito and the `rooms` table are dicts in this
  process, and TOKENS Cognito id tokens are signed before the server starts (Cognito
  signs them, not the old server), so what is measured is the old server's own code only:
  websockets, FastAPI, the JWT check, its logging. The cheapest the old server can be.

What runs is the old server's own `app` (FastAPI under uvicorn, in a thread, as its
`run_fastapi_server` does) and its own `handle_client` under `websockets.serve`, as its
`main` does; only the two ports differ (it hard-codes 8080 and 8001), and its one start-up
fetch of Cognito's JWKS is pointed at moto's copy. LOG_LEVEL (default info, the level the
old server sets for itself) is its root logger's and uvicorn's, so that both servers can be
measured at the same level.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
import threading

REGION = "us-west-1"
POOL, CLIENT = f"{REGION}_bench", "benchclient"  # the user pool and app client `memory:` stands in for


def _aws(moto_url: str) -> tuple[str, str]:
    """A user pool with an app client that allows USER_PASSWORD_AUTH, and the `rooms`
    table: what the old server's anonymous sign-in, create-room and register use."""
    import boto3

    os.environ.update(AWS_ENDPOINT_URL=moto_url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION=REGION, COGNITO_REGION=REGION)
    idp = boto3.client("cognito-idp", region_name=REGION)
    pool = idp.create_user_pool(PoolName="bench")["UserPool"]["Id"]
    client = idp.create_user_pool_client(UserPoolId=pool, ClientName="bench",
                                         ExplicitAuthFlows=["USER_PASSWORD_AUTH"])["UserPoolClient"]["ClientId"]
    boto3.client("dynamodb", region_name=REGION).create_table(
        TableName="rooms", BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "room_id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "room_id", "KeyType": "HASH"}])
    return pool, client


class _Cognito:
    """The three calls of the old `/anonymous-signin`, answered from pre-signed tokens."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens

    def sign_up(self, **_: object) -> dict:
        return {}

    def admin_confirm_sign_up(self, **_: object) -> dict:
        return {}

    def initiate_auth(self, **_: object) -> dict:
        return {"AuthenticationResult": {"IdToken": self.tokens.pop()}}


class _Table:
    def __init__(self) -> None:
        self.items: dict[str, dict] = {}

    def put_item(self, Item: dict) -> dict:  # noqa: N803 (boto3's spelling)
        self.items[Item["room_id"]] = dict(Item)
        return {}

    def get_item(self, Key: dict) -> dict:  # noqa: N803
        item = self.items.get(Key["room_id"])
        return {"Item": dict(item)} if item else {}


def _memory_aws(count: int) -> tuple[list[dict], list[str]]:
    """A signing key's JWKS and `count` id tokens as Cognito would issue them."""
    import time
    import uuid

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jose import jwk, jwt

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    signer = jwk.construct(pem, "RS256")  # once: loading a PEM key checks it (~40 ms)
    public = jwk.construct(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo),
                           "RS256").to_dict()
    public.update(kid="bench", use="sig")
    now, iss = int(time.time()), f"https://cognito-idp.{REGION}.amazonaws.com/{POOL}"
    tokens = [jwt.encode({"iss": iss, "sub": str(uuid.uuid4()), "aud": CLIENT, "token_use": "id", "iat": now,
                          "exp": now + 7200, "cognito:username": str(uuid.uuid4())}, signer, algorithm="RS256",
                         headers={"kid": "bench"}) for _ in range(count)]
    return [public], tokens


def _import_server(server_dir: str, moto_url: str):
    import requests

    real_get = requests.get
    cognito = f"https://cognito-idp.{REGION}.amazonaws.com/"

    def get(url: str, *args, **kwargs):
        return real_get(url.replace(cognito, moto_url + "/"), *args, **kwargs)

    sys.path.insert(0, server_dir)
    requests.get = get
    try:
        return importlib.import_module("server")
    finally:
        requests.get = real_get


def _start(server_dir: str, aws: str):
    """The old server's module, its AWS clients pointed at moto or replaced by dicts."""
    if not aws.startswith("memory:"):
        pool, client = _aws(aws)
        os.environ.update(COGNITO_USER_POOL_ID=pool, COGNITO_APP_CLIENT_ID=client)
        return _import_server(server_dir, aws)
    keys, tokens = _memory_aws(int(aws.split(":", 1)[1]))
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION=REGION,
                      COGNITO_REGION=REGION, COGNITO_USER_POOL_ID=POOL, COGNITO_APP_CLIENT_ID=CLIENT)
    old = _import_server(server_dir, "http://127.0.0.1:9")  # its JWKS fetch fails; set below
    old.JWKS, old.cognito_client, old.rooms_table = keys, _Cognito(tokens), _Table()
    return old


def main() -> None:
    server_dir, ws_port, http_port, aws = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    level = sys.argv[5] if len(sys.argv) > 5 else "info"
    old = _start(server_dir, aws)
    logging.getLogger().setLevel(level.upper())
    if not old.JWKS:
        raise SystemExit("the old server found no Cognito keys at " + aws)
    import uvicorn
    import websockets

    threading.Thread(target=lambda: uvicorn.run(old.app, host="127.0.0.1", port=http_port, log_level=level),
                     daemon=True).start()

    async def serve() -> None:
        async with websockets.serve(handler=old.handle_client, host="127.0.0.1", port=ws_port):
            await asyncio.Future()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
