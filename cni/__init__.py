"""netagent's CNI plugin: container runtimes drive the daemon through CNI.

``plugin`` is the program (console script ``netagent-cni``, installed as the CNI binary
``netagent`` by ``netagent cni install``): a call's environment and stdin become one
request on the daemon's socket, and its answer the CNI result or error. ``queue`` keeps
the DELs that could not be delivered, for the daemon to carry out when it is back.
``install`` writes the binary and the network configurations.

Standard library only, and nothing else of netagent's: a runtime starts the plugin for
every container, so its start-up is its cost.
"""
