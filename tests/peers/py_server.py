"""A gRPC server in Python (grpcio) with a generic handler.

Every unary method of every service answers b"py:<port>", so `meshctl call`
can be tested against a non-Rust server without a proto. Prints
`listening 127.0.0.1:<port>` once serving.

With `--tls CERT KEY CA` it serves mTLS only: its certificate chain and key,
and client certificates required, chaining to CA (PEM files).
"""
import sys
from concurrent import futures

import grpc


class AnyMethod(grpc.GenericRpcHandler):
    def __init__(self, reply):
        self.reply = reply

    def service(self, handler_call_details):
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: self.reply,
            request_deserializer=None,
            response_serializer=None,
        )


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = AnyMethod(b"")
    server.add_generic_rpc_handlers((handler,))
    if len(sys.argv) == 5 and sys.argv[1] == "--tls":
        cert, key, ca = (open(path, "rb").read() for path in sys.argv[2:5])
        credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
        port = server.add_secure_port("127.0.0.1:0", credentials)
    elif len(sys.argv) == 1:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        sys.exit("usage: py_server.py [--tls CERT KEY CA]")
    handler.reply = b"py:%d" % port
    server.start()
    print("listening 127.0.0.1:%d" % port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    sys.exit(main())
