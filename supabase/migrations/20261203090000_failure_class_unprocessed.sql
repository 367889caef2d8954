-- A failure Toss did not process (409 IDEMPOTENT_REQUEST_PROCESSING, 429): the only kind of
-- failure that may be re-sent under the same Idempotency-Key, since Toss replays every processed
-- error under a key for 15 days. In a file of its own: a new enum label cannot be used inside the
-- transaction that adds it.
alter type billing.failure_class add value if not exists 'unprocessed' before 'transient';
