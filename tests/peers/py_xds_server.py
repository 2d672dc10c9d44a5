"""A real gRPC C-core xDS-enabled server (grpcio, gRFC A36).

Usage: py_xds_server.py PORT REPLY_MODE
Reads GRPC_XDS_BOOTSTRAP from the environment and serves 127.0.0.1:PORT with
xDS server credentials (plaintext fallback), so its security (mTLS from the
bootstrap's certificate providers) and RBAC come from the server Listener
`grpc/server?xds.resource.listening_address=127.0.0.1:PORT` (the bootstrap's
server_listener_resource_name_template). grpcio does not accept connections
until that Listener has arrived.

Every unary method /mesh.test.Echo/<any> answers raw bytes (no protobuf): with
REPLY_MODE `peer` the caller's identity as grpcio sees it (the SPIFFE URI from
the auth context, else the first x509_subject_alternative_name, else
"plaintext"); any other REPLY_MODE is answered literally. Other methods are
UNIMPLEMENTED.

Prints `listening 127.0.0.1:PORT` once started, then serves until killed
(SIGTERM and SIGINT stop it gracefully).
"""
import signal
import sys
import threading
from concurrent import futures

import grpc

SERVICE_PREFIX = "/mesh.test.Echo/"


def peer_identity(context):
    auth = context.auth_context() or {}

    def values(key):
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in auth.get(key, [])]

    for key in ("peer_spiffe_id", "peer_uri", "x509_subject_alternative_name"):
        for value in values(key):
            if value.startswith("spiffe://"):
                return value
    sans = values("x509_subject_alternative_name")
    if sans:
        return sans[0]
    return "plaintext"


class EchoHandler(grpc.GenericRpcHandler):
    def __init__(self, mode):
        self.mode = mode

    def reply(self, request, context):
        if self.mode == "peer":
            return peer_identity(context).encode("utf-8")
        return self.mode.encode("utf-8")

    def service(self, handler_call_details):
        if not handler_call_details.method.startswith(SERVICE_PREFIX):
            return None
        return grpc.unary_unary_rpc_method_handler(
            self.reply,
            request_deserializer=None,
            response_serializer=None,
        )


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: py_xds_server.py PORT REPLY_MODE")
    port, mode = int(sys.argv[1]), sys.argv[2]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), xds=True)
    server.add_generic_rpc_handlers((EchoHandler(mode),))
    credentials = grpc.xds_server_credentials(grpc.insecure_server_credentials())
    # An xDS-enabled server binds only once its Listener arrives, so grpcio
    # returns -1 here rather than the port (seen with grpcio 1.85).
    bound = server.add_secure_port("127.0.0.1:%d" % port, credentials)
    if bound not in (-1, port):
        sys.exit("unexpected port %d for 127.0.0.1:%d" % (bound, port))
    stopped = threading.Event()

    def stop(signum, frame):
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.start()
    print("listening 127.0.0.1:%d" % port, flush=True)
    while not stopped.wait(0.5):
        pass
    server.stop(grace=2).wait()


if __name__ == "__main__":
    sys.exit(main())
