"""Python code generated from protos/medusa/v1 (never edited by hand: run `make proto`).

`medusa.proto.v1.medusa_pb2` holds the messages, `medusa.proto.v1.medusa_pb2_grpc` the stub
and servicer. Only medusa.client and services import these; the library never does."""
