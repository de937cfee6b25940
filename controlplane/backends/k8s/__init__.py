"""The k8s backend: the cluster state in Custom Resources and Leases on the API server.

``crds`` generates the CustomResourceDefinitions from the msgspec types (it needs no
Kubernetes client); the client-side parts come in later modules.
"""
