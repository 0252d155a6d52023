"""Test support: real container runtimes in a sandbox, a libcni-style CNI driver, images."""
