"""A campaign's states and the actions that move it between them (issue 21). Pure:
the API and the runner ask :func:`transition` whether an action is allowed in a state
and where it leads, and record the answer as an event with who and why.

::

    draft ─validate─▶ validated ─approve─▶ approved ─schedule─▶ scheduled
      ▲                   │                    │                    │ launch (the runner,
      └──── edit ─────────┴────────────────────┴────────────────────┘  at the time)
                                                                     ▼
    cancelled ◀─cancel─ (any state but sent)           sending ─finish─▶ sent
                                        scheduled, sending ─pause─▶ paused ─resume─▶
                                        (back to scheduled, or sending once launched)

An edit (of the template, audience, From, schedule, …) in ``validated``, ``approved``
or ``scheduled`` returns the campaign to ``draft``: what was approved is no longer what
would be sent. A campaign that is sending, paused, sent or cancelled cannot be edited
(``clone`` makes a new draft of it).
"""

from __future__ import annotations

from dataclasses import dataclass

DRAFT = "draft"
VALIDATED = "validated"
APPROVED = "approved"
SCHEDULED = "scheduled"
SENDING = "sending"
SENT = "sent"
PAUSED = "paused"
CANCELLED = "cancelled"

#: Every state, in the order of a campaign's life.
STATES = (DRAFT, VALIDATED, APPROVED, SCHEDULED, SENDING, SENT, PAUSED, CANCELLED)
#: States a campaign does not leave.
FINAL = (SENT, CANCELLED)

#: action -> {state it is allowed in: state it leads to}. ``resume`` is resolved by
#: :func:`transition` (back to ``scheduled`` or ``sending``).
_MOVES: dict[str, dict[str, str]] = {
    "validate": {DRAFT: VALIDATED, VALIDATED: VALIDATED},
    "approve": {VALIDATED: APPROVED},
    "schedule": {APPROVED: SCHEDULED, SCHEDULED: SCHEDULED},
    "launch": {SCHEDULED: SENDING},
    "finish": {SENDING: SENT},
    "pause": {SCHEDULED: PAUSED, SENDING: PAUSED},
    "resume": {PAUSED: SENDING},
    "cancel": {s: CANCELLED for s in STATES if s not in FINAL},
    "edit": {DRAFT: DRAFT, VALIDATED: DRAFT, APPROVED: DRAFT, SCHEDULED: DRAFT},
}
#: Actions a key may ask for through the API (``launch`` and ``finish`` are the
#: runner's).
API_ACTIONS = ("validate", "approve", "schedule", "pause", "resume", "cancel")
ACTIONS = tuple(_MOVES)


class TransitionError(ValueError):
    """The action is not allowed in the campaign's state (the API answers 409)."""

    def __init__(self, action: str, state: str) -> None:
        allowed = [s for s in STATES if s in _MOVES.get(action, {})]
        self.action, self.state, self.allowed = action, state, tuple(allowed)
        where = ", ".join(allowed) if allowed else "no state"
        super().__init__(f"cannot {action} a campaign that is {state}: only in {where}")


@dataclass(frozen=True)
class Transition:
    action: str
    before: str
    after: str


def transition(action: str, state: str, *, launched: bool = False) -> Transition:
    """Where ``action`` takes a campaign in ``state``; :class:`TransitionError` when
    it is not allowed there. ``launched``: send records exist (a paused campaign
    resumes sending rather than waiting for its time again)."""
    if action not in _MOVES:
        raise ValueError(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}")
    after = _MOVES[action].get(state)
    if after is None:
        raise TransitionError(action, state)
    if action == "resume" and not launched:
        after = SCHEDULED
    return Transition(action, state, after)


def editable(state: str) -> bool:
    """Whether the campaign's content, audience or schedule may still change."""
    return state in _MOVES["edit"]


def approval_refused(
    approver: str, last_editor: str | None, *, single_key_allowed: bool
) -> str | None:
    """Why ``approver`` (a key's prefix) may not approve, or None when it may: the
    key that last changed the campaign does not approve it, unless the tenant allows
    single-key approval (a one-person install)."""
    if last_editor is not None and approver == last_editor and not single_key_allowed:
        return (
            "the key that last changed the campaign cannot approve it: approve with"
            " another key that has the approve scope (or allow single-key approval in"
            " the tenant's settings)"
        )
    return None
