"""A real gRPC C-core proxyless xDS client (grpcio).

Usage: py_xds_client.py TARGET METHOD N
       py_xds_client.py TARGET METHOD for=SECONDS
Reads GRPC_XDS_BOOTSTRAP from the environment, sends N unary calls (or calls
for SECONDS once the channel is ready) with an empty request to METHOD on
TARGET (e.g. xds:///greeter), and prints one JSON object:
{"ok": K, "errors": {...}, "by_response": {"<reply>": n}}; in the timed form
also "calls": [[unix time in seconds, "<reply>"], ...] for the successful calls.
"""
import collections
import json
import sys
import time

import grpc


def main():
    target, method, amount = sys.argv[1], sys.argv[2], sys.argv[3]
    timed = amount.startswith("for=")
    by_response = collections.Counter()
    errors = collections.Counter()
    calls = []
    with grpc.insecure_channel(target) as channel:
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
