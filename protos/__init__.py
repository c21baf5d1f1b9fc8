"""The wire contract shared by gateway and worker: generated protobuf/gRPC code and Redis key names.

from protos import api, api_grpc, bus   # codestream.v1 public API, its service stubs, Redis messages
from protos.keys import Keys
"""

from protos.codestream.v1 import bus_pb2 as bus
from protos.codestream.v1 import codestream_pb2 as api
from protos.codestream.v1 import codestream_pb2_grpc as api_grpc

__all__ = ["api", "api_grpc", "bus"]
