"""What the privileged, end-to-end and service tests share.

``wait``      waiting on a condition with a deadline (the only way tests wait)
``sandbox``   opening and emptying a sandbox (the fixtures in ``tests/conftest.py`` use it)
``daemon``    the real daemon in a sandbox, driven by the real CLI (``Daemon``)
``events``    ``netagent ctl events --json`` as a live stream (``EventStream``)
``protocol``  raw clients of the daemon's socket
``net``       HTTP, TCP, UDP and ping inside the sandbox
``topology``  the seed's topology and the outside client
``state``     the daemon's and the kernel's whole state, to compare
``seed``      the seed of a random test (``NETAGENT_TEST_SEED`` replays one)
``units``     reading the systemd unit files
``runtimes``, ``private``, ``images``, ``traffic``  Podman, containerd and dockerd in a
              sandbox, with private state, and a busybox image built offline
``libcni``    a CNI driver that calls plugins the way libcni does
``cluster``, ``etcd``  hosts as nested sandboxes on an underlay, a 3-member etcd

Importing any of it needs no root: the unit tier imports some of it too.
"""
