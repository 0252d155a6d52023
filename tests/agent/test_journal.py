"""The journal under the API: a change is the state once its line is written; the
line's flush runs on the loop while flushes are quick, beside the pass that realizes it
(in the journal's thread) once one was slow, and the answer waits for both; a disk that
refuses the write changes nothing, one that refuses the flush is said."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from netagent.agent import api, hostview
from netagent.agent.errors import NetagentError
from netagent.agent.reconcile import FIREWALL

from ..support.wait import LIMIT, until
from .test_api import seed, snapshot
from .world import make_world


async def test_a_new_forwards_look_for_other_owners_overlaps_its_journal_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listeners are read while the journal's line goes to disk (in its thread),
    not after: the journal's flush waits here until the look has read them."""
    w = make_world(tmp_path)
    async with w.running():
        await seed(w)
        w.slow_disk()
        looked = threading.Event()
        seen: list[bool] = []
        sync = w.store.sync

        def listeners(proto: str, family: int) -> list[hostview.Listener]:
            assert (proto, family) == ("tcp", 4)
            looked.set()
            return [hostview.Listener("tcp", 4, "0.0.0.0", 81, 1)]

        def slow_sync() -> None:
            seen.append(looked.wait(5))
            sync()

        monkeypatch.setattr(hostview, "listeners_now", listeners)
        monkeypatch.setattr(hostview, "socket_owners", lambda *_a: {})
        monkeypatch.setattr(w.store, "sync", slow_sync)
        reply = await w.call("forward.add", host_ports="81", destination="192.168.15.1:81")
        assert seen == [True]
        assert any("81" in line for line in reply["warnings"]), reply["warnings"]


async def test_the_answer_waits_for_the_flush_which_runs_beside_the_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change is the state once its line is written; the pass realizes it while the
    line's fdatasync runs, and the answer comes only when both are done."""
    w = make_world(tmp_path)
    async with w.running():
        await seed(w)
        w.slow_disk()
        flushing, flush = threading.Event(), threading.Event()
        sync = w.store.sync

        def slow_sync() -> None:
            flushing.set()
            assert flush.wait(LIMIT)
            sync()

        monkeypatch.setattr(w.store, "sync", slow_sync)
        replies: list[Any] = []
        async with anyio.create_task_group() as tg:

            async def add() -> None:
                replies.append(
                    await w.call("forward.add", host_ports="81", destination="192.168.15.1:81")
                )

            tg.start_soon(add)
            await until(flushing.is_set, "the flush began")
            assert "fwd/tcp/81" in w.state
            await until(lambda: "fwd/tcp/81" in w.fw.dump(), "realized while the flush runs")
            await until(lambda: not w.rec.busy(), "the pass is done")
            await wait_all_tasks_blocked()  # the request waits: for the flush alone
            assert replies == []
            flush.set()
        assert replies[0]["changed"]


async def test_a_flush_the_disk_refuses_fails_the_request_and_says_what_is_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = make_world(tmp_path)
    async with w.running():
        await seed(w)

        def broken() -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(w.store, "sync", broken)
        with pytest.raises(NetagentError) as exc:
            await w.call("forward.add", host_ports="81", destination="192.168.15.1:81")
        assert exc.value.code == 5002
        assert "in place, but not on disk" in exc.value.message
        assert "Input/output error" in exc.value.message
        assert "fwd/tcp/81" in w.state and "fwd/tcp/81" in w.fw.dump()
        assert w.store.behind
        monkeypatch.undo()
        await w.call("forward.add", host_ports="82", destination="192.168.15.1:82")
        assert not w.store.behind, "the next change wrote a whole snapshot"
    again = make_world(tmp_path)
    assert {"fwd/tcp/81", "fwd/tcp/82"} <= set(again.state.intents)


# ---- the journal refuses ------------------------------------------------------------
async def test_a_journal_that_fails_fails_the_request_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = make_world(tmp_path)
    async with w.running():
        await seed(w)
        await w.call("attach.add", pattern="tap*", bridge="v-net-0")
        before = snapshot(w)

        def full(changes: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(w.store, "write", full)
        monkeypatch.setattr(w.store, "append", lambda changes, sync=True: full(changes))
        attempts: list[tuple[str, dict[str, Any]]] = [
            ("ns.add", {"name": "blue"}),
            ("bridge.add", {"name": "v-net-0", "addresses": ["192.168.15.6/24"]}),
            ("plug.del", {"ns": "red", "bridge": "v-net-0"}),
            ("forward.add", {"host_ports": "81", "destination": "192.168.15.1:81"}),
            ("forward.del", {"host_ports": "80"}),
            ("apply", {"intents": [{"kind": "ns", "name": "red"}], "prune": True}),
            ("purge", {}),
        ]
        for op, args in attempts:
            with pytest.raises(NetagentError) as exc:
                await w.call(op, **args)
            assert exc.value.code == 5002, op
            assert "No space left on device; nothing was changed" in exc.value.message
            assert snapshot(w) == before, op
        # the firewall's bookkeeping was not touched either: the next sync is an update
        assert (w.sync._added, w.sync._removed) == ([], [])

        monkeypatch.undo()
        reply = await w.call("forward.add", host_ports="81", destination="192.168.15.1:81")
        assert reply["actions"][FIREWALL] == ["add forward fwd/tcp/81: 81/tcp -> 192.168.15.1:81"]
    assert "fwd/tcp/81" in w.store.journal.read_text()


async def test_a_flush_the_disk_does_not_confirm_in_time_is_said_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = make_world(tmp_path)
    async with w.running():
        await seed(w)
        w.slow_disk()
        release = threading.Event()

        def stuck() -> None:
            assert release.wait(LIMIT)

        monkeypatch.setattr(api, "FLUSH_TIMEOUT", 0.2)
        monkeypatch.setattr(w.store, "sync", stuck)
        try:
            with pytest.raises(NetagentError) as exc:
                await w.call("forward.add", host_ports="81", destination="192.168.15.1:81")
            assert exc.value.code == 5002
            assert "has not confirmed the journal" in exc.value.message
            assert "fwd/tcp/81" in w.state and "fwd/tcp/81" in w.fw.dump()
        finally:
            release.set()


async def test_a_quick_flush_runs_on_the_loop_and_a_slow_one_sends_the_next_to_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the disk flushes quickly, a change's flush runs right after its line is
    written, on the loop (no thread's hop); one that took over the journal's quick limit
    sends the next flushes to the journal's thread, beside the pass."""
    w = make_world(tmp_path)
    journal = w.api._journal
    assert journal.quick_limit == api.FLUSH_QUICK_LIMIT
    journal.quick_limit = LIMIT  # the real disk's flushes of the seed never count as slow
    where: list[str] = []
    sync = w.store.sync

    def noted() -> None:
        where.append(threading.current_thread().name)
        sync()

    async with w.running():
        await seed(w)
        monkeypatch.setattr(w.store, "sync", noted)
        await w.call("forward.add", host_ports="81", destination="192.168.15.1:81")
        assert where == [threading.current_thread().name]
        journal.quick_limit = 0.02

        def slow() -> None:
            time.sleep(0.04)
            noted()

        monkeypatch.setattr(w.store, "sync", slow)
        await w.call("forward.add", host_ports="82", destination="192.168.15.1:82")
        assert journal.slow_quick == 1 and where[-1] == threading.current_thread().name
        monkeypatch.setattr(w.store, "sync", noted)
        await w.call("forward.add", host_ports="83", destination="192.168.15.1:83")
        assert where[-1] == "netagent-journal"
