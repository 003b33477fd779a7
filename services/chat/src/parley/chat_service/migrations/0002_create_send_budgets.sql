-- Each sender's rate budget, shared by all of their streams on every replica: the generic
-- cell rate algorithm keeps one timestamp per user, the time at which the budget would be
-- full again (its "theoretical arrival time"). A message is allowed while that time is at
-- most (burst - 1) / rate seconds ahead of now, and pushes it 1 / rate seconds further.
-- The message statement updates the row, so the check costs no extra round trip.
CREATE TABLE chat_send_budgets (
    user_id    integer     PRIMARY KEY,
    full_again timestamptz NOT NULL
);
