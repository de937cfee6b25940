"""Regressions found by the large-state round trip (tests/process/test_large_state.py).

* A state with client sessions (any state a network client wrote to) must survive
  ``state_to_json`` -> ``state_from_json``: the session results are keyed by int, JSON keys are
  strings (``export-state`` then ``import-state`` failed with "Expected `int`, got `str`").
* A restore sent by a network client (wrapped in its session) must keep the restored state's
  sessions, not the target's old ones, and add the restoring client's own.
"""

from __future__ import annotations

from controlplane import commands as c
from controlplane.codec import decode_state, encode_state, state_from_json, state_to_json
from controlplane.state import StateMachine


def _client_write(sm: StateMachine, client: str, seq: int, name: str, time: float) -> None:
    flag = c.SetFeatureFlag(name=name, enabled=True, time=time)
    outcome = sm.apply(c.ClientCommand(client_id=client, seq=seq, ack=0, command=flag, time=time))
    assert outcome.error is None


def test_state_with_sessions_round_trips_through_json_and_msgpack() -> None:
    sm = StateMachine()
    _client_write(sm, "client-a", 1, "f1", 10.0)
    _client_write(sm, "client-a", 2, "f2", 11.0)
    state = sm.state
    assert state.sessions["client-a"].results  # int-keyed, unacknowledged results
    assert state_from_json(state_to_json(state)) == state
    assert decode_state(encode_state(state)) == state


def test_client_restore_keeps_the_restored_sessions() -> None:
    source = StateMachine()
    _client_write(source, "source-client", 1, "from-source", 10.0)
    target = StateMachine()
    _client_write(target, "old-target-client", 1, "from-target", 20.0)
    restore = c.RestoreState(state=source.state, time=30.0)
    outcome = target.apply(
        c.ClientCommand(client_id="restorer", seq=1, ack=0, command=restore, time=30.0)
    )
    assert outcome.error is None
    restored = target.state
    assert set(restored.sessions.keys()) == {"source-client", "restorer"}
    assert restored.sessions["source-client"] == source.state.sessions["source-client"]
    assert dict(restored.feature_flags.items()) == {"from-source": True}
    # A retry of the restore is answered from the restorer's session, not applied again.
    again = target.apply(
        c.ClientCommand(client_id="restorer", seq=1, ack=0, command=restore, time=31.0)
    )
    assert again.error is None
    assert target.state.version == restored.version
