"""The raft backend: a hand-written Raft core, durable storage, transport and driver."""
