"""A real gRPC C-core proxyless xDS client (grpcio).

Usage: py_xds_client.py TARGET METHOD N
Reads GRPC_XDS_BOOTSTRAP from the environment, sends N unary calls with an
empty request to METHOD on TARGET (e.g. xds:///greeter), and prints one JSON
object: {"ok": K, "errors": {...}, "by_response": {"<reply>": n}}.
"""
import collections
import json
import sys

import grpc


def main():
    target, method, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    by_response = collections.Counter()
    errors = collections.Counter()
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=20)
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        for _ in range(n):
            try:
                reply = call(b"", timeout=10)
                by_response[reply.decode("utf-8", "replace")] += 1
            except grpc.RpcError as e:
                errors["%s: %s" % (e.code().name, e.details())] += 1
    print(json.dumps({"ok": sum(by_response.values()), "errors": errors, "by_response": by_response}))


if __name__ == "__main__":
    main()
