"""khd's live page (issue 15): a read-only web page of the running system on 127.0.0.1."""
