"""The network simulator: the real node and client code over a virtual network in virtual time."""
