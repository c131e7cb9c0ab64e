#!/usr/bin/env python3
"""Loopback stand-ins for AWS STS (AssumeRoleWithWebIdentity) and the EC2 instance metadata service (IMDSv2).

Start:
    python3 tests/servers/aws_credentials_server.py --port-file PORTFILE --access-key AK --secret-key SK \
        [--role-arn ARN] [--web-identity-token-file FILE] [--lifetime SECONDS] [--imds-role NAME]
It binds 127.0.0.1 on an ephemeral port, writes the port to PORTFILE atomically once it serves, and prints
`listening on 127.0.0.1:PORT`. Standard library only. Every answer hands out the key pair given on the command
line (the one the S3 server under test accepts) with a fresh session token, valid for --lifetime seconds.

STS, as nixpush reaches it with AWS_ENDPOINT_URL_STS=http://127.0.0.1:PORT/:
    POST /  Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn=…&RoleSessionName=…&WebIdentityToken=…
  The token must equal the current content of --web-identity-token-file (read on every call, so a test can rotate
  it), else 400 InvalidIdentityToken; RoleArn must equal --role-arn, else 403 AccessDenied; a missing
  RoleSessionName is 400 ValidationError. Success: AssumeRoleWithWebIdentityResponse XML with session tokens
  `sts-session-N-HEX`.

IMDSv2, as nixpush reaches it with AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:PORT:
    PUT /latest/api/token                                 needs X-aws-ec2-metadata-token-ttl-seconds (1-21600)
    GET /latest/meta-data/iam/security-credentials/       needs X-aws-ec2-metadata-token → the role name
    GET /latest/meta-data/iam/security-credentials/ROLE   needs X-aws-ec2-metadata-token → the credentials JSON
  A GET without a valid token is refused with 401, like the real service; session tokens are
  `imds-session-N-HEX`.

Control:
    GET /_control/calls   every call so far, in order: {"kind", "status", "role_arn", "session_name",
                          "session_token", "expiration"} (kind: sts, imds-token, imds-role, imds-credentials)
"""

import argparse
import datetime
import json
import os
import secrets
import signal
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import announce  # noqa: E402

ROLES_PATH = "/latest/meta-data/iam/security-credentials/"


class State:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.calls = []
        self.issued = 0
        self.imds_tokens = set()

    def record(self, **call):
        with self.lock:
            self.calls.append(call)

    def issue(self, prefix):
        """A fresh session token and its expiration."""
        with self.lock:
            self.issued += 1
            n = self.issued
        expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=self.args.lifetime)
        return f"{prefix}-{n}-{secrets.token_hex(8)}", expires.strftime("%Y-%m-%dT%H:%M:%SZ")


def sts_error(status, code, message):
    body = (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
        f"<Code>{code}</Code><Message>{message}</Message></Error><RequestId>1</RequestId></ErrorResponse>"
    )
    return status, "text/xml", body


def make_handler(state):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):
            pass

        def answer(self, status, content_type, body):
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def body(self):
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length).decode()

        def do_POST(self):
            form = urllib.parse.parse_qs(self.body())
            field = lambda name: (form.get(name) or [""])[0]
            role, session = field("RoleArn"), field("RoleSessionName")
            call = {"kind": "sts", "role_arn": role, "session_name": session}
            if self.path != "/" or field("Action") != "AssumeRoleWithWebIdentity" or field("Version") != "2011-06-15":
                answer = sts_error(400, "InvalidAction", "not AssumeRoleWithWebIdentity 2011-06-15")
            elif not session:
                answer = sts_error(400, "ValidationError", "RoleSessionName is required")
            else:
                try:
                    with open(state.args.web_identity_token_file) as f:
                        expected = f.read().strip()
                except OSError:
                    expected = None
                if expected is None or field("WebIdentityToken") != expected:
                    answer = sts_error(400, "InvalidIdentityToken", "the web identity token is not valid")
                elif role != state.args.role_arn:
                    answer = sts_error(403, "AccessDenied", "not authorized to perform sts:AssumeRoleWithWebIdentity")
                else:
                    token, expiration = state.issue("sts-session")
                    call.update(session_token=token, expiration=expiration)
                    body = (
                        '<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
                        "<AssumeRoleWithWebIdentityResult>"
                        f"<SubjectFromWebIdentityToken>test</SubjectFromWebIdentityToken>"
                        f"<AssumedRoleUser><Arn>{role}/{session}</Arn><AssumedRoleId>AROATEST:{session}</AssumedRoleId>"
                        "</AssumedRoleUser><Credentials>"
                        f"<AccessKeyId>{state.args.access_key}</AccessKeyId>"
                        f"<SecretAccessKey>{state.args.secret_key}</SecretAccessKey>"
                        f"<SessionToken>{token}</SessionToken><Expiration>{expiration}</Expiration>"
                        "</Credentials><Provider>test</Provider></AssumeRoleWithWebIdentityResult>"
                        "<ResponseMetadata><RequestId>1</RequestId></ResponseMetadata>"
                        "</AssumeRoleWithWebIdentityResponse>"
                    )
                    answer = (200, "text/xml", body)
            call["status"] = answer[0]
            state.record(**call)
            self.answer(*answer)

        def do_PUT(self):
            self.body()
            if self.path != "/latest/api/token":
                return self.answer(404, "text/plain", "not found")
            ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                state.record(kind="imds-token", status=400)
                return self.answer(400, "text/plain", "missing or invalid X-aws-ec2-metadata-token-ttl-seconds")
            token = "imds-api-" + secrets.token_hex(16)
            with state.lock:
                state.imds_tokens.add(token)
            state.record(kind="imds-token", status=200)
            self.answer(200, "text/plain", token)

        def do_GET(self):
            if self.path == "/_control/calls":
                with state.lock:
                    calls = list(state.calls)
                return self.answer(200, "application/json", json.dumps(calls))
            if not self.path.startswith(ROLES_PATH):
                return self.answer(404, "text/plain", "not found")
            role = self.path[len(ROLES_PATH):]
            kind = "imds-credentials" if role else "imds-role"
            with state.lock:
                authorized = self.headers.get("X-aws-ec2-metadata-token") in state.imds_tokens
            if not authorized:
                state.record(kind=kind, status=401)
                return self.answer(401, "text/plain", "Unauthorized")
            if not role:
                state.record(kind=kind, status=200)
                return self.answer(200, "text/plain", state.args.imds_role)
            if role != state.args.imds_role:
                state.record(kind=kind, status=404)
                return self.answer(404, "text/plain", "not found")
            token, expiration = state.issue("imds-session")
            state.record(kind=kind, status=200, session_token=token, expiration=expiration)
            document = {
                "Code": "Success",
                "LastUpdated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "Type": "AWS-HMAC",
                "AccessKeyId": state.args.access_key,
                "SecretAccessKey": state.args.secret_key,
                "Token": token,
                "Expiration": expiration,
            }
            self.answer(200, "application/json", json.dumps(document))

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--access-key", required=True)
    parser.add_argument("--secret-key", required=True)
    parser.add_argument("--role-arn", default="arn:aws:iam::123456789012:role/nixpush-test")
    parser.add_argument("--web-identity-token-file", default="")
    parser.add_argument("--lifetime", type=int, default=3600, help="seconds each set of keys is valid")
    parser.add_argument("--imds-role", default="nixpush-instance-role")
    args = parser.parse_args()

    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(State(args)))
    server.daemon_threads = True
    port = server.server_address[1]
    announce(port, args.port_file)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


if __name__ == "__main__":
    main()
