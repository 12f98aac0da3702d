-- Where each opt-out came from: `api` (a JSON request), `csv` (an import) or `inbound` (the
-- number's own STOP); rows from before the column came through the store's callers, as `api`.
ALTER TABLE opt_outs ADD COLUMN source TEXT NOT NULL DEFAULT 'api';
