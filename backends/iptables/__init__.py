"""The iptables backend: netagent's own ``NETAGENT-*`` chains in the nat table.

For hosts where nftables cannot be used (or is not wanted), the same NAT is written for
``iptables`` (IPv4) and ``ip6tables`` (IPv6), in chains only netagent writes to:

    nat table, per family
      PREROUTING   -m comment --comment netagent:jump -j NETAGENT-PREROUTING    (one rule)
      OUTPUT       -m comment --comment netagent:jump -j NETAGENT-OUTPUT        (one rule)
      POSTROUTING  -m comment --comment netagent:jump -j NETAGENT-POSTROUTING   (one rule)
      NETAGENT-PREROUTING   -m addrtype ! --dst-type LOCAL -j RETURN   (netagent:local-only)
                            -j NETAGENT-DNAT                           (netagent:forwards)
      NETAGENT-OUTPUT       the same two rules, for the host's own traffic
      NETAGENT-DNAT         a jump per block of 4,096 ports that holds a forward
      NETAGENT-TCP-8192-12287   a jump per block of 64 ports that holds a forward
      NETAGENT-TCP-9984-10047   a DNAT rule per forwarded port of the block
      NETAGENT-POSTROUTING  masquerade 127.0.0.1 -> forward (IPv4), hairpin and
                            --masquerade per bridge address

One module per layer, each importing only those above it in this list:

``rules``    the rules and chains a desired state wants (pure)
``save``     parse ``iptables-save``: our chains and jumps only (pure)
``effects``  what a restore file does to the chains (pure)
``restore``  quoting, restore files, the batch payload (pure)
``plan``     the planners, full and update (pure: nothing stored)
``genid``    the nf_tables generation over nfnetlink
``cache``    the observation cache: what is remembered between calls
``process``  running the programs, with a time limit, tracking their pids
``backend``  :class:`IptablesBackend`: the I/O and the wiring

Why the rules look as they do, and the figures behind it: ``docs/backends.md``.
"""

from .backend import IptablesBackend

__all__ = ["IptablesBackend"]
