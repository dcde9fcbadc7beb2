"""The Python peer of bench/health_throughput: a grpcio server answering
grpc.health.v1.Health/Check with SERVING, over TLS with the same certificate as kiln.

Usage: health_server.py CERT KEY  (prints the port it listens on, then serves)
Needs grpcio (installed into .tools/python by `make tools`).
"""

import sys
from concurrent import futures

import grpc

SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}


def check(request, context):
    return SERVING


def main():
    cert, key = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {
            "Check": grpc.unary_unary_rpc_method_handler(
                check, request_deserializer=lambda b: b, response_serializer=lambda b: b
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
