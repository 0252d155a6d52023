"""In-process libnftables through ctypes: one handle, the same language and transactions
as ``nft -f -`` without a process per change. Used by the nftables backend, the iptables
backend's counters (iptables-nft is nf_tables underneath) and the doctor's listings."""

from __future__ import annotations

import os
import threading


class LibNftables:
    """In-process libnftables (Debian's libnftables1) through ctypes: the same language
    and the same one-transaction-per-call semantics as ``nft -f -``, without a process
    per change. A process per change costs 2-3 ms to add an element and 13-20 ms to
    remove one (nft waits out an RCU grace period when its socket closes at exit); a
    long-lived handle costs ~0.1 ms for either. It acts in the calling thread's network
    namespace, which is the daemon's."""

    NFT_CTX_OUTPUT_JSON = 1 << 4

    def __init__(self) -> None:
        import ctypes
        import ctypes.util

        path = ctypes.util.find_library("nftables") or "libnftables.so.1"
        lib = ctypes.CDLL(path)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        self.lib = lib
        self._lock = threading.Lock()  # one handle, used from the loop and worker threads
        self.ctx = lib.nft_ctx_new(0)
        if not self.ctx:
            raise OSError("nft_ctx_new failed")
        lib.nft_ctx_buffer_output(self.ctx)
        lib.nft_ctx_buffer_error(self.ctx)

    def run(self, script: bytes, json_output: bool = False) -> tuple[int, bytes, bytes]:
        with self._lock:
            flags = self.NFT_CTX_OUTPUT_JSON if json_output else 0
            self.lib.nft_ctx_output_set_flags(self.ctx, flags)
            rc = self.lib.nft_run_cmd_from_buffer(self.ctx, script)
            out = self.lib.nft_ctx_get_output_buffer(self.ctx) or b""
            err = self.lib.nft_ctx_get_error_buffer(self.ctx) or b""
        return rc, out, err


def open_lib() -> LibNftables | None:
    """The handle, or None (``NETAGENT_NFT=process``, or no libnftables: use ``nft``)."""
    if os.environ.get("NETAGENT_NFT") == "process":
        return None
    try:
        return LibNftables()
    except OSError:
        return None
