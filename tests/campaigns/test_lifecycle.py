"""A campaign's state machine (campaigns.lifecycle): every action in every state,
against a table written out by hand from issue 21."""

from __future__ import annotations

import pytest

from postwarden.campaigns.lifecycle import (
    ACTIONS,
    STATES,
    TransitionError,
    approval_refused,
    editable,
    transition,
)

# (action, state) -> the state it leads to; every pair not listed is refused.
EXPECTED = {
    ("validate", "draft"): "validated",
    ("validate", "validated"): "validated",
    ("approve", "validated"): "approved",
    ("schedule", "approved"): "scheduled",
    ("schedule", "scheduled"): "scheduled",
    ("launch", "scheduled"): "sending",
    ("finish", "sending"): "sent",
    ("pause", "scheduled"): "paused",
    ("pause", "sending"): "paused",
    ("resume", "paused"): "sending",
    ("edit", "draft"): "draft",
    ("edit", "validated"): "draft",
    ("edit", "approved"): "draft",
    ("edit", "scheduled"): "draft",
    **{("cancel", s): "cancelled" for s in
       ("draft", "validated", "approved", "scheduled", "sending", "paused")},
}  # fmt: skip


def test_every_action_in_every_state() -> None:
    assert set(STATES) == {"draft", "validated", "approved", "scheduled", "sending", "sent",
                           "paused", "cancelled"}  # fmt: skip
    for action in ACTIONS:
        for state in STATES:
            want = EXPECTED.get((action, state))
            if want is None:
                with pytest.raises(TransitionError) as exc:
                    transition(action, state, launched=True)
                assert exc.value.state == state and action in str(exc.value)
                assert state not in exc.value.allowed
            else:
                t = transition(action, state, launched=True)
                assert (t.before, t.after) == (state, want), (action, state)
    # Every pair the table allows is an action of the machine.
    assert {a for a, _ in EXPECTED} == set(ACTIONS)


def test_resume_waits_again_until_launched_and_final_states_stay() -> None:
    assert transition("resume", "paused", launched=False).after == "scheduled"
    assert transition("resume", "paused", launched=True).after == "sending"
    for final in ("sent", "cancelled"):
        for action in ACTIONS:
            with pytest.raises(TransitionError):
                transition(action, final)
    assert [s for s in STATES if editable(s)] == ["draft", "validated", "approved", "scheduled"]
    with pytest.raises(ValueError, match="unknown action"):
        transition("explode", "draft")
    with pytest.raises(ValueError, match="unknown state"):
        transition("validate", "drafty")


def test_the_last_editor_does_not_approve_unless_the_tenant_allows_it() -> None:
    assert approval_refused("pw_b", "pw_a", single_key_allowed=False) is None
    why = approval_refused("pw_a", "pw_a", single_key_allowed=False)
    assert why is not None and "another key" in why
    assert approval_refused("pw_a", "pw_a", single_key_allowed=True) is None
    assert approval_refused("pw_a", None, single_key_allowed=False) is None
