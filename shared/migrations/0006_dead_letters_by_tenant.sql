-- Dead letters are listed newest first by id (UUIDv7, so by time) within a tenant: the
-- index follows that order, not created_at's, so a page reads only its own rows.
DROP INDEX dead_letters_by_tenant;
CREATE INDEX dead_letters_by_tenant ON dead_letters (tenant_id, id DESC);
