"""An OTLP/gRPC trace receiver written with grpcio and the OpenTelemetry protos: a peer the
services did not build, standing in for an OpenTelemetry collector.

Listens on 127.0.0.1 (an ephemeral port), prints `listening on <port>` once, then one JSON line
per exported span on stdout:

    {"service": ..., "name": ..., "trace_id": hex, "span_id": hex, "parent_span_id": hex or "",
     "kind": int, "attributes": {key: value}, "links": [{"trace_id": hex, "span_id": hex}],
     "status": int}

Stops on SIGTERM or when stdin closes.
"""

import json
import signal
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

lock = threading.Lock()


def value_of(any_value):
    kind = any_value.WhichOneof("value")
    if kind is None:
        return None
    value = getattr(any_value, kind)
    if kind in ("string_value", "bool_value", "int_value", "double_value"):
        return value
    return str(value)


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        lines = []
        for resource_spans in request.resource_spans:
            service = ""
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    service = value_of(attribute.value)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    lines.append(
                        json.dumps(
                            {
                                "service": service,
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "kind": span.kind,
                                "attributes": {a.key: value_of(a.value) for a in span.attributes},
                                "links": [
                                    {"trace_id": l.trace_id.hex(), "span_id": l.span_id.hex()}
                                    for l in span.links
                                ],
                                "status": span.status.code,
                            }
                        )
                    )
        with lock:
            for line in lines:
                sys.stdout.write(line + "\n")
            sys.stdout.flush()
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with lock:
        sys.stdout.write(f"listening on {port}\n")
        sys.stdout.flush()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    stop.wait()
    server.stop(grace=1)


if __name__ == "__main__":
    main()
