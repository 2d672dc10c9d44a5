"""A real gRPC C-core proxyless xDS client (grpcio).

Usage: py_xds_client.py TARGET METHOD N [xds-creds]
       py_xds_client.py TARGET METHOD for=SECONDS [xds-creds]
Reads GRPC_XDS_BOOTSTRAP from the environment, sends N unary calls (or calls
for SECONDS once the channel is ready) with an empty request to METHOD on
TARGET (e.g. xds:///greeter), and prints one JSON object:
{"ok": K, "errors": {...}, "by_response": {"<reply>": n}}; in the timed form
also "calls": [[unix time in seconds, "<reply>"], ...] for the successful calls.

With a 4th argument `xds-creds` the channel
uses xDS channel credentials with a plaintext fallback, so it speaks mTLS with
the bootstrap's certificate provider wherever the cluster has an
UpstreamTlsContext, and plaintext elsewhere. Without it the channel is insecure
(plaintext only) as before.
"""
import collections
import json
import sys
import time

import grpc


def open_channel(target, xds_creds):
    if not xds_creds:
        return grpc.insecure_channel(target)
    # grpcio exposes the insecure ChannelCredentials as grpc.experimental's
    # (and, in newer releases, also as grpc.insecure_channel_credentials).
    insecure = getattr(grpc, "insecure_channel_credentials", None)
    if insecure is None:
        from grpc import experimental

        insecure = experimental.insecure_channel_credentials
    credentials = grpc.xds_channel_credentials(fallback_credentials=insecure())
    return grpc.secure_channel(target, credentials)


def main():
    target, method, amount = sys.argv[1], sys.argv[2], sys.argv[3]
    if sys.argv[4:] not in ([], ["xds-creds"]):
        sys.exit("usage: py_xds_client.py TARGET METHOD N|for=SECONDS [xds-creds]")
    xds_creds = sys.argv[4:] == ["xds-creds"]
    timed = amount.startswith("for=")
    by_response = collections.Counter()
    errors = collections.Counter()
    calls = []
    with open_channel(target, xds_creds) as channel:
        grpc.channel_ready_future(channel).result(timeout=20)
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        if timed:
            until = time.time() + float(amount[4:])
            more = lambda i: time.time() < until
        else:
            more = lambda i: i < int(amount)
        i = 0
        while more(i):
            i += 1
            try:
                reply = call(b"", timeout=10).decode("utf-8", "replace")
                by_response[reply] += 1
                if timed:
                    calls.append([round(time.time(), 3), reply])
            except grpc.RpcError as e:
                errors["%s: %s" % (e.code().name, e.details())] += 1
    out = {"ok": sum(by_response.values()), "errors": errors, "by_response": by_response}
    if timed:
        out["calls"] = calls
    print(json.dumps(out))


if __name__ == "__main__":
    main()
