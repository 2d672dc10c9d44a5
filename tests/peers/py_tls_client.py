"""A grpcio client speaking mTLS: N unary calls to METHOD on TARGET, with the
certificate chain CERT, its KEY and the trust bundle CA (PEM files), checking the
server's certificate for the host name AUTHORITY.

Usage: py_tls_client.py TARGET METHOD N CERT KEY CA AUTHORITY
Prints one JSON line: {"ok": k, "codes": {"OK": k, ...}, "replies": {"<reply>": n}}.
"""
import json
import sys

import grpc


def main():
    target, method, n, cert, key, ca, authority = sys.argv[1:8]
    cert, key, ca = (open(path, "rb").read() for path in (cert, key, ca))
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = [("grpc.ssl_target_name_override", authority)]
    codes, replies = {}, {}
    with grpc.secure_channel(target, credentials, options=options) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        for _ in range(int(n)):
            try:
                reply = call(b"", timeout=5)
                codes["OK"] = codes.get("OK", 0) + 1
                text = reply.decode("utf-8", "replace")
                replies[text] = replies.get(text, 0) + 1
            except grpc.RpcError as error:
                name = error.code().name
                codes[name] = codes.get(name, 0) + 1
                replies[error.details()] = replies.get(error.details(), 0) + 1
    print(json.dumps({"ok": codes.get("OK", 0), "codes": codes, "replies": replies}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
