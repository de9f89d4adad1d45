"""Deployment helpers: certificates and keys, SuperLink/SuperNode command lines."""
