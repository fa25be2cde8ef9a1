"""The Ray Serve application that serves medusa over gRPC (medusa.v1).

Plain classes (tokenizer service, engine replica, ingress, tenancy, sessions, routing policy)
hold the logic and are testable without Ray; services.app binds them into deployments."""
