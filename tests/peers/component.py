"""A custom component written with grpcio in Python, as a user in another language writes one:
csp.component.v1.ComponentRuntime, its stubs generated from proto/ with grpcio-tools at start.

Usage: component.py <proto dir>. Listens on 127.0.0.1 (an ephemeral port) and prints
`listening on <port>`. Process answers each input message on `out` with
{"echo": <payload>, "by": "python", "k": <config.k>}, and Done once every input closed. Like
every grpcio server, it sends its response headers only with its first answer. With
`stall_first_stream` in its config, the first Process stream it serves goes silent at its
second message (a component stuck on one input); later streams answer normally.
"""

import os
import signal
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc
from grpc_tools import protoc


def generate(proto_dir):
    out = tempfile.mkdtemp(prefix="csp-component-")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    status = protoc.main(
        [
            "protoc",
            f"-I{proto_dir}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            os.path.join(proto_dir, "csp/component/v1/component.proto"),
        ]
    )
    if status != 0:
        sys.exit(f"protoc failed: {status}")
    sys.path.insert(0, out)


def main():
    generate(sys.argv[1])
    from csp.component.v1 import component_pb2 as pb
    from csp.component.v1 import component_pb2_grpc as rpc
    from google.protobuf import json_format, struct_pb2

    streams = {"count": 0}
    lock = threading.Lock()

    class Echo(rpc.ComponentRuntimeServicer):
        def Describe(self, request, context):
            return pb.DescribeResponse(
                display_name="Echo (Python)",
                inputs=[pb.PortSpec(name="in", required=True)],
                outputs=[pb.PortSpec(name="out")],
            )

        def Process(self, request_iterator, context):
            k = None
            with lock:
                streams["count"] += 1
                first = streams["count"] == 1
            stall = False
            for request in request_iterator:
                kind = request.WhichOneof("kind")
                if kind == "start":
                    config = json_format.MessageToDict(request.start.config)
                    k = config.get("k")
                    stall = first and bool(config.get("stall_first_stream"))
                elif kind == "message" and stall and request.message.sequence >= 2:
                    # Silent until the executor gives up on this stream.
                    while context.is_active():
                        time.sleep(0.05)
                    return
                elif kind == "message":
                    payload = json_format.MessageToDict(request.message.payload)
                    value = struct_pb2.Value()
                    json_format.ParseDict({"echo": payload, "by": "python", "k": k}, value)
                    yield pb.ProcessResponse(
                        message=pb.Message(port="out", payload=value, sequence=request.message.sequence)
                    )
                elif kind == "input_closed":
                    yield pb.ProcessResponse(done=pb.Done())
                    return

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    rpc.add_ComponentRuntimeServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on {port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    stop.wait()
    server.stop(grace=1)


if __name__ == "__main__":
    main()
