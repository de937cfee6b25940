"""Tests that run real ``controlplane serve`` processes on loopback, under faults."""
