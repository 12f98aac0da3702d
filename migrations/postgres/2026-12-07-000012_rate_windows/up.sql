-- An account's rate limit held across every instance: each window of wall-clock time (its start
-- in milliseconds since the epoch) counts the segments the instances took in it. Rows older than a
-- minute are deleted by the instances as they go.
CREATE TABLE rate_windows (
    account  TEXT NOT NULL,
    start_ms BIGINT NOT NULL,
    used     BIGINT NOT NULL,
    PRIMARY KEY (account, start_ms)
);
