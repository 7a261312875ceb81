#!/usr/bin/env python3
"""A small strongroom client in Python: put, get and list secrets over mutual TLS.

The gRPC stubs are generated from the repository's proto/ at start (grpcio-tools, into a
temporary folder), so they always match the service. Connection settings come from the same
environment variables as the `strongroom` CLI, or from flags:

  STRONGROOM_ADDR          https://host:port (or host:port) of strongroomd
  STRONGROOM_CACERT        CA certificate that signed the server's certificate (PEM)
  STRONGROOM_CLIENT_CERT   this client's certificate (PEM), from the service's client CA
  STRONGROOM_CLIENT_KEY    its private key (PEM)
  STRONGROOM_SERVER_NAME   name to expect in the server's certificate (default: the host)

Examples:
  printf 's3cret' | strongroom_client.py put payments/db/password
  strongroom_client.py get payments/db/password
  strongroom_client.py list payments/

Exit codes: 0 success, 1 usage or local error, 2 the service refused (the gRPC status code
and message go to stderr).
"""

import argparse
import importlib
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTOS = ["strongroom/v1/secrets.proto"]


def load_stubs(proto_dir):
    """Generates the Python modules of the service from proto_dir; returns (pb2, pb2_grpc)."""
    from grpc_tools import protoc  # grpcio-tools
    import grpc_tools

    out = tempfile.mkdtemp(prefix="strongroom-stubs-")
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    for proto in PROTOS:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{proto_dir}",
                f"-I{well_known}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                os.path.join(proto_dir, proto),
            ]
        )
        if rc != 0:
            raise SystemExit(f"error: protoc failed on {proto} (exit {rc})")
    sys.path.insert(0, out)
    pb2 = importlib.import_module("strongroom.v1.secrets_pb2")
    pb2_grpc = importlib.import_module("strongroom.v1.secrets_pb2_grpc")
    return pb2, pb2_grpc


def read_file(path, what):
    if not path:
        raise SystemExit(f"error: no {what}: set the flag or its STRONGROOM_* variable")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SystemExit(f"error: cannot read the {what} {path}: {e.strerror}")


def channel(args):
    import grpc

    addr = args.addr
    if not addr:
        raise SystemExit("error: no server address: set --addr or STRONGROOM_ADDR")
    for scheme in ("https://", "http://"):
        if addr.startswith(scheme):
            addr = addr[len(scheme):]
    addr = addr.rstrip("/")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read_file(args.cacert, "CA certificate"),
        private_key=read_file(args.key, "client key"),
        certificate_chain=read_file(args.cert, "client certificate"),
    )
    options = []
    if args.server_name:
        options.append(("grpc.ssl_target_name_override", args.server_name))
    return grpc.secure_channel(addr, credentials, options=options)


def main(argv=None):
    env = os.environ.get
    p = argparse.ArgumentParser(description="Put, get and list strongroom secrets over mTLS.")
    p.add_argument("--addr", default=env("STRONGROOM_ADDR"))
    p.add_argument("--cacert", default=env("STRONGROOM_CACERT"))
    p.add_argument("--cert", default=env("STRONGROOM_CLIENT_CERT"))
    p.add_argument("--key", default=env("STRONGROOM_CLIENT_KEY"))
    p.add_argument("--server-name", default=env("STRONGROOM_SERVER_NAME"))
    p.add_argument("--proto-dir", default=os.path.join(REPO, "proto"))
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    sub = p.add_subparsers(dest="command", required=True)
    put = sub.add_parser("put", help="store a new version; the value from --value or stdin")
    put.add_argument("name")
    put.add_argument("--value", help="the value (else read from stdin)")
    get = sub.add_parser("get", help="print a secret's value")
    get.add_argument("name")
    get.add_argument("--version", type=int, default=0, help="0: the latest")
    ls = sub.add_parser("list", help="names under a prefix, one a line")
    ls.add_argument("prefix", nargs="?", default="")
    args = p.parse_args(argv)

    import grpc

    pb2, pb2_grpc = load_stubs(args.proto_dir)
    with channel(args) as ch:
        stub = pb2_grpc.SecretServiceStub(ch)
        try:
            if args.command == "put":
                value = args.value.encode() if args.value is not None else sys.stdin.buffer.read()
                r = stub.PutSecret(
                    pb2.PutSecretRequest(name=args.name, value=value), timeout=args.timeout
                )
                print(f"stored {args.name} version {r.version}")
            elif args.command == "get":
                r = stub.GetSecret(
                    pb2.GetSecretRequest(name=args.name, version=args.version),
                    timeout=args.timeout,
                )
                sys.stdout.buffer.write(r.value)
                sys.stdout.flush()
            else:
                token, count = "", 0
                while True:
                    r = stub.ListSecrets(
                        pb2.ListSecretsRequest(prefix=args.prefix, page_token=token),
                        timeout=args.timeout,
                    )
                    for name in r.names:
                        print(name)
                    count += len(r.names)
                    token = r.next_page_token
                    if not token:
                        break
                if count == 0:
                    print(f"no secrets under {args.prefix!r}", file=sys.stderr)
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
