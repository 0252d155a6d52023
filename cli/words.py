"""The ``netagent ctl`` command lines, as plain data, for the CLI's fast path.

GENERATED from ``agent/ops.py`` and ``agent/errors.py`` by ``python -m
netagent.cli.wordgen``: do not edit. Building the request classes costs a ``ctl`` command
~10 ms (``typing``, descriptors, ~25 classes); a literal loads from its ``.pyc`` in well
under one. ``tests/cli/test_words.py`` keeps it equal to what the declarations say.
"""

from __future__ import annotations

#: not ``typing.TYPE_CHECKING``: importing typing costs ~1-3 ms (mypy reads this name alike)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from netagent.agent.argv import Shape

#: command words -> (op, shape: see netagent.agent.argv.parse)
COMMANDS: dict[tuple[str, ...], tuple[str, Shape]] = {
    ('status',): ('status', ((), {}, (), (), ())),
    ('show',): ('show', ((), {'--graph': ('graph', 0, None), '--format': ('format', 1, ('dot', 'svg', 'png')), '--output': ('output', 1, None)}, (), ('graph', 'format', 'output'), ())),
    ('ns', 'add'): ('ns.add', (('name',), {}, ('name',), (), ())),
    ('ns', 'del'): ('ns.del', (('name',), {}, ('name',), (), ())),
    ('ns', 'list'): ('ns.list', ((), {}, (), (), ())),
    ('bridge', 'add'): ('bridge.add', (('name',), {'--address': ('addresses', 2, None), '--masquerade': ('masquerade', 0, None)}, ('name',), (), ())),
    ('bridge', 'del'): ('bridge.del', (('name',), {}, ('name',), (), ())),
    ('bridge', 'list'): ('bridge.list', ((), {}, (), (), ())),
    ('plug',): ('plug.add', (('ns', 'bridge'), {'--netns': ('netns', 1, None), '--pid': ('pid', 1, None), '--address': ('addresses', 2, None), '--ifname': ('ifname', 1, None)}, ('bridge',), (), (('ns', ('netns', 'pid')),))),
    ('unplug',): ('plug.del', (('ns', 'bridge'), {'--netns': ('netns', 1, None), '--pid': ('pid', 1, None)}, ('bridge',), (), (('ns', ('netns', 'pid')),))),
    ('wire',): ('wire.add', (('ns_a', 'addresses_a', 'ns_b', 'addresses_b'), {}, ('ns_a', 'addresses_a', 'ns_b', 'addresses_b'), (), ())),
    ('unwire',): ('wire.del', (('ns_a', 'ns_b'), {}, ('ns_a', 'ns_b'), (), ())),
    ('forward',): ('forward.add', (('host_ports', 'destination'), {'--proto': ('proto', 1, None), '--host-ip': ('host_ip', 1, None)}, ('host_ports', 'destination'), (), ())),
    ('unforward',): ('forward.del', (('host_ports',), {'--proto': ('proto', 1, None), '--host-ip': ('host_ip', 1, None)}, ('host_ports',), (), ())),
    ('forwards',): ('forward.list', ((), {}, (), (), ())),
    ('attach', 'add'): ('attach.add', (('pattern', 'bridge'), {}, ('pattern', 'bridge'), (), ())),
    ('attach', 'del'): ('attach.del', (('pattern', 'bridge'), {}, ('pattern', 'bridge'), (), ())),
    ('attach', 'list'): ('attach.list', ((), {}, (), (), ())),
    ('links',): ('links', ((), {'--ns': ('ns', 1, None)}, (), (), ())),
    ('neigh',): ('neigh', ((), {'--ns': ('ns', 1, None)}, (), (), ())),
    ('routes',): ('routes', ((), {'--ns': ('ns', 1, None)}, (), (), ())),
    ('events',): ('events', ((), {}, (), (), ())),
    ('apply',): ('apply', (('intents',), {'--prune': ('prune', 0, None)}, ('intents',), (), ())),
    ('purge',): ('purge', ((), {'--orphans': ('orphans', 0, None)}, (), (), ())),
    ('forget',): ('forget', (('key',), {}, ('key',), (), ())),
    ('attachments',): ('attachment.list', ((), {}, (), (), ())),
    ('doctor',): ('doctor', ((), {}, (), (), ())),
    ('explain',): ('explain', (('port',), {'--proto': ('proto', 1, None), '--from': ('source', 1, None), '--host-ip': ('host_ip', 1, None), '--trace': ('trace', 0, None)}, ('port',), (), ())),
    ('peers',): ('peers', ((), {}, (), (), ())),
}

#: error code of a reply -> the CLI's exit status
EXIT_STATUS: dict[int, int] = {
    1001: 2,
    1002: 2,
    1003: 2,
    1004: 2,
    1005: 2,
    2001: 2,
    2002: 2,
    2003: 2,
    2004: 2,
    2005: 2,
    3001: 3,
    3002: 4,
    3003: 4,
    3004: 4,
    3005: 4,
    3006: 4,
    4001: 5,
    4002: 5,
    5000: 1,
    5001: 1,
    5002: 6,
    5003: 6,
    5004: 6,
    5005: 6,
    5006: 6,
}
