"""netagent: a host networking agent for namespaces, veth pairs, bridges and NAT."""

__version__ = "0.1.0"
