"""Control-plane backends: each implements the ``ControlPlane`` protocol."""
