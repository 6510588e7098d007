"""Pause, transparent resume and named snapshots through the official Leap0 Python SDK.

The module runs its own `cove server` (the same `CoveServer` as test_leap0_sdk.py) so that its
sandboxes and snapshots never meet the other module's, and checks every effect from inside the
guest with `process.execute`.
"""

from __future__ import annotations

import secrets

import pytest

import leap0
from leap0 import Leap0ConflictError, Leap0NotFoundError, SandboxState, Snapshot
from test_leap0_sdk import TEMPLATE, CoveServer, delete_leftovers, make_client, sh

NOTE = "/home/user/sdk-note.txt"


@pytest.fixture(scope="module")
def client():
    srv = CoveServer()
    try:
        with make_client(srv) as c:
            yield c
            delete_leftovers(c)
    finally:
        srv.stop()


def test_pause_resume_snapshot_restore(client):
    sb = client.sandboxes.create(template_name=TEMPLATE, timeout=900)
    restored = None
    try:
        sh(sb, f"echo 'written before the pause' > {NOTE}")

        assert sb.pause() is sb
        assert sb.state == SandboxState.PAUSED
        assert client.sandboxes.get(sb.id).state == SandboxState.PAUSED
        assert sb.id in [i.id for i in client.sandboxes.list(state="paused").items]
        with pytest.raises(Leap0ConflictError):
            sb.pause()

        # The next command resumes the sandbox transparently.
        assert sh(sb, f"cat {NOTE}; hostname") == f"written before the pause\n{sb.id}\n"
        assert sb.refresh().state == SandboxState.RUNNING

        name = f"sdk-{secrets.token_hex(6)}"
        snap = sb.create_snapshot(name=name)
        assert isinstance(snap, Snapshot)
        assert snap.name == name and snap.id and snap.id != name
        assert (snap.template_id, snap.vcpu, snap.memory, snap.disk) == (
            sb.template_id,
            sb.vcpu,
            sb.memory,
            sb.disk,
        )
        assert snap.created_at
        with pytest.raises(Leap0ConflictError):
            sb.create_snapshot(name=name)

        listing = client.snapshots.list(query=name)
        assert [s.name for s in listing.items] == [name]
        assert listing.total_items == 1
        assert listing.items[0].id == snap.id

        # The source runs on; what it does now is not in the snapshot.
        assert sb.refresh().state == SandboxState.RUNNING
        sh(sb, f"echo 'changed after the snapshot' > {NOTE}")

        restored = client.snapshots.restore(snapshot_name=name)
        assert isinstance(restored, leap0.Sandbox)
        assert restored.state == SandboxState.RUNNING
        assert restored.id != sb.id
        assert (restored.vcpu, restored.memory, restored.disk) == (snap.vcpu, snap.memory, snap.disk)
        assert sh(restored, f"cat {NOTE}; hostname") == f"written before the pause\n{restored.id}\n"
        assert sh(sb, f"cat {NOTE}") == "changed after the snapshot\n"

        client.snapshots.delete(snap)
        assert client.snapshots.list(query=name).items == []
        with pytest.raises(Leap0NotFoundError):
            client.snapshots.restore(snapshot_name=name)
        with pytest.raises(Leap0NotFoundError):
            client.snapshots.delete(snap)
        # The restored sandbox does not depend on the snapshot.
        assert sh(restored, f"cat {NOTE}") == "written before the pause\n"
    finally:
        for s in (restored, sb):
            if s is not None:
                try:
                    s.delete()
                except Leap0NotFoundError:
                    pass
    with pytest.raises(Leap0NotFoundError):
        client.sandboxes.get(sb.id)


def test_snapshot_with_kill_sandbox_after(client):
    sb = client.sandboxes.create(template_name=TEMPLATE)
    name = f"sdk-final-{secrets.token_hex(6)}"
    restored = None
    try:
        sh(sb, f"echo 'last words' > {NOTE}")
        snap = sb.create_snapshot(name=name, kill_sandbox_after=True)
        assert snap.name == name
        with pytest.raises(Leap0NotFoundError):
            client.sandboxes.get(sb.id)
        restored = client.snapshots.restore(snapshot_name=name, timeout=600)
        assert restored.timeout == 600
        assert sh(restored, f"cat {NOTE}") == "last words\n"
    finally:
        if restored is not None:
            restored.delete()
        try:
            sb.delete()
        except Leap0NotFoundError:
            pass
        try:
            client.snapshots.delete(name)
        except Leap0NotFoundError:
            pass
