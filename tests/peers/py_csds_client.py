"""A standard CSDS client: grpcio with the xds-protos package's generated stubs.

Usage: py_csds_client.py HOST:PORT
Calls envoy.service.status.v3.ClientStatusDiscoveryService/FetchClientStatus and prints one JSON object:
{"node": id, "resources": [{"type_url", "name", "version", "status", "error"}...]}.
"""
import json
import sys

import grpc
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc


def main():
    with grpc.insecure_channel(sys.argv[1]) as channel:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        response = stub.FetchClientStatus(csds_pb2.ClientStatusRequest(), timeout=10)
    resources = []
    for config in response.config:
        for generic in config.generic_xds_configs:
            resources.append({
                "type_url": generic.type_url,
                "name": generic.name,
                "version": generic.version_info,
                "status": config_dump_shared_pb2.ClientResourceStatus.Name(generic.client_status),
                "error": generic.error_state.details,
            })
    node = response.config[0].node.id if response.config else None
    print(json.dumps({"node": node, "resources": resources}))


if __name__ == "__main__":
    main()
